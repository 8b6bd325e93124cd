"""Processes a test session started and did not end: the end-of-suite check of tests/conftest.py.

Linux /proc only (the suite's platform). A process counts as the session's when it started after
the session and descends from the pytest process, or was orphaned (re-parented to init) after
starting during the session with a command line of the programs the suite starts: Ray, MLflow,
the S3 server, avgk itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

from avgk.runtime import procfs

PATTERN = re.compile(r"ray::|raylet|gcs_server|dashboard|runtime_env|log_monitor|monitor\.py|mlflow|gunicorn|uvicorn"
                     r"|weed|moto|avgk|pipelines\.|default_worker|multiprocessing")


ENDS_WITH_PARENT = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
"""Python's helper processes, which exit when the pytest process does (they wait on its pipe)."""


class Snapshot:
    """What ran before the session; `leftovers()` lists what the session left behind."""

    def __init__(self) -> None:
        self.root = os.getpid()
        self.started = procfs.started(self.root)
        self.before = set(procfs.pids())

    def _descends(self, pid: int, parents: dict[int, int]) -> bool:
        seen = set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == self.root:
                return True
        return False

    def leftovers(self) -> dict[int, str]:
        stats = {pid: (procfs.parent(pid), procfs.started(pid))
                 for pid in procfs.pids() if pid != self.root and pid not in self.before}
        stats = {pid: (ppid, start) for pid, (ppid, start) in stats.items() if ppid is not None and start is not None}
        parents = {pid: s[0] for pid, s in stats.items()}
        out = {}
        for pid, (ppid, start) in stats.items():
            if start < self.started:
                continue
            command = procfs.cmdline(pid)
            if not command or any(helper in command for helper in ENDS_WITH_PARENT):
                continue
            if self._descends(pid, parents) or (ppid == 1 and PATTERN.search(command)):
                out[pid] = command
        return out

    def wait_for_exit(self, *, grace: float) -> dict[int, str]:
        """The leftovers still alive after `grace` seconds (processes shutting down get that long)."""
        deadline = time.monotonic() + grace
        left = self.leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.leftovers()
        return left


def kill(pids) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
