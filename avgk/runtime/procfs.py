"""What Linux's /proc says about processes: pid lists, parent, start time, state, command line,
descendants. Used by avgk.runtime.guardian to find a killed command's cluster, and by the test suite's
end-of-session checks. Every reader returns None/"" for a process that is gone."""

from __future__ import annotations

import os
from pathlib import Path


def available() -> bool:
    return Path("/proc/self/stat").exists()


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def started(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the pid, identifies a process (pids are reused)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    fields = _stat_fields(pid)
    if not fields:
        return False
    return fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def naming(text: str, *, exclude: int | None = None) -> set[int]:
    """The processes whose command line contains `text`."""
    return {pid for pid in pids() if pid != exclude and text in cmdline(pid)}


def with_descendants(roots: set[int]) -> set[int]:
    """`roots` and every process descending from one of them."""
    parents = {pid: ppid for pid in pids() if (ppid := parent(pid)) is not None}
    found, grew = set(roots), True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found
