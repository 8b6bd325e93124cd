"""Connecting to Ray: the cluster in RAY_ADDRESS, else a local one bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any, TypedDict

import ray

from avgk.runtime import console, guardian, locks, safe_fs
from pipelines import ray_private

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DASHBOARD_PORT_ENV = "AVGK_DASHBOARD_PORT"
"""The local cluster's dashboard port (default 8265, Ray's; 0: any free port). The test suite sets 0:
its two processes start local clusters at the same moment, and both would probe 8265 free."""


def _dashboard_port() -> int:
    value = os.environ.get(DASHBOARD_PORT_ENV, "8265")
    if not value.isdigit() or int(value) > 65535:
        raise ValueError(f"{DASHBOARD_PORT_ENV}={value!r} must be a port number (0: any free port)")
    return int(value)


def free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it on loopback, else (or for 0) any free port."""
    if preferred:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _quiet_console() -> None:
    """Drop console.NOISE lines from what Ray forwards to the driver's console (they stay in Ray's log files)."""
    ray_private.filter_worker_output(NoiseFilter())


class NoiseFilter:
    """Keeps a line unless it is console.NOISE, or console.NOISE_WITH_TRACEBACK and the traceback right after it."""

    def __init__(self) -> None:
        self.in_traceback = False

    def __call__(self, line: str) -> bool:
        if console.NOISE.search(line):
            return False
        if console.NOISE_WITH_TRACEBACK.search(line):
            self.in_traceback = True
            return False
        if self.in_traceback and console.TRACEBACK_LINE.match(line):
            return False
        self.in_traceback = False
        return True


def connect(*, num_cpus: int | None = None, quiet: bool | None = None) -> None:
    """Join RAY_ADDRESS when set, else start (or reuse) a local Ray bound to loopback."""
    if ray.is_initialized():
        return
    with _keeping_sigterm_handler():
        _init(num_cpus=num_cpus, quiet=quiet)


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """ray.init replaces the process's SIGTERM handler with Ray's own (it prints a stack and
    exits), so the CLI's, which unwinds like Ctrl-C and ends the MLflow run KILLED, is put back."""
    handler = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


class _InitOptions(TypedDict):
    """What ray.init gets whether it joins RAY_ADDRESS or starts a local cluster."""

    runtime_env: dict[str, Any]
    logging_level: int
    log_to_driver: bool


def _init(*, num_cpus: int | None, quiet: bool | None) -> None:
    quiet = not console.verbose() if quiet is None else quiet
    if quiet:  # Ray's notice that token authentication is on: it is, by design
        logging.getLogger(ray_private.TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
    # Workers must import avgk and pipelines the same way the driver does.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    for key in (safe_fs.BUDGET_ENV, safe_fs.ANSWERED_ENV):  # run.object_store_retry_s, and whether the store answered
        if os.environ.get(key):
            env_vars[key] = os.environ[key]
    if quiet:  # MLflow's per-file progress bars when the workers log artifacts
        env_vars["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    else:
        env_vars[console.VERBOSE_ENV] = "1"
    common: _InitOptions = {
        "runtime_env": {"env_vars": env_vars},
        "logging_level": logging.WARNING if quiet else logging.INFO,
        "log_to_driver": True,
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        if quiet:
            _quiet_console()
        return
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    # Commands starting local clusters at the same moment would each find the dashboard port free and
    # then collide on it: the starts on one machine take turns (a few seconds each).
    with locks.waiting("local Ray cluster start", what="starts a local Ray cluster"):
        dashboard_port = free_port(_dashboard_port())
        # Ray's own state queries (Ray Train's placement-group cleaner) look for "the" local cluster and fail
        # when another command runs one too: they are pointed at this cluster's dashboard.
        env_vars[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
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
            dashboard_port=dashboard_port,  # a second local Ray (e.g. a test) must not fail
            configure_logging=True,
            **common,
        )
    # This command started the cluster: should it be killed outright, its watcher stops the cluster.
    context = ray.get_runtime_context()  # the session folder, as Ray's node names it: <temp dir>/<session name>
    guardian.cluster_started(os.path.join(context.get_temp_dir(), context.get_session_name()))
    if quiet:
        _quiet_console()
