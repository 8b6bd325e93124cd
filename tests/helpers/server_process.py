"""The process group of a test's own server (started with start_new_session=True): ended, frozen, thawed."""

from __future__ import annotations

import os
import signal
import subprocess


def end_group(proc: subprocess.Popen, *, grace_s: float) -> None:
    """SIGCONT (a frozen server would not act on SIGTERM), SIGTERM, then SIGKILL after grace_s."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP: connections are accepted by the kernel, nothing answers (a hung server)."""
    os.killpg(proc.pid, signal.SIGSTOP)


def thaw(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGCONT)
