"""Locks between the avgk commands of one machine: advisory file locks (flock), released by the
operating system when their process ends, however it ends (kill -9 included): no stale lock.

A lock is named by what it guards (a run directory, a shard folder, a tracking store, the start of
a local Ray cluster); its file lives in $AVGK_LOCK_DIR (default <temp dir>/avgk-locks-<uid>), so that a
lock never adds a file to the folder it guards, and the folder may be remote. Commands on other
machines do not see these locks: a run directory in object storage shared by several machines is
the user's to keep apart (README, "Several commands at once").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

LOCK_DIR_ENV = "AVGK_LOCK_DIR"

_held: dict[str, IO[str]] = {}
"""Locks this process holds until it ends (`claim`), by name: claiming one again is a no-op."""


def _path(name: str) -> Path:
    # One folder per user: another user's lock files are not this user's to open.
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"avgk-locks-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.lock"


def _describe_holder(handle: IO[str]) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return f" ({text})" if text else ""


def _stamp(handle: IO[str]) -> None:
    """Who holds the lock, for the message of a process that finds it taken: 'pid N since HH:MM:SS: avgk demo'."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    program = "avgk" if program in ("avgk", "cli.py") else program  # `python -m pipelines.cli` is avgk too
    command = " ".join([program, *(a for a in sys.argv[1:3] if "=" not in a)])
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}: {command}")
    handle.flush()


@contextlib.contextmanager
def waiting(name: str, *, what: str, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold lock `name` for the block, waiting for another process that holds it; `say` (if given) gets
    one line when this process has to wait: 'waiting for another command that <what>'."""
    with open(_path(name), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is not None:
                say(f"avgk: waiting for another command that {what}{_describe_holder(handle)}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        _stamp(handle)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(name: str) -> str | None:
    """Hold lock `name` until this process ends. None: held now (or already by this process); else
    who holds it ('pid N since HH:MM:SS: avgk VERB ARG'), and nothing is held."""
    if name in _held:
        return None
    handle = open(_path(name), "a+")  # noqa: SIM115  # kept open: the lock lives as long as the file is open
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(handle).strip(" ()") or "another process"
        handle.close()
        return holder
    _stamp(handle)
    _held[name] = handle
    return None


def release(name: str) -> None:
    handle = _held.pop(name, None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
