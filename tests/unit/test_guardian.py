"""avgk.runtime.guardian: a command killed outright (kill -9) leaves no RUNNING MLflow run and no cluster process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avgk.runtime import procfs
from tests.helpers.runs import ROOT, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A stand-in command: two MLflow runs (one it ends itself), a child run of the open one that only
# MLflow knows of (as a sweep's trials open theirs in Ray workers), a "cluster" process whose command line
# names a session folder (as Ray's GCS, raylet and agents name theirs), and a child of that process
# that does not (as Ray's renamed workers), then it waits to be killed or told to exit.
DRIVER = """
import subprocess, sys, time
from mlflow.tracking import MlflowClient
from avgk.runtime import guardian
uri, session_dir, mode = sys.argv[1:4]
client = MlflowClient(uri)
experiment = client.create_experiment("e")
with guardian.watching():
    open_run = client.create_run(experiment, run_name="open").info.run_id
    ended_run = client.create_run(experiment, run_name="ended").info.run_id
    guardian.run_started(uri, open_run)
    guardian.run_started(uri, ended_run)
    client.set_terminated(ended_run, "FINISHED")
    guardian.run_ended(ended_run)
    child_run = client.create_run(experiment, run_name="trial", tags={"mlflow.parentRunId": open_run}).info.run_id
    cluster = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        "time.sleep(300)", session_dir])
    guardian.cluster_started(session_dir)
    print(open_run, ended_run, child_run, cluster.pid, flush=True)
    if mode == "wait":
        time.sleep(300)
"""


def _descendants(pid: int) -> set[int]:
    return procfs.with_descendants({pid}) - {pid}


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, str, str, str, str, int, set[int]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    session_dir = str(tmp_path / "session_fake")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, uri, session_dir, mode], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    open_run, ended_run, child_run, cluster = driver.stdout.readline().split()
    cluster_pid = int(cluster)
    wait_until(lambda: _descendants(cluster_pid), timeout_s=30, what="the cluster stand-in's child")
    return driver, uri, open_run, ended_run, child_run, cluster_pid, _descendants(cluster_pid)


def _status(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.status


@pytest.mark.slow  # a real command, its watcher and a stand-in cluster: seconds of process start-up
def test_kill_9_of_the_command_ends_its_open_run_and_its_child_runs_killed_and_stops_its_cluster(tmp_path):
    driver, uri, open_run, ended_run, child_run, cluster_pid, cluster_children = _start(tmp_path, "wait")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    processes = {cluster_pid, *cluster_children}
    wait_until(lambda: not any(procfs.running(pid) for pid in processes), timeout_s=60,
               what="the cluster processes to stop")
    wait_until(lambda: _status(uri, open_run) == "KILLED", timeout_s=60, what="the open run to end KILLED")
    wait_until(lambda: _status(uri, child_run) == "KILLED", timeout_s=30, what="its child run to end KILLED")
    assert _status(uri, ended_run) == "FINISHED"  # a run the command ended keeps its status


@pytest.mark.slow
def test_a_normal_exit_leaves_runs_and_processes_to_the_command(tmp_path):
    driver, uri, open_run, _ended_run, child_run, cluster_pid, cluster_children = _start(tmp_path, "exit")
    try:
        assert driver.wait(timeout=60) == 0
        time.sleep(2)  # a watcher that wrongly cleaned up would have done so by now
        assert procfs.running(cluster_pid) and all(procfs.running(pid) for pid in cluster_children)
        assert _status(uri, open_run) == _status(uri, child_run) == "RUNNING"  # the command's own business
    finally:
        for pid in (*cluster_children, cluster_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_no_watcher_process_without_watching_or_without_anything_to_watch():
    from avgk.runtime import guardian

    guardian.run_started("sqlite:///unused.db", "run")  # outside watching(): ignored, nothing started
    assert guardian._proc is None
    with guardian.watching():
        pass
    assert guardian._proc is None and not Path("unused.db").exists()
