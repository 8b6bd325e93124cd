"""Run-directory lookups shared by the jobs and the predictor: checkpoints and the saved config."""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
import yaml

from avgk.config import Config, ConfigError, flatten
from avgk.runtime import storage

CHECKPOINT_FILE = "checkpoint.pt"
"""An avgk checkpoint's file name in <run_dir>/best/, Ray Train checkpoint_* folders and checkpoints/latest/."""


CONFIG_FILE = "config.yaml"
"""The resolved config a run was trained with, written into its run directory when training starts."""

RESUME_FREE_KEYS = ("run.resume", "run.object_store_retry_s", "train.epochs", "train.max_failures",
                    "train.use_gpu", "train.cpus_per_worker", "data.loader_workers", "tracking.")
"""Keys a resumed run may change: where and how long it trains, not what it learns (a prefix ends with a dot)."""


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FREE_KEYS)


def config_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every differing key of two config trees, except RESUME_FREE_KEYS."""
    old, new = flatten(saved), flatten(wanted)
    keys = sorted(k for k in set(old) | set(new) if not _free(k) and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def with_absolute_paths(config: Config) -> Config:
    """Workers do not share the driver's working directory: local paths become absolute."""
    config = config.model_copy(deep=True)
    config.data.shards = storage.absolute(config.data.shards)
    config.run.storage = storage.absolute(config.run.storage)
    if config.data.root:
        config.data.root = storage.absolute(config.data.root)
    if config.model.pretrained:
        config.model.pretrained = storage.absolute(config.model.pretrained)
    return config


def check_resume(config: Config) -> bool:
    """Whether the run directory already holds this run (True: resume), by run.resume; a stale run is an error.

    auto: a run whose config.yaml matches `config` (up to RESUME_FREE_KEYS) resumes, a different
    one stops with the differing keys; never: any existing run stops; force: resume regardless.
    Paths in `config` must be as the run writes them (absolute: with_absolute_paths).
    """
    saved_file = storage.join(config.run_dir, CONFIG_FILE)
    if not storage.exists(saved_file):
        return False
    mode = config.run.resume
    where = f"run directory {config.run_dir} already holds run {config.run.name!r}"
    if mode == "never":
        raise ConfigError(f"run config error: {where} and run.resume=never: choose another run.name or remove that folder")
    if mode == "force":
        return True
    try:
        saved = yaml.safe_load(storage.read_bytes(saved_file)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"run config error: {saved_file} is not readable YAML ({err.__class__.__name__}); "
                          "set run.resume=force to resume with this config, or choose another run.name") from None
    changes = config_changes(saved, config.to_dict())
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(f"run config error: {where}, trained with a different config ({shown}): "
                          "rerun with run.resume=force to continue it with this config, or choose another run.name")
    return True


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
