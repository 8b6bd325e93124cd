"""A disk that fills up during a training: one line naming where, the last checkpoint kept, and the same
command resumes once space is freed. The run directory lives on a small tmpfs (skipped where this
machine does not let a test mount one; tests/unit/test_faults.py injects ENOSPC everywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.helpers.runs import ROOT
from tests.helpers.small_disk import fill, small_disk

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _train(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", str(ROOT / "configs" / "smoke.yaml"), *args],
                            cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and path.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.is_file(), f"{path} did not appear in {timeout_s:g} s"


def test_a_full_disk_stops_training_in_one_line_and_the_run_resumes_after_space_is_freed(smoke_shards, tmp_path):
    with small_disk(tmp_path / "disk", size="3m") as disk:
        args = [f"data.shards={smoke_shards}", f"run.storage={disk / 'runs'}", "run.name=full", "train.epochs=6",
                "train.max_failures=0", "tracking.enabled=false"]
        run_dir = disk / "runs" / "full"
        proc = _train(args, tmp_path)
        assert proc.stdout is not None
        lines = []
        filler = None
        for line in proc.stdout:
            lines.append(line)
            if filler is None and "epoch 1/6 train_loss" in line:
                _wait_for(run_dir / "checkpoint_manager_snapshot.json")  # Ray Train has registered a checkpoint
                filler = fill(disk)
        proc.wait(timeout=300)
        out = "".join(lines)
        assert proc.returncode == 2, out[-3000:]
        last = out.strip().splitlines()[-1]
        # the file it could not write: the best checkpoint, Ray Train's checkpoint or index, or metrics
        assert last.startswith(f"avgk: error: no space left on the device of {run_dir}"), out[-3000:]
        assert last.endswith("what was written before is kept (the last checkpoint included); free space, then run "
                             "the same command again: it resumes")
        assert not [p for p in (disk / "runs" / "full").rglob("*") if p.is_file() and p.stat().st_size == 0
                    and p.name.endswith(".json")]  # no index or metrics file left empty

        assert filler is not None
        filler.unlink()
        again = _train(args, tmp_path)
        out, _ = again.communicate(timeout=300)
        assert again.returncode == 0, out[-3000:]
        assert "resuming full" in out and "epoch 1/6 train_loss" not in out and "epoch 6/6 train_loss" in out
        assert (disk / "runs" / "full" / "metrics.json").is_file()
