"""`ray job submit` to a real `ray start --head` on 127.0.0.1: step 5 of infra/README.md on one machine.

The head starts the way infra/ray/cluster.yaml starts one (token authentication on, the MLflow
URI in the environment of `ray start`); the job goes in the way the runbook submits it (the
working tree with infra/ray/runtime_env.yaml, `-- avgk train CONFIG key=value ...`); it must
succeed and leave a complete run directory and a finished MLflow run.

Only this test's own Ray processes are ended, by pid: `ray stop` would end every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from avgk.runtime import procfs
from avgk.runtime.guardian import stop_processes
from tests.helpers.runs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent  # the venv's `ray` and `avgk`: the cluster's Python is this one


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _get(url: str, token: str) -> bytes:
    """GET from the dashboard with the cluster's token; HTTP errors raise (URLError is an OSError)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def _processes_of(root_pid: int, temp_dir: Path) -> dict[int, int]:
    """`ray start` and everything it started (its descendants, and what names its temp dir, with theirs):
    pid -> start time, as avgk.runtime.guardian records a cluster."""
    members = procfs.with_descendants({root_pid} | procfs.naming(str(temp_dir)))
    return {pid: start for pid in members if (start := procfs.started(pid)) is not None}


def _stop_cluster(start: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM to `ray start` and every process it started, SIGKILL to what is left after 5 s (`ray start
    --block` and the GCS server outwait a SIGTERM; the cluster holds nothing to save): the mechanism
    avgk.runtime.guardian uses on a killed command's cluster."""
    stop_processes(_processes_of(start.pid, temp_dir))
    stop_processes(_processes_of(start.pid, temp_dir))  # anything started while the first round ran
    start.wait(timeout=10)


@pytest.fixture
def ray_head(tmp_path):
    """A one-node cluster: `ray start --head` on 127.0.0.1, every port free, its own temp dir."""
    # Ray's unix socket paths live under the temp dir and have a length limit: keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    gcs, dashboard, client, agent_http, agent_grpc, env_agent, metrics, node_manager, object_manager = _free_ports(9)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # stay on loopback
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",  # as infra/ray/avgk.env.example sets it, for nodes and submitters
        RAY_AUTH_TOKEN=token,
        # What a cluster node reads from avgk.env before `ray start`: drivers inherit it.
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    log_path = tmp_path / "ray-start.log"
    with open(log_path, "w") as log:
        start = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if start.poll() is not None:
                pytest.fail(f"ray start exited with {start.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                _get(f"{address}/api/jobs/", token)
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the job API at {address} did not answer in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield SimpleNamespace(address=address, env=env, log=log_path)
    finally:
        _stop_cluster(start, temp_dir)
        leftover = [pid for pid in procfs.naming(str(temp_dir)) if procfs.running(pid)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes outlived the test: {leftover}"


def test_ray_job_submit_trains_on_the_cluster(ray_head, tmp_path):
    job_id = f"avgk-smoke-{secrets.token_hex(4)}"
    run_storage = tmp_path / "runs"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head.address,
        "--working-dir", ".", "--runtime-env", "infra/ray/runtime_env.yaml", "--submission-id", job_id,
        "--", "avgk", "train", "configs/smoke.yaml",
        f"run.storage={run_storage}", "run.name=cluster-smoke", f"data.shards={tmp_path / 'shards'}",
        "train.epochs=1", "tracking.log_model=false",
        "data.synthetic.num_train=200", "data.synthetic.num_val=100", "data.synthetic.num_test=100",
        "data.shard_maxcount=50",
    ]
    # The submitter's environment lacks the MLflow URI: only the node's can bring it to the driver.
    submit_env = {k: v for k, v in ray_head.env.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.monotonic()
    proc = subprocess.run(submit, cwd=ROOT, env=submit_env, capture_output=True, text=True, timeout=480)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ray job submit failed after {elapsed:.0f} s:\n{output[-4000:]}"

    job = json.loads(_get(f"{ray_head.address}/api/jobs/{job_id}", ray_head.env["RAY_AUTH_TOKEN"]))
    assert job["status"] == "SUCCEEDED", job
    assert job["entrypoint"].startswith("avgk train configs/smoke.yaml ")

    # The driver ran on the cluster from the uploaded working tree and wrote a whole run directory.
    run_dir = run_storage / "cluster-smoke"
    assert f"run directory: {run_dir}" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]["avg_k_accuracy"]) == {"1", "2", "3"}
    assert (run_dir / "thresholds.json").is_file() and (run_dir / "config.yaml").is_file()

    # MLFLOW_TRACKING_URI reached the driver through the node's environment.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ray_head.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("avgk")
    assert experiment is not None, "no MLflow experiment: the driver did not see MLFLOW_TRACKING_URI"
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert Path(runs[0].data.tags["avgk.run_dir"]).resolve() == run_dir.resolve()
