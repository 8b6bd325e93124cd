"""Real services for integration tests: a local Ray cluster and an `mlflow server`, both on 127.0.0.1."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with a sqlite store; yields its URI, stops it at the end."""
    from tests.helpers.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray session per test module, bound to loopback."""
    import ray

    from pipelines import ray_env

    ray.shutdown()
    ray_env.connect(num_cpus=4)
    yield ray
    ray.shutdown()
