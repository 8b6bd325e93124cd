"""`avgk tune` on a local Ray: ASHA over TorchTrainer trials, the MLflow run tree, resume without re-running."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avgk.config import Config
from tests.helpers.runs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]
SWEEP = ROOT / "configs" / "sweeps" / "smoke.yaml"
SMALL = ("num_samples=1", "train.epochs=2", "tracking.log_model=false")  # trials' models: not this test's subject


def avgk_tune(smoke_shards: Path, storage: Path, mlflow_uri: str, *overrides: str,
              sweep: Path = SWEEP) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, as a user's first `avgk tune`
    cmd = [sys.executable, "-m", "pipelines.cli", "tune", str(sweep), f"data.shards={smoke_shards}",
           f"run.storage={storage}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def run_tree(client, sweep_name: str):
    experiment = client.get_experiment_by_name("avgk")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("avgk.kind") == "sweep" and r.info.run_name == sweep_name]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_smoke_sweep_asha_mlflow_tree_and_resume(smoke_shards, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    # 2 trials (num_samples=1 x the 2-value lr grid) of 2 epochs: lr 0.05 runs first and finishes,
    # lr 0.002 trails it at epoch 1 and ASHA stops it (trials run one at a time, in grid order).
    proc = avgk_tune(smoke_shards, storage, mlflow_server, *SMALL)
    sweep_dir = storage / "smoke-sweep"

    # ---- Tune: ASHA stopped one trial early
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2, rows
    statuses = sorted(r["status"] for r in rows)
    assert "KILLED" in statuses and "FINISHED" in statuses and "FAILED" not in statuses, rows
    for row in rows:
        epochs = int(row["epochs"])
        assert (epochs == 2) if row["status"] == "FINISHED" else (epochs == 1), row
    assert {float(r["train.lr"]) for r in rows} == {0.05, 0.002}
    assert "best trial:" in proc.stdout and "test avg-K" in proc.stdout  # the summary table is printed

    # ---- MLflow: one parent, one child per trial, final statuses, complete params
    client = MlflowClient(mlflow_server)
    parent, children = run_tree(client, "smoke-sweep")
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == sorted(r["trial"] for r in rows)
    by_name = {c.info.run_name: c for c in children}
    config_keys = set(Config().flat())
    for row in rows:
        child = by_name[row["trial"]]
        assert child.info.status == row["status"], (row, child.info.status)
        missing = config_keys - set(child.data.params)
        assert not missing, (row["trial"], sorted(missing))
        assert child.data.params["train.lr"] == row["train.lr"]
        history = client.get_metric_history(child.info.run_id, "val_avg_k_accuracy")
        if row["status"] == "FINISHED":
            assert len(history) == int(row["epochs"]), (row, history)
        else:
            # ASHA's stop reaches the worker after its report: the worker may finish (and log) the
            # epoch in flight before it is killed, which Tune never counts.
            assert int(row["epochs"]) <= len(history) <= int(row["epochs"]) + 1, (row, history)

    best = parent.data.tags["avgk.best_trial"]
    assert best == rows[0]["trial"] and by_name[best].info.status == "FINISHED"
    assert parent.data.tags["avgk.best_mlflow_run_id"] == by_name[best].info.run_id
    # one CPU worker per trial: the training ran in the trial's own process (its local checkpoint layout)
    assert (sweep_dir / "trials" / best / "checkpoints" / "latest" / "checkpoint.pt").is_file()
    assert not list((sweep_dir / "trials" / best).glob("checkpoint_*"))
    best_metrics = json.loads((sweep_dir / "trials" / best / "metrics.json").read_text())
    assert set(best_metrics["test"]["avg_k_accuracy"]) == {"1", "2", "3"}
    assert float(parent.data.tags["avgk.best_test_avg_k_accuracy"]) == pytest.approx(
        best_metrics["test"]["avg_k_accuracy"]["2"], abs=1e-6
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.csv", "best_trial"} <= artifacts, artifacts
    best_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "best_trial")}
    assert {"best_trial/metrics.json", "best_trial/thresholds.json"} <= best_artifacts, best_artifacts
    assert "test_avg_k_accuracy_k2" in client.get_run(by_name[best].info.run_id).data.metrics  # the evaluation job

    # ---- resume: the same sweep again re-runs nothing and creates no run
    trial_dirs = sorted(p.name for p in (sweep_dir / "trials").iterdir())
    proc = avgk_tune(smoke_shards, storage, mlflow_server, *SMALL, "evaluate_best=false")
    assert "resuming sweep" in proc.stdout
    assert "epoch 1/2" not in proc.stdout  # no training happened
    assert sorted(p.name for p in (sweep_dir / "trials").iterdir()) == trial_dirs
    parent_again, children_again = run_tree(client, "smoke-sweep")
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert sorted(c.info.run_id for c in children_again) == sorted(c.info.run_id for c in children)
    assert {c.info.run_name: c.info.status for c in children_again} == {r["trial"]: r["status"] for r in rows}


def test_a_trial_on_two_workers_runs_a_torch_trainer(smoke_shards, tmp_path, mlflow_server):
    """More than one worker per trial: each trial's training is a TorchTrainer (its Ray Train checkpoint
    folders), rank 0 logging into the trial's MLflow child run."""
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "two-workers.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "two-worker-sweep", "base": str(ROOT / "configs" / "smoke.yaml"),
        "overrides": {"train.epochs": 1, "train.num_workers": 2, "tracking.log_model": False},
        "space": {"train.lr": {"grid": [0.05]}}, "num_samples": 1, "scheduler": {"name": "fifo"},
        "evaluate_best": False, "trial_cpus": 1,
    }))
    avgk_tune(smoke_shards, tmp_path / "runs", mlflow_server, sweep=sweep)
    (trial,) = (tmp_path / "runs" / "two-worker-sweep" / "trials").iterdir()
    assert list(trial.glob("checkpoint_*")) and not (trial / "checkpoints").exists()
    assert json.loads((trial / "metrics.json").read_text())["test"]["num_samples"] == 400
    _, (child,) = run_tree(MlflowClient(mlflow_server), "two-worker-sweep")
    assert child.info.status == "FINISHED" and "val_avg_k_accuracy" in child.data.metrics


def test_changed_sweep_does_not_resume_into_the_same_folder(smoke_shards, tmp_path, capsys):
    """A sweep folder belongs to one sweep: refused with one line before Ray starts (CLI entry point, in process)."""
    from pipelines import cli

    storage = tmp_path / "runs"
    (storage / "smoke-sweep").mkdir(parents=True)
    (storage / "smoke-sweep" / "sweep.yaml").write_text("sweep: {}\n")
    code = cli.main(["tune", str(SWEEP), f"data.shards={smoke_shards}", f"run.storage={storage}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "holds a sweep with a different configuration" in err and "Traceback" not in err
    import ray

    assert not ray.is_initialized()  # refused before a local cluster started in this process
