"""Shared test fixtures' building blocks: small data sets and trained runs, the repository's paths, a free port."""

from __future__ import annotations

import socket
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"

# The smoke data with larger val and test splits: with 400 samples the test set size strays
# up to ~8% from K by sampling noise alone (calibration is on val).
LARGE_EVAL_SPLITS = ["data.synthetic.num_val=2000", "data.synthetic.num_test=2000"]
# The prediction model's set rules: the default one on the score head (multilabel) and one on the softmax head.
PREDICT_SET_RULES = "eval.set_rules=[{rule: coverage}, {rule: aps, name: aps_softmax, head: softmax, coverages: [0.9]}]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_config(smoke_shards: Path, tmp_path: Path, *overrides: str):
    from avgk.config import load_config

    return load_config(SMOKE, [f"data.shards={smoke_shards}", f"run.storage={tmp_path / 'runs'}", *overrides])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Ray Train's checkpoint folders of a run (not its checkpoint_manager_snapshot.json), oldest first."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def val_history(run_dir: Path) -> list[dict]:
    """The per-epoch history in a run's latest checkpoint."""
    from avgk.training.checkpoints import load_checkpoint_file

    return load_checkpoint_file(checkpoint_dirs(run_dir)[-1] / "checkpoint.pt")["history"]


def read_split(shards: Path, split: str) -> tuple[list[bytes], np.ndarray]:
    """(encoded PNG bytes, labels) of a split, in shard order, straight from the tar files."""
    from avgk.data.manifest import read_manifest

    images, labels = [], []
    for shard in read_manifest(shards).splits[split].shards:
        with tarfile.open(shards / shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                key = name[: -len(".png")]
                images.append(tar.extractfile(members[name]).read())
                labels.append(int(tar.extractfile(members[f"{key}.cls"]).read()))
    return images, np.asarray(labels)


def prepare_shards(shards: Path) -> Path:
    from avgk.config import load_config
    from avgk.data.prepare import prepare

    prepare(load_config(SMOKE, [f"data.shards={shards}", *LARGE_EVAL_SPLITS]))
    return shards


def train_smoke_run(shards: Path, storage: Path, name: str = "predict") -> Path:
    """One in-process smoke training (no Ray, no MLflow); returns its run directory."""
    from avgk.config import load_config
    from avgk.training import checkpoints, engine

    config = load_config(SMOKE, [
        f"data.shards={shards}", f"run.storage={storage}", "tracking.enabled=false", f"run.name={name}",
        *LARGE_EVAL_SPLITS, PREDICT_SET_RULES,
    ])
    engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
    return Path(config.run_dir)


def wait_until(predicate, *, timeout_s: float, what: str, interval_s: float = 0.2):
    """predicate()'s first truthy value, polled every interval_s; the test fails naming `what` after timeout_s."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval_s)
    if value := predicate():
        return value
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_for_http(proc, url: str, *, log_path: Path, timeout_s: float, name: str) -> float:
    """Seconds until `url` answers 200; RuntimeError with the log's tail if `proc` exits or `timeout_s` passes."""
    import urllib.request

    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{name} did not answer {url} in {timeout_s:g} s:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.5)


def mlflow_descendants(client, experiment_id: str, parent_run_id: str) -> dict[str, list]:
    """A pipeline's MLflow runs below its parent run, by stage: {stage: [runs of its cells]} (a matrix stage's own
    run holds its cells' runs; a one-cell stage's run is the cell's); "<stage>/stage" holds the stage runs."""
    runs = client.search_runs([experiment_id], max_results=1000)
    by_parent: dict[str, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    out: dict[str, list] = {}
    for child in by_parent.get(parent_run_id, []):
        stage = child.data.tags["avgk.stage"]
        if child.data.tags.get("avgk.kind") == "pipeline-stage":
            out.setdefault(f"{stage}/stage", []).append(child)
            out.setdefault(stage, []).extend(by_parent.get(child.info.run_id, []))
        else:
            out.setdefault(stage, []).append(child)
    return out
