"""Shared fixtures: tiny synthetic shards built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray resolves "127.0.0.1" in a cluster address to the machine's routable address unless told it
# runs single-host; tests must stay on loopback (a simulated multi-node cluster included).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# `make test` runs two pytest processes; local clusters they start at the same moment must not both take 8265.
os.environ.setdefault("AVGK_DASHBOARD_PORT", "0")
# Two test processes (and their commands' processes) share two cores: one OpenMP thread each, or their
# threads spin-wait against each other (set before anything imports torch; subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train starts an actor per training that watches for cloud-node preemption (draining nodes); a
# local test cluster is never drained, and the actor's start-up is CPU the two cores need.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from tests.helpers.runs import ROOT

SHARED_FILES = {path: "predict_smoke_run" for path in ("tests/unit/test_predict.py", "tests/unit/test_serving.py",
                                                       "tests/integration/test_serving.py", "tests/integration/test_pyfunc.py",
                                                       "tests/integration/test_predict_job.py",
                                                       "tests/integration/test_ray_serve.py")}
"""Files that use a session fixture costly enough to build once per run (`predict_smoke_run`, a trained run):
one process runs them all."""


def pytest_xdist_make_scheduler(config, log):
    """Whole files to each process, longest first (tests/helpers/scheduling.py); a file's module fixtures,
    such as its Ray cluster or trained run, are built once."""
    from tests.helpers.scheduling import FileScheduling

    return FileScheduling(config, log, groups=SHARED_FILES)


def pytest_configure(config):
    # avgk.data.decoding silences this for the process; pytest re-enables DeprecationWarnings per test.
    # torchvision 0.29 warns on every call of its (deprecated, still shipped) image decoders.
    config.addinivalue_line(
        "filterwarnings", "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _object_store_patience_is_per_test(monkeypatch):
    """avgk's object-store retries turn patient for the rest of a process once a store answered it
    (avgk.runtime.safe_fs.ANSWERED_ENV): right for a job, a leak between tests that share a process."""
    from avgk.runtime import safe_fs

    monkeypatch.delenv(safe_fs.ANSWERED_ENV, raising=False)


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """Shards of configs/smoke.yaml's synthetic data, written once."""
    from avgk.config import load_config
    from avgk.data.prepare import prepare

    shards = tmp_path_factory.mktemp("smoke") / "shards"
    config = load_config(ROOT / "configs" / "smoke.yaml", [f"data.shards={shards}"])
    prepare(config)
    return shards


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, tests/helpers/s3.py) on 127.0.0.1, stopped at the end."""
    from tests.helpers.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The standard AWS_* variables pointing at `s3_server`, for one test module; request it before
    local_ray so the local Ray cluster's workers inherit them, as cluster nodes get theirs."""
    patch = pytest.MonkeyPatch()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        patch.setenv(key, value)
    yield s3_server
    patch.undo()


@pytest.fixture(scope="session")
def predict_smoke_run(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, run directory) of one in-process smoke training: the prediction and pyfunc tests' model."""
    from tests.helpers.runs import prepare_shards, train_smoke_run

    shards = prepare_shards(tmp_path_factory.mktemp("predict_data") / "shards")
    return shards, train_smoke_run(shards, tmp_path_factory.mktemp("predict_runs"))


_SNAPSHOT = None
_LISTENERS = None
_PROBLEMS: list[str] = []
"""What the end-of-session checks found: printed in the terminal summary (the end of the output, where
CI shows it), and the session fails."""
# MLflow's default stores: a test that opens MLflow without a tracking URI writes them into the working directory.
_STRAY_STORES = ("mlflow.db", "mlruns")
_STORES_BEFORE: set[Path] = set()


def pytest_sessionstart(session):
    global _SNAPSHOT, _LISTENERS
    _STORES_BEFORE.update(p for name in _STRAY_STORES for p in (Path.cwd() / name, ROOT / name) if p.exists())
    if Path("/proc/self/stat").exists():
        from tests.helpers.leftovers import Snapshot
        from tests.helpers.listeners import ListenerWatch

        _SNAPSHOT = Snapshot()
        _LISTENERS = ListenerWatch(session_start_ticks=_SNAPSHOT.started)


def pytest_sessionfinish(session, exitstatus):
    """Fail the suite if it left an MLflow store in the working directory or the repository, if a
    process it started opened a listener on an address other than loopback, or if a process it
    started outlives it (then end that process, so nothing stays)."""
    stray = sorted({p for name in _STRAY_STORES for p in (Path.cwd() / name, ROOT / name) if p.exists()} - _STORES_BEFORE)
    if stray:
        _PROBLEMS.append(f"the test session left MLflow stores behind: {[str(p) for p in stray]}")
    if _LISTENERS is not None:
        exposed = _LISTENERS.stop()
        if exposed:
            _PROBLEMS.append(f"{len(exposed)} listener(s) opened by the test session on a non-loopback address:\n"
                             + "\n".join(f"  {endpoint} by {owner}" for endpoint, owner in sorted(exposed.items())))
    if _SNAPSHOT is not None:
        from tests.helpers.leftovers import kill

        left = _SNAPSHOT.wait_for_exit(grace=15.0)
        if left:
            _PROBLEMS.append("\n".join([f"{len(left)} process(es) started by the test session outlived it (now killed):"]
                                       + [f"  pid {pid}: {command[:200]}" for pid, command in sorted(left.items())]))
            kill(left)
    if _PROBLEMS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for problem in _PROBLEMS:
        terminalreporter.write_line(f"END-OF-SESSION CHECK FAILED: {problem}", red=True)
