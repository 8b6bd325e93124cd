"""Real services for integration tests: a local Ray cluster and an `mlflow server`, both on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import free_port, wait_for_http


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with a sqlite store; yields its URI, stops it at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(proc, f"{uri}/health", log_path=root / "server.log", timeout_s=120, name="mlflow server")
        except RuntimeError:
            os.killpg(proc.pid, 9)
            raise
        yield uri
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray session per test module, bound to loopback."""
    import ray

    from pipelines import ray_env

    ray.shutdown()
    ray_env.connect(num_cpus=4)
    yield ray
    ray.shutdown()
