"""`avgk demo` (the pipeline configs/pipelines/demo.yaml) as a user runs it, shrunk by overrides to fit
the test budget: the run, a rerun that reuses every stage, a change to one method, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT, mlflow_descendants, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ["data.synthetic.num_classes=20", "data.synthetic.num_train=800", "data.synthetic.num_val=300",
         "data.synthetic.num_test=300", "data.synthetic.image_size=16", "data.resize=16", "data.crop=16",
         "data.shard_maxcount=100", "train.epochs=2", "train.batch_size=50", "eval.ks=[1,2,3]"]
TOLERANCE = 0.03  # test avg-K of a resumed run against the uninterrupted one (as tests/integration/test_train_cli.py)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}


def _args(folder: Path, shards: Path) -> list[str]:
    return [f"data.shards={shards}", f"run.storage={folder / 'runs'}", *SMALL]


def avgk(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=folder, env=_env(), capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_dirs(root: Path, stage: str = "train") -> dict[str, Path]:
    return {p.name.rsplit("-", 1)[0]: p for p in sorted((root / stage).iterdir()) if p.is_dir()}


def split_metrics(run_dir: Path) -> dict:
    """A run's test-set metrics."""
    return json.loads((run_dir / "metrics.json").read_text())["test"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    shards = folder / "shards"
    proc = avgk(folder, "demo", *_args(folder, shards))
    return folder, shards, proc


def test_demo_end_to_end(demo):
    folder, _, proc = demo
    out = proc.stdout
    assert "test set, thresholds calibrated on val" in out
    # The two runs train side by side; each progress line says whose it is.
    assert "=== training two_head and ce side by side" in out
    for method in ("two_head", "ce"):
        assert f"[demo-{method}] epoch 2/2 train_loss" in out, out[-3000:]
        assert sum(line.split()[1:2] == [method] for line in out.splitlines()) == 3  # one row per K
    root = folder / "runs" / "demo"
    runs = run_dirs(root)
    assert sorted(runs) == ["ce", "two_head"] and all((p / "metrics.json").is_file() for p in runs.values())
    assert all(json.loads((p / "record.json").read_text())["status"] == "finished" for p in runs.values())
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "--host 127.0.0.1" in out
    assert (folder / "runs" / "mlflow.db").is_file()
    # the record of what ran: the graph as text and figure, the comparison with its table and figure
    assert (root / "graph.png").is_file() and "  train (train) <- data" in (root / "graph.txt").read_text()
    (compare,) = run_dirs(root, "compare").values()
    assert {"comparison.md", "comparison.csv", "differences_avg_k.png"} <= {p.name for p in compare.iterdir()}

    # one MLflow parent run, a child per cell
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("avgk")
    every = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in every if r.data.tags.get("avgk.kind") == "pipeline"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "demo"
    tree = mlflow_descendants(client, experiment.experiment_id, parent.info.run_id)
    assert sorted(tree) == ["compare", "data", "train", "train/stage"]  # the matrix stage has a run of its own
    cells = {r.data.tags["avgk.cell"]: r for stage in ("data", "train", "compare") for r in tree[stage]}
    assert set(cells) == {"data", "train[two_head]", "train[ce]", "compare"}
    assert all(r.info.status == "FINISHED" for r in [*cells.values(), *tree["train/stage"]])
    assert "test_avg_k_accuracy_k2" in cells["train[ce]"].data.metrics
    assert "comparison.md" in {a.path for a in client.list_artifacts(cells["compare"].info.run_id)}
    assert "graph.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_started_again_it_reuses_every_stage_and_prints_the_same_table(demo):
    folder, shards, first = demo
    start = time.monotonic()
    proc = avgk(folder, "demo", *_args(folder, shards))
    seconds = time.monotonic() - start
    assert "reused 4 finished cell(s): data, train[two_head], train[ce], compare" in proc.stdout
    assert "epoch 1/2" not in proc.stdout  # nothing trained
    assert not [line for line in proc.stdout.splitlines() if line.startswith("start ")]  # no cell started
    table = first.stdout[first.stdout.index("   K method"):first.stdout.index("accuracies in %")]
    assert table in proc.stdout
    print(f"rerun of the finished demo: {seconds:.1f} s")  # BENCHMARKS.md, "Pipelines"


def test_a_change_to_one_method_reruns_only_it_and_what_depends_on_it(demo, tmp_path):
    folder, shards, _ = demo
    spec = (ROOT / "configs" / "pipelines" / "demo.yaml").read_text()
    changed = tmp_path / "demo.yaml"
    changed.write_text(spec.replace("two_head: {loss.name: two_head}", "two_head: {loss.name: two_head, train.lr: 0.003}"))
    before = run_dirs(folder / "runs" / "demo")
    dry = avgk(folder, "pipeline", str(changed), "--dry-run", *_args(folder, shards))
    lines = {line.split()[0]: line for line in dry.stdout.splitlines() if line.startswith("    ")}
    assert "to run (changed config)" in lines["two_head"] and lines["ce"].split()[1] == "done", dry.stdout
    proc = avgk(folder, "pipeline", str(changed), *_args(folder, shards))
    assert "reused 2 finished cell(s): data, train[ce]" in proc.stdout, proc.stdout[-3000:]
    started = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("start "))
    assert started == ["compare", "train[two_head]"]
    after = run_dirs(folder / "runs" / "demo")
    assert len(list((folder / "runs" / "demo" / "train").glob("two_head-*"))) == 2  # a new folder; the old one kept
    assert after["ce"] == before["ce"]


def test_killed_with_kill_9_during_training_it_resumes_from_the_checkpoint(demo, tmp_path):
    folder, shards, _ = demo
    cmd = [sys.executable, "-m", "pipelines.cli", "demo", *_args(tmp_path, shards)]  # the same data, a new folder
    root = tmp_path / "runs" / "demo"
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            wait_until(lambda: list(root.glob("train/*/checkpoints/latest/checkpoint.pt")), timeout_s=300,
                       what="a training's first checkpoint", interval_s=0.2)
            os.kill(driver.pid, signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait()
    interrupted = [json.loads(p.read_text()) for p in root.glob("train/*/record.json")]
    assert any(r["status"] == "running" for r in interrupted), interrupted

    # started again, then SIGTERM once a training runs: the command ends within seconds (exit 143), not
    # when its trainings would have ended, and leaves them to resume
    with open(tmp_path / "terminated.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            wait_until(lambda: "start train[" in (tmp_path / "terminated.log").read_text(), timeout_s=120,
                       what="a training cell to start", interval_s=0.2)
            driver.send_signal(signal.SIGTERM)
            assert driver.wait(timeout=60) == 143, (tmp_path / "terminated.log").read_text()[-3000:]
        finally:
            driver.kill()
            driver.wait()
    assert "avgk: terminated" in (tmp_path / "terminated.log").read_text()

    proc = avgk(tmp_path, "demo", *_args(tmp_path, shards))
    assert "done" in next(line for line in proc.stdout.splitlines() if line.startswith("    -"))  # data: reused
    assert "resume (interrupted)" in proc.stdout and "resuming " in proc.stdout, proc.stdout[-3000:]
    for method, run_dir in run_dirs(root).items():
        reference = folder / "runs" / "demo" / "train" / run_dir.name  # the same fingerprint: same config, data, code
        got, want = split_metrics(run_dir), split_metrics(reference)
        for key in ("1", "2", "3"):
            assert abs(got["avg_k_accuracy"][key] - want["avg_k_accuracy"][key]) <= TOLERANCE, (method, key)
