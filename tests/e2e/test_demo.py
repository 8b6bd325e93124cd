"""`avgk demo` as a user runs it, shrunk by overrides to fit the test budget."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
    cmd = [
        sys.executable, "-m", "pipelines.cli", "demo",
        f"data.shards={tmp_path / 'shards'}", f"run.storage={tmp_path / 'runs'}",
        "data.synthetic.num_classes=20", "data.synthetic.num_train=800", "data.synthetic.num_val=300",
        "data.synthetic.num_test=300", "data.synthetic.image_size=16", "data.resize=16", "data.crop=16",
        "data.shard_maxcount=100", "train.epochs=1", "train.batch_size=50", "eval.ks=[1,2,3]",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "test set, thresholds calibrated on val" in out
    # The two runs train side by side; each progress line says whose it is.
    assert "=== training two_head and ce side by side" in out
    for method in ("two_head", "ce"):
        assert f"[demo-{method}] epoch 1/1 train_loss" in out, out[-3000:]
    for method in ("two_head", "ce"):
        assert (tmp_path / "runs" / f"demo-{method}" / "metrics.json").is_file()
        assert sum(line.split()[1:2] == [method] for line in out.splitlines()) == 3  # one row per K
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "--host 127.0.0.1" in out
    assert (tmp_path / "runs" / "mlflow.db").is_file()
