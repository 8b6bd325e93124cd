"""A watcher process that ends what a killed command leaves behind.

`kill -9`, the OOM killer or a lost node give the CLI no chance to unwind: its MLflow runs stayed
RUNNING forever and the local Ray cluster it had started (GCS, raylet, agents) kept running. While
a command runs, `watching()` keeps a small child process (its own session, so Ctrl-C reaches only
the command) reading the command's pipe. The command tells it what to end should it die: MLflow runs
as they start and end, and the session folder of a local Ray cluster it started. At a normal exit
the command says so; when the pipe closes without that word (the command died), the watcher marks
the still-RUNNING runs KILLED and stops every process whose command line names that session folder,
then exits. Pure OS and MLflow work: no Ray import.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from avgk.runtime import procfs

_DONE = "done"
_watch_enabled = False
_proc: subprocess.Popen[str] | None = None
"""The watcher, started by the first message while `watching()` is active in this process."""


def _send(message: dict[str, Any]) -> None:
    global _proc
    if not _watch_enabled:
        return
    if _proc is None:
        _proc = subprocess.Popen([sys.executable, "-m", "avgk.runtime.guardian", str(os.getpid())], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
    assert _proc.stdin is not None  # stdin=PIPE
    try:
        _proc.stdin.write(json.dumps(message) + "\n")
        _proc.stdin.flush()
    except (BrokenPipeError, ValueError):  # the watcher is gone: nothing to tell
        pass


def run_started(uri: str, run_id: str, *, outbox: str | None = None) -> None:
    """End this MLflow run KILLED if the command dies before `run_ended` (queued in `outbox`, its
    outbox folder, if the tracking server does not answer then)."""
    _send({"run": run_id, "uri": uri, **({"outbox": outbox} if outbox else {})})


def run_ended(run_id: str) -> None:
    _send({"ended": run_id})


def cluster_started(session_dir: str) -> None:
    """Stop the processes of this local Ray cluster (every command line naming the folder) if the command dies."""
    _send({"session_dir": session_dir})


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Runs the block under a watcher, started only once there is something to watch (a run, a
    cluster); nested use reuses the outer one. A normal exit, error or Ctrl-C included, ends it."""
    global _watch_enabled, _proc
    if _watch_enabled:
        yield
        return
    _watch_enabled = True
    try:
        yield
    finally:
        _watch_enabled, proc, _proc = False, _proc, None
        if proc is not None:
            assert proc.stdin is not None  # stdin=PIPE
            try:
                proc.stdin.write(_DONE + "\n")
                proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- the watcher process

def cluster_members(session_dir: str) -> dict[int, int]:
    """pid -> start time of every process naming session_dir (GCS, raylet, dashboard, log monitor) and
    of their descendants (agents and workers rename themselves `ray::...` and are found by parent)."""
    if not procfs.available():
        return {}
    members = procfs.with_descendants(procfs.naming(session_dir, exclude=os.getpid())) - {os.getpid()}
    return {pid: start for pid in members if (start := procfs.started(pid)) is not None}


def stop_processes(members: dict[int, int], *, grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after grace_s, to each pid still running the process recorded (same start
    time: a pid the system reused since is left alone); the pids that outlived both."""
    def alive() -> list[int]:
        return [pid for pid, start in members.items() if procfs.started(pid) == start and procfs.running(pid)]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive():
            return []
    return alive()


def end_runs_killed(runs: dict[str, str], outboxes: dict[str, str] | None = None) -> None:
    """Mark each still-RUNNING run KILLED (a run another command already ended keeps its status), and
    with it its still-RUNNING child runs, at any depth: a sweep's trials open theirs in Ray workers,
    which never talk to this watcher, and die with the cluster. A server that does not answer gets
    the run's end queued in its outbox (`outboxes`: run id -> folder), for the next command or
    `avgk sync`; its children then stay RUNNING."""
    from mlflow.tracking import MlflowClient

    from avgk.runtime import outbox

    outbox.configure_client()  # a hung server costs seconds per run here, not MLflow's minutes
    for run_id, uri in runs.items():
        try:
            client = MlflowClient(tracking_uri=uri)
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                continue
            pending = [run_id]
            while pending:
                parent = pending.pop()
                client.set_terminated(parent, status="KILLED")
                children = client.search_runs(
                    [run.info.experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")
                pending.extend(child.info.run_id for child in children)
        except Exception as err:
            if outboxes and run_id in outboxes and outbox.is_server(uri) and outbox.is_outage(err):
                outbox.remember(run_id, outboxes[run_id])
                with contextlib.suppress(Exception):  # nothing more this process can do
                    outbox.send(outbox.set_terminated, uri, run_id, {"status": "KILLED"})


def _watch(stream: IO[str], *, refresh_s: float = 2.0) -> int:
    """Reads the command's messages; returns 0 on its "done", else cleans up after it and returns 1.

    The cluster's processes are recorded while the command lives, every refresh_s: once it dies,
    Ray's own fate sharing takes the raylet down, and the agents and workers it leaves are no longer
    anyone's descendants by the time they would be looked for.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    runs: dict[str, str] = {}
    outboxes: dict[str, str] = {}
    session_dirs: list[str] = []
    members: dict[int, int] = {}
    while True:
        try:
            line = lines.get(timeout=refresh_s)
        except queue.Empty:
            line = ""
        if line is None:
            break
        line = line.strip()
        if line == _DONE:
            return 0
        if line:
            message = json.loads(line)
            if "run" in message:
                runs[message["run"]] = message["uri"]
                if "outbox" in message:
                    outboxes[message["run"]] = message["outbox"]
            elif "ended" in message:
                runs.pop(message["ended"], None)
            elif "session_dir" in message:
                session_dirs.append(message["session_dir"])
        for session_dir in session_dirs:
            members.update(cluster_members(session_dir))
    # The pipe closed without "done": the command died. Its Ray cluster first (its workers stop logging).
    for session_dir in session_dirs:
        members.update(cluster_members(session_dir))
    stop_processes(members)
    end_runs_killed(runs, outboxes)
    return 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the command must not end the watcher
    raise SystemExit(_watch(sys.stdin))
