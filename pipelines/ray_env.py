"""Connecting to Ray: the cluster in RAY_ADDRESS, else a local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

import ray


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
        _node_ip_address="127.0.0.1",
        num_cpus=cpus,
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls;
        # without it the driver prints a warning every few seconds.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        **common,
    )
