"""Connecting to Ray: the cluster in RAY_ADDRESS, else a local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket

import ray


DASHBOARD_PORT = 8265


def _free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it on loopback, else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(*, num_cpus: float | None = None, quiet: bool = True) -> None:
    """Join RAY_ADDRESS when set, else start (or reuse) a local Ray bound to loopback."""
    if ray.is_initialized():
        return
    # Workers must import avgk and pipelines the same way the driver does.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}}
    common = dict(
        runtime_env=runtime_env,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=True,
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        return
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    ray.init(
        # "local" starts a new cluster; a bare init() would attach to whatever cluster
        # /tmp/ray/ray_current_cluster names (another job's), then reject num_cpus.
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=cpus,
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls;
        # without it the driver prints a warning every few seconds.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(DASHBOARD_PORT),  # a second local Ray (e.g. a test) must not fail
        configure_logging=True,
        **common,
    )
