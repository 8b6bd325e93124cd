"""Tracking that never stops training: what an MLflow server cannot take now waits in an outbox.

Every record avgk sends to a tracking *server* (http or https URI) goes through `send`: delivered at
once while the server answers; otherwise written, in order, as one JSON file per record into the run's
outbox folder (artifacts copied in beside it), and delivered by the process that owns the run (a
`delivering` block: the command's driver) as soon as the server answers again. The process that first
finds the server gone prints one line, the one that delivers prints one when it is back. Records of a
run never overtake each other: once its outbox holds anything, later records queue behind it.

The outbox of a run with a local run directory is `<run_dir>/tracking_outbox/`; of any other run,
`$AVGK_OUTBOX_DIR/<run id>/` (default ~/.cache/avgk/tracking_outbox/). What a command could not
deliver before it ended stays there for `avgk sync` (or `deliver_all`). Local stores (sqlite:, file
paths) are files on this machine: their records are written at once, as before.

Only an outage queues a record: a refused or hung connection, a timeout, a 5xx answer. Any other
error (a record the server rejects) is raised as always. MLflow's own client retries every request
for minutes; `configure_client` shortens that (unless the user set the variables) so that one record
costs at most a few seconds before it is queued.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from avgk.runtime import console

OUTBOX_DIR = "tracking_outbox"
OUTBOX_ENV = "AVGK_OUTBOX_DIR"
_LOCK = ".lock"
_RECORD_SUFFIX = ".json"
_REJECTED_SUFFIX = ".rejected"

CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
"""MLflow's defaults retry a request for 3-4 minutes (7 tries, back-off factor 2, 120 s timeout):
a training would wait that long on every epoch's record, and Ctrl-C as long. One retry and a 5 s
timeout (of a silent connection, not of an upload) make an outage cost one record about 11 s at
most, then nothing: the outbox does the waiting."""

_RETRY_S = (2.0, 5.0, 10.0, 20.0, 30.0)
REPROBE_S = 30.0
"""A process that found the server away and has nothing waiting tries it directly again after this long."""
"""Seconds between a deliverer's tries while the server does not answer (the last one repeats)."""

_owned: dict[str, Path] = {}
"""Run id -> outbox folder, for the runs this process knows (`attach`)."""
_down_since: dict[str, float] = {}
"""Tracking URI -> when this process found it not answering (absent: answering, as far as it knows)."""
_unwritable: set[str] = set()
"""Outbox folders this process could not write a record into (said once)."""
_state_lock = threading.RLock()
_sequence = itertools.count()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def configure_client() -> None:
    """MLflow's HTTP retries and timeout as in CLIENT_DEFAULTS, unless the environment sets them."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def default_root() -> Path:
    return Path(os.environ.get(OUTBOX_ENV) or Path.home() / ".cache" / "avgk" / OUTBOX_DIR)


def attach(run_id: str, run_dir: str | None) -> Path:
    """Where run `run_id`'s records wait, remembered for this process: <run_dir>/tracking_outbox for a
    local run directory, else default_root()/<run id>."""
    folder = Path(run_dir) / OUTBOX_DIR if run_dir and "://" not in run_dir else default_root() / run_id
    remember(run_id, folder)
    return folder


def remember(run_id: str, folder: str | Path) -> None:
    with _state_lock:
        _owned[run_id] = Path(folder)


def folder_of(run_id: str) -> Path:
    with _state_lock:
        return _owned.get(run_id) or default_root() / run_id


_CONNECTION_TROUBLE = re.compile(r"Max retries exceeded|Connection(Error| refused| reset|Reset)|timed out|Timeout|"
                                 r"RemoteDisconnected|Connection aborted|NewConnectionError|Temporary failure")
"""What requests says, inside MLflow's "API request to ... failed with exception ..." wrapper, when nothing answered."""


def _is_outage_status(status: int) -> bool:
    return status == 429 or (status >= 500 and status != 501)  # throttled, or a server (or its proxy) in trouble


def is_outage(err: BaseException) -> bool:
    """Whether `err` says the server is away (no connection, a hung one, a 5xx or 429 status), not that it
    refused a record (any other answer)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, requests.exceptions.HTTPError):  # the artifact proxy's uploads raise these
        return err.response is not None and _is_outage_status(err.response.status_code)
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        if isinstance(err.__cause__, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError)):
            return True
        message = str(err)
        code = re.search(r"failed with error code (\d{3})", message)  # a non-JSON error page (a proxy's)
        if code:
            return _is_outage_status(int(code.group(1)))
        if message.startswith("API request to ") and " failed with " in message:
            return bool(_CONNECTION_TROUBLE.search(message))  # the client's wrapper of any exception
        status: int = err.get_http_status_code()  # type: ignore[no-untyped-call]
        return _is_outage_status(status)
    return False


def set_terminated(uri: str, run_id: str, *, status: str) -> None:
    """A run's final status (here, not in avgk.records, so that the guardian can queue it too)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def pending(folder: Path) -> list[Path]:
    """The records waiting in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == _RECORD_SUFFIX)


def _name_of(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(name: str) -> Callable[..., Any]:
    """The function a record names: avgk's own only (a record is a file anyone with the folder could write)."""
    module, _, qualname = name.partition(":")
    if not module.startswith("avgk.") or not qualname:
        raise ValueError(f"a tracking record names {name!r}: only avgk's own functions are called")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target  # type: ignore[no-any-return]


def _enqueue(folder: Path, fn: Callable[..., Any], uri: str, run_id: str, kwargs: Mapping[str, Any],
             files: Sequence[str]) -> Path | None:
    """One record written atomically (a temporary name, then a rename); the files named by the
    `files` keys of kwargs copied into the outbox, so that a temporary folder may go. None: it could not
    be written (a full disk): said once, and the work goes on without it."""
    stem = f"{time.time_ns():020d}-{os.getpid()}-{next(_sequence):06d}"
    arguments = dict(kwargs)
    for attempt in range(3):  # a deliverer may remove the emptied folder between our mkdir and our write
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for key in files:
                source = Path(kwargs[key])
                copy = folder / "files" / stem / source.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, copy, dirs_exist_ok=True)
                else:
                    shutil.copy2(source, copy)
                arguments[key] = str(copy)
            record = {"call": _name_of(fn), "uri": uri, "run_id": run_id, "kwargs": arguments}
            tmp = folder / f".{stem}.tmp"
            tmp.write_text(json.dumps(record))
            final = folder / f"{stem}{_RECORD_SUFFIX}"
            tmp.rename(final)
            return final
        except FileNotFoundError:
            if attempt == 2:
                raise
        except OSError as err:  # no space for the record: tracking must not stop the work either
            with _state_lock:
                first = str(folder) not in _unwritable
                _unwritable.add(str(folder))
            if first:
                console.say(f"avgk: a tracking record could not be kept in {folder} ({err.strerror or err}): "
                            "records are dropped while that lasts; the run directory has the results")
            return None
    return None


def _went_away(uri: str, folder: Path, err: BaseException) -> None:
    with _state_lock:
        if uri in _down_since:
            return
        _down_since[uri] = time.monotonic()
    reason = str(err).splitlines()[0][:160] if str(err) else err.__class__.__name__
    console.say(f"avgk: tracking server {uri} does not answer ({reason}); its records wait in {folder} "
                "and are sent when it answers again: the work goes on")


class Sent(NamedTuple):
    delivered: bool
    """False: queued in the run's outbox."""
    value: Any = None
    """What the call returned, when delivered."""


def send(fn: Callable[..., Any], uri: str, run_id: str, kwargs: Mapping[str, Any], *, files: Sequence[str] = ()) -> Sent:
    """fn(uri, run_id, **kwargs) now, or queued for run `run_id` if its server does not answer (or
    older records of that run still wait). `fn` must be a module-level function (a queued record
    names it) and kwargs JSON values. `files`: keys of kwargs naming a local file or folder to keep
    a copy of when queued. Local stores are called directly."""
    if not is_server(uri):
        return Sent(True, fn(uri, run_id, **kwargs))
    configure_client()
    folder = folder_of(run_id)
    with _state_lock:
        since = _down_since.get(uri)
        # Away, as far as this process knows; a worker never delivers, so once the driver has emptied the
        # outbox it tries the server again itself, at most every REPROBE_S.
        away = since is not None and time.monotonic() - since < REPROBE_S
    if not away and not pending(folder):
        try:
            value = fn(uri, run_id, **kwargs)
        except Exception as err:
            if not is_outage(err):
                raise
            if since is not None:  # still away: the next probe in REPROBE_S
                with _state_lock:
                    _down_since[uri] = time.monotonic()
            else:
                _went_away(uri, folder, err)
        else:
            with _state_lock:
                _down_since.pop(uri, None)
            return Sent(True, value)
    _enqueue(folder, fn, uri, run_id, kwargs, files)
    return Sent(False)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[bool]:
    """An advisory lock on the outbox, so that two processes never deliver the same record; False: taken."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / _LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def deliver(folder: Path) -> tuple[int, int]:
    """Send the records waiting in `folder`, oldest first, until one meets an outage; (sent, left).
    A record is removed only once delivered (a crash in between sends it twice: MLflow keeps the
    same param, tag and artifact, and a metric's duplicate point)."""
    sent = 0
    if not pending(folder):
        return 0, 0
    with _exclusive(folder) as mine:
        if not mine:
            return 0, len(pending(folder))
        for path in pending(folder):
            try:
                record = json.loads(path.read_text())
                uri, call, run_id, kwargs = record["uri"], record["call"], record["run_id"], record["kwargs"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                path.rename(path.with_suffix(_REJECTED_SUFFIX))
                console.say(f"avgk: an unreadable tracking record is kept aside as {path.with_suffix(_REJECTED_SUFFIX)}: "
                            f"{err}")
                continue
            try:
                _resolve(call)(uri, run_id, **kwargs)
            except Exception as err:
                if is_outage(err):
                    with _state_lock:
                        _down_since.setdefault(uri, time.monotonic())
                    return sent, len(pending(folder))
                # Refused (by the server, or as no record of avgk's): kept aside, or it would block the others forever.
                path.rename(path.with_suffix(_REJECTED_SUFFIX))
                console.say(f"avgk: a waiting tracking record for {uri} was refused and is kept aside as "
                            f"{path.with_suffix(_REJECTED_SUFFIX)}: {str(err).splitlines()[0][:200]}")
                continue
            shutil.rmtree(folder / "files" / path.stem, ignore_errors=True)
            path.unlink()
            sent += 1
            with _state_lock:
                back = _down_since.pop(uri, None)
            if back is not None:
                console.say(f"avgk: tracking server {uri} answers again after {time.monotonic() - back:.0f} s: "
                            "delivering its waiting records")
        # Empty now: no folder left in the run directory. Only empty folders are removed (rmdir), so a record
        # another process writes meanwhile stays, and its writer makes the folder again if it has to.
        with contextlib.suppress(OSError):
            (folder / "files").rmdir()
        with contextlib.suppress(OSError):
            if not pending(folder):
                (folder / _LOCK).unlink()
                folder.rmdir()
    return sent, 0


def _left_line(folder: Path, left: int) -> str:
    where = folder.parent if folder.name == OUTBOX_DIR else folder
    return (f"avgk: the tracking server did not answer before the end: {left} record(s) wait in {folder}; "
            f"send them once it answers with `avgk sync {where}`")


@dataclass
class Delivery:
    hurry: bool = False
    """Set when the block ends by Ctrl-C or SIGTERM: no waiting for the server at the end."""


@contextlib.contextmanager
def delivering(uri: str, run_id: str, *, flush_s: float = 10.0) -> Iterator[Delivery]:
    """While the block runs, deliver run `run_id`'s waiting records in the background (its workers'
    included) whenever its server answers; at the end, try for up to `flush_s` more (none if the
    block set `hurry`), then say in one line what is left and how to send it. Records are kept
    whatever happens."""
    delivery = Delivery()
    if not is_server(uri):
        yield delivery
        return
    configure_client()
    folder = folder_of(run_id)
    stop = threading.Event()

    def loop() -> None:
        tries = 0
        while not stop.wait(_RETRY_S[min(tries, len(_RETRY_S) - 1)]):
            if not pending(folder):
                tries = 0
                continue
            with contextlib.suppress(Exception):  # an unreadable record: the final flush reports it
                _, left = deliver(folder)
                tries = tries + 1 if left else 0

    thread = threading.Thread(target=loop, name=f"avgk-outbox-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield delivery
    finally:
        stop.set()
        thread.join(timeout=0.1 if delivery.hurry else 15.0)
        with _state_lock:
            away = uri in _down_since
        # The run directory's outbox, and those of the runs below it (a pipeline's cells and stage runs).
        folders = outboxes(folder.parent) if folder.name == OUTBOX_DIR and folder.parent.is_dir() else [folder]
        folders = folders if folder in folders else [folder, *folders]
        answering = not (delivery.hurry and away)
        for each in folders:
            left = len(pending(each))
            if left and answering:
                try:  # the first folder gets the wait; once the server is known away, the others are only counted
                    left = flush(each, timeout_s=0.0 if delivery.hurry or each != folder else flush_s)
                except Exception as err:  # never mask the block's own outcome; the records stay
                    console.say(f"avgk: the tracking records in {each} could not be delivered: {err}")
                    left = len(pending(each))
                answering = not left
            if left:
                console.say(_left_line(each, left))


def flush(folder: Path, *, timeout_s: float) -> int:
    """Deliver `folder`'s records, retrying for up to `timeout_s` while the server does not answer; how many are left."""
    deadline = time.monotonic() + timeout_s
    tries = 0
    while True:
        _, left = deliver(folder)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(min(_RETRY_S[min(tries, len(_RETRY_S) - 1)], max(0.0, deadline - time.monotonic())))
        tries += 1


def outboxes(root: Path) -> list[Path]:
    """Every outbox folder under `root` (a run directory, a pipeline's or study's folder of runs, or
    the default root itself), or `root` if it is one."""
    if root.name == OUTBOX_DIR or (root.parent == default_root() and root.is_dir()):
        return [root]
    found = sorted(p for p in root.rglob(OUTBOX_DIR) if p.is_dir())
    if root == default_root() and root.is_dir():
        found = sorted(p for p in root.iterdir() if p.is_dir())
    return found


def deliver_all(root: Path, *, timeout_s: float = 0.0) -> tuple[int, int]:
    """Deliver every outbox under `root`; (sent, left)."""
    sent = left = 0
    for folder in outboxes(root):
        before = len(pending(folder))
        still = flush(folder, timeout_s=timeout_s)
        sent += before - still
        left += still
    return sent, left
