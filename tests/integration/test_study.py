"""`avgk study` end to end on a tiny grid: Ray tasks, an MLflow parent with a child per cell, summary, resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.helpers.runs import ROOT, mlflow_descendants

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

TINY = f"""\
name: tiny-study
base: {ROOT / 'configs' / 'smoke.yaml'}
overrides:
  data.synthetic.num_train: 400
  data.synthetic.num_val: 200
  data.synthetic.num_test: 200
  data.loader_workers: 0
  train.epochs: 2
  tracking.log_model: false
methods:
  ce: {{loss.name: ce}}
  two_head: {{loss.name: two_head}}
ambiguity_rates: [0, 0.5]
seeds: [0]
reference: ce
max_concurrent: 2
"""


def avgk_study(path, storage, uri, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "study", str(path), f"run.storage={storage}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_study_trains_every_cell_summarises_and_resumes(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    storage = tmp_path / "runs"
    proc = avgk_study(path, storage, mlflow_server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = storage / "tiny-study"
    assert "[7/7]" in proc.stdout and "gain over ce" in proc.stdout  # progress (2 data sets, 4 cells, the summary)

    rows = pd.read_csv(root / "results.csv")
    cells = sorted(zip(rows["method"], rows["ambiguity"], strict=True))
    assert cells == [("ce", 0.0), ("ce", 0.5), ("two_head", 0.0), ("two_head", 0.5)]
    assert rows["epochs"].tolist() == [2] * 4 and (rows["avg_k_accuracy@2"].between(0, 1)).all()
    assert (rows["oracle_avg_k_accuracy@2"] >= rows["avg_k_accuracy@2"] - 0.1).all()
    per_class = pd.read_parquet(root / "per_class.parquet")
    assert len(per_class) == 4 * 20 and {"method", "ambiguity", "seed", "train_count"} <= set(per_class.columns)
    summary = (root / "summary.md").read_text()
    assert "## K = 2" in summary and "gap to the Bayes oracle" in summary and "### two_head" in summary
    plots = sorted(p.name for p in (root / "plots").glob("*.png"))
    assert plots == ["gain_vs_ambiguity_avg_k_accuracy_k2.png", "gain_vs_ambiguity_macro_avg_k_accuracy_k2.png",
                     "gain_vs_frequency_two_head_k2.png"]
    # one data set per ambiguity rate, shared by the methods
    assert sorted(p.name for p in (root / "data").iterdir()) == ["ambiguity-0", "ambiguity-0.5"]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("avgk")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("avgk.kind") == "study" and r.info.run_name == "tiny-study"]
    stages = mlflow_descendants(client, experiment.experiment_id, parent.info.run_id)
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for v in stages.values() for r in v)
    assert parent.data.params["study.name"] == "tiny-study" and "study.methods.two_head" in parent.data.params
    assert sorted(stages) == ["prepare", "prepare/stage", "summary", "train", "train/stage"]
    assert len(stages["prepare"]) == 2
    trained = sorted(c.data.tags["avgk.cell"] for c in stages["train"])
    assert trained == ["train[ce-a0-s0]", "train[ce-a0.5-s0]", "train[two_head-a0-s0]", "train[two_head-a0.5-s0]"]
    for child in stages["train"]:
        assert "test_avg_k_accuracy_k2" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "val_avg_k_accuracy")) == 2
    (summary_run,) = stages["summary"]
    assert {"summary.md", "results.csv", "plots"} <= {a.path for a in client.list_artifacts(summary_run.info.run_id)}
    assert "graph.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # ---- rerun: nothing retrains, no new MLflow run
    again = avgk_study(path, storage, mlflow_server)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reused 7 finished cell(s)" in again.stdout and "[1/" not in again.stdout
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == len(runs)

    # ---- a changed study reruns what it changes, nothing else: here only the summary (another reference)
    path.write_text(TINY.replace("reference: ce", "reference: two_head"))
    changed = avgk_study(path, storage, mlflow_server)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "reused 6 finished cell(s)" in changed.stdout and "[1/1] summary finished" in changed.stdout
    assert "gain over two_head" in (root / "summary.md").read_text()
