"""Run-directory lookups shared by the jobs and the predictor: checkpoints and the saved config."""

from __future__ import annotations

import pyarrow.fs as pafs

from avgk import storage
from avgk.config import Config

CHECKPOINT_FILE = "checkpoint.pt"
"""An avgk checkpoint's file name in <run_dir>/best/, Ray Train checkpoint_* folders and checkpoints/latest/."""


def _run_dir_error(run_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"run directory {run_dir} does not exist: train it first (`avgk train CONFIG`) or pass --run RUN_DIR"
    )


def _list_dirs(uri: str, prefix: str) -> list[str]:
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))
    return [storage.join(uri, name) for name in names]


def _latest_checkpoint(run_dir: str) -> str:
    """checkpoint.pt of the newest Ray Train checkpoint_<timestamp> folder (names sort by time), else the local one."""
    ray_dirs = [d for d in _list_dirs(run_dir, "checkpoint_") if storage.exists(storage.join(d, CHECKPOINT_FILE))]
    if ray_dirs:
        return storage.join(ray_dirs[-1], CHECKPOINT_FILE)
    local = storage.join(run_dir, "checkpoints", "latest", CHECKPOINT_FILE)
    if storage.exists(local):
        return local
    raise FileNotFoundError(f"no checkpoint_*/{CHECKPOINT_FILE} in run directory {run_dir}: nothing to load")


def resolve_checkpoint(run_dir: str, checkpoint: str | None, *, default: str = "best") -> str:
    """The checkpoint file a job loads: --checkpoint best | last | PATH, or the run's own choice.

    checkpoint=None takes `default` (the run's eval.checkpoint) the way the training's final
    evaluation did: "best" is <run_dir>/best/checkpoint.pt, or the last checkpoint when no
    epoch ever improved; "last" is the newest Ray Train checkpoint_* folder. An explicit
    "best" must exist. PATH is a checkpoint.pt file or a folder holding one.
    """
    if not storage.exists(run_dir):
        raise _run_dir_error(run_dir)
    which = checkpoint or default
    if which == "best":
        best = storage.join(run_dir, "best", CHECKPOINT_FILE)
        if storage.exists(best):
            return best
        if checkpoint == "best":
            raise FileNotFoundError(f"no best checkpoint at {best}; use --checkpoint last or a PATH")
        return _latest_checkpoint(run_dir)
    if which == "last":
        return _latest_checkpoint(run_dir)
    path = storage.absolute(which)
    fs, local = storage.resolve(path)
    if fs.get_file_info(local).type == pafs.FileType.Directory:
        path = storage.join(path, CHECKPOINT_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"--checkpoint {which}: no checkpoint file at {path} (expected best, last or a PATH)")
    return path


def run_dir_of(config: Config, run: str | None) -> str:
    """--run RUN_DIR, else the config's run directory; must exist."""
    run_dir = storage.absolute(run or config.run_dir)
    if not storage.exists(run_dir):
        raise _run_dir_error(run_dir)
    return run_dir


def saved_run_config(run_dir: str) -> Config | None:
    """The resolved config the training saved in its run directory, if any."""
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        return None
    import yaml

    return Config.model_validate(yaml.safe_load(storage.read_bytes(path)))
