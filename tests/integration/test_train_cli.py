"""`avgk train` as a user runs it: 2 DDP workers on the local Ray cluster the command starts, a real
mlflow server, one-line config errors, SIGTERM, and kill -9 of the command followed by the same command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from avgk.runtime import procfs
from tests.helpers.runs import ROOT, SMOKE, checkpoint_dirs, val_history, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _env(mlflow_server: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    env.pop("RAY_ADDRESS", None)  # the command starts its own local cluster, as a user's would
    return env


def _train_command(smoke_shards: Path, storage: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", str(SMOKE), "train.num_workers=2",
            f"data.shards={smoke_shards}", f"run.storage={storage / 'runs'}", *overrides]


@pytest.fixture(scope="module")
def cli_run(smoke_shards, tmp_path_factory, mlflow_server) -> tuple[subprocess.CompletedProcess, Path]:
    """One uninterrupted `avgk train ... train.num_workers=2` (2 epochs), registered as avgk-cli-smoke."""
    storage = tmp_path_factory.mktemp("cli")
    cmd = _train_command(smoke_shards, storage, "run.name=cli2", "tracking.register_model=avgk-cli-smoke")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(mlflow_server), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, storage / "runs" / "cli2"


def test_cli_trains_two_workers_and_logs_one_mlflow_run(cli_run, mlflow_server):
    """`avgk train configs/smoke.yaml train.num_workers=2`, as in the README, against a real mlflow server."""
    proc, run_dir = cli_run
    assert "epoch 2/2" in proc.stdout and "img/s" in proc.stdout  # progress a person can follow
    assert "epoch ends in" in proc.stdout
    # A quiet console: none of the Ray and MLflow lines a user cannot act on (avgk -v shows them).
    noise = re.compile(r"core_worker\.cc|Downloading artifacts|CloudPickle|input example|Token authentication|"
                       r"Creating initial MLflow database")
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if noise.search(line)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ks"] == [1, 2, 3] and metrics["score_head"] == "multilabel"
    assert set(metrics["val"]["thresholds"]) == {"1", "2", "3"}
    test = metrics["test"]
    for key in ("avg_k_accuracy", "macro_avg_k_accuracy", "avg_set_size", "top_k_accuracy",
                "macro_top_k_accuracy", "by_frequency", "oracle_avg_k_accuracy"):
        assert key in test, key
    assert set(test["by_frequency"]) == {"few", "medium", "many"}
    assert test["num_samples"] == 400  # every test sample scored exactly once across the 2 ranks
    assert abs(test["avg_set_size"]["2"] - 2) < 0.5
    table = pq.read_table(run_dir / "per_class.parquet")
    assert table.num_rows == 20 and "avg_k_accuracy@2" in table.column_names
    assert (run_dir / "config.yaml").is_file() and (run_dir / "best" / "checkpoint.pt").is_file()
    assert 1 <= len(checkpoint_dirs(run_dir)) <= 2  # CheckpointConfig(num_to_keep=2)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("avgk")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'cli2'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.name"] == "two_head" and run.data.params["train.num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_avg_k_accuracy")) == 2
    assert "test_avg_k_accuracy_k2" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "per_class.parquet", "thresholds.json"} <= artifacts

    # rank 0 drew the run's plots and logged them; the pyfunc model is logged and registered
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert {"accuracy_vs_k.png", "set_size_k2.png", "per_class_avg_k2.png"} <= set(plots)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots")) == [f"plots/{p}" for p in plots]
    (version,) = client.search_model_versions("name='avgk-cli-smoke'")
    assert version.run_id == run.info.run_id
    assert "pyfunc model logged" in proc.stdout and "registered as avgk-cli-smoke" in proc.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.k=40"], "loss.k must be < number of classes 20, got 40.0"),
        (["loss.nope=1"], "unknown key 'loss.nope'"),
        (["train.lr=-0.1"], "train.lr=-0.1"),
        (["data.source=imagefolder", "data.root=/nonexistent", "data.shards=/nonexistent/shards"], "avgk prepare"),
    ],
)
def test_cli_bad_config_is_one_clear_line(overrides, message, tmp_path, capsys):
    """The CLI's own entry point in process: these fail before Ray or the data is touched."""
    from pipelines import cli

    assert cli.main(["train", str(SMOKE), f"run.storage={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("avgk: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_killed_driver_leaves_nothing_running_and_the_same_command_resumes(smoke_shards, tmp_path, mlflow_server,
                                                                           cli_run):
    """kill -9 of `avgk train` after its first checkpoint: its watcher ends the MLflow run KILLED and
    stops the local Ray cluster it started; the same command then resumes from the last checkpoint
    and ends like the uninterrupted run of the same config."""
    from mlflow.tracking import MlflowClient

    env = _env(mlflow_server)
    run_dir = tmp_path / "runs" / "driver-killed"
    cmd = _train_command(smoke_shards, tmp_path, "run.name=driver-killed", "tracking.log_model=false")
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: run_dir.is_dir() and checkpoint_dirs(run_dir), timeout_s=300, what="the first checkpoint",
                       interval_s=0.5)
            # Ray names its session folder after the process that started the cluster: session_<time>_<pid>.
            session = f"_{driver.pid}/"
            cluster = wait_until(lambda: procfs.naming(session), timeout_s=30, what="the driver's Ray processes")
            os.kill(driver.pid, signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait()
    assert cluster, "no Ray process of the killed driver was seen"

    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name("avgk").experiment_id
    (run,) = client.search_runs([experiment_id], filter_string="attributes.run_name = 'driver-killed'")
    wait_until(lambda: client.get_run(run.info.run_id).info.status == "KILLED", timeout_s=60,
               what="the MLflow run to end KILLED", interval_s=0.5)
    wait_until(lambda: not procfs.naming(session), timeout_s=60, what="the killed driver's Ray processes to stop",
               interval_s=0.5)

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [h["epoch"] for h in val_history(run_dir)] == [1, 2]
    (resumed,) = client.search_runs([experiment_id], filter_string="attributes.run_name = 'driver-killed'")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    logged_epochs = [int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(set(logged_epochs)) == [1, 2]
    assert len(logged_epochs) - 2 <= 1, f"more than one epoch redone: {logged_epochs}"
    final = json.loads((run_dir / "metrics.json").read_text())["test"]
    expected = json.loads((cli_run[1] / "metrics.json").read_text())["test"]
    for key in ("1", "2", "3"):
        assert abs(final["avg_k_accuracy"][key] - expected["avg_k_accuracy"][key]) <= 0.03, (key, final, expected)


def test_sigterm_after_ray_started_still_ends_the_cli_like_ctrl_c(tmp_path):
    """ray.init puts Ray's own SIGTERM handler (a stack dump, then exit) in place of the CLI's;
    ray_env.connect puts the CLI's back, so a terminated command still unwinds: exit 143, one
    line, MLflow runs KILLED. Without the fix this process dies with Ray's stack dump."""
    script = (
        "import time\n"
        "from pipelines import cli, ray_env\n"
        "def slow(args):\n"
        "    ray_env.connect(num_cpus=1)\n"
        "    print('started', flush=True)\n"
        "    time.sleep(120)\n"
        "    return 0\n"
        "cli.cmd_config = slow\n"
        "raise SystemExit(cli.main(['config']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "started":
            proc.kill()
            pytest.fail(f"the command did not start Ray:\n{proc.communicate(timeout=30)[1][-3000:]}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # a hang raises TimeoutExpired
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "avgk: terminated" in err and "SIGTERM received" not in err
