"""The CLI's plumbing: its version, SIGTERM unwinding like Ctrl-C, the user's error inside Ray's wrappers."""

from __future__ import annotations

from types import FrameType


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("avgk")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        from avgk import __version__

        return __version__


def root_cause(err: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (TrainingFailedError -> worker or controller error -> cause)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            err = next(iter(inner.values()))
            continue
        cause = err.__cause__ or getattr(err, "cause", None) or getattr(err, "controller_failure", None)
        if isinstance(cause, BaseException):
            err = cause
            continue
        break
    return err


def one_line(err: BaseException) -> str:
    """The error's own first line. A DataLoader worker's error comes back as 'Caught X in DataLoader worker
    process N.' with the worker's traceback below: its last line, 'module.X: message', holds the message."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "in DataLoader worker process" in lines[0]:
        last = next((line for line in reversed(lines) if line.strip()), lines[0])
        name = type(err).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else lines[0]
    return lines[0]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is; a KeyboardInterrupt so every handler that ends
    a run on Ctrl-C (tracking.lifecycle: KILLED) treats it the same."""


terminated = False
"""Set by `terminate`: a library that catches the KeyboardInterrupt and raises its own (Ray Train's
fit does) must not turn a SIGTERM into an exit status of Ctrl-C."""


def terminate(signum: int, frame: FrameType | None) -> None:
    global terminated
    terminated = True
    raise Terminated()
