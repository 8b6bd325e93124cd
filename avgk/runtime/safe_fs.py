"""Filesystems that survive the faults of real storage: an object store that goes away for a while,
a local disk that fills up.

`retrying(fs)` wraps a pyarrow filesystem (S3, GCS) so that each operation that fails for want of an
answer (no connection, a timeout, a 5xx or a throttle) is tried again, 0.5 s after the first failure,
then doubling up to 10 s, until it succeeds or `budget_s()` seconds have passed since the first
failure; then one OutageError names the URI and the time waited. Errors that an answer gave (access
denied, no such bucket or key) are raised at once. Reads resume where they stopped: a stream that
breaks mid-shard is reopened at its offset. Writes go to a local temporary file and are uploaded whole
at close, so that a failed upload can be tried again (an object store publishes an object at close anyway).

`atomic_local()` is the local filesystem with every written file published by a rename at close: a
write that fails (no space left) leaves the previous file in place, never a truncated one. Ray Train
writes its checkpoint index (checkpoint_manager_snapshot.json) in place; through this filesystem a
full disk no longer leaves it empty, which made the run impossible to resume.

The budget is $AVGK_OBJECT_STORE_RETRY_S (default 180 s), set from the config's
run.object_store_retry_s by every process of a job; it is separate from Ray Train's
train.max_failures, which is meant for workers that die.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

BUDGET_ENV = "AVGK_OBJECT_STORE_RETRY_S"
ANSWERED_ENV = "AVGK_OBJECT_STORE_ANSWERED"
DEFAULT_BUDGET_S = 180.0

T = TypeVar("T")

_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|Could not connect|Couldn't connect|Failed to connect|Connection refused|Connection reset|connection was "
    r"closed|timed out|Timeout|TIMEOUT|SERVICE_UNAVAILABLE|ServiceUnavailable|SLOW_DOWN|SlowDown|INTERNAL_FAILURE|"
    r"InternalError|Unable to connect|curlCode: (6|7|28|52|55|56)|HTTP response code: 5\d\d|HTTP status (5\d\d|429)|"
    r"Broken pipe",
)
"""Messages of pyarrow's S3/GCS errors that mean no (or no useful) answer: worth another try."""


class OutageError(OSError):
    """The object store did not answer within the budget: the job stops (a shard is not skipped for it)."""


def budget_s() -> float:
    value = os.environ.get(BUDGET_ENV)
    return float(value) if value else DEFAULT_BUDGET_S


def is_transient(err: BaseException) -> bool:
    return isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and bool(_TRANSIENT.search(str(err)))


def with_retries(what: str, call: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """call() until it succeeds, an answer says no, or the budget is spent since its first failure.

    Patient only once an object store has answered this job (this process, or the driver that started
    it: ANSWERED_ENV): a store never reached is a setup error (a wrong endpoint, no network), told at once,
    not after the budget; a dry run of a pipeline whose bucket is unreachable says so in seconds."""
    first_failure: float | None = None
    delay = 0.5
    while True:
        try:
            result = call()
        except OSError as err:
            if not is_transient(err) or not answered():
                raise
            now = clock()
            first_failure = now if first_failure is None else first_failure
            budget = budget_s()
            if now - first_failure + delay > budget:
                raise OutageError(f"{what}: the object store did not answer for {now - first_failure:.0f} s "
                              f"({BUDGET_ENV}={budget:g} s, run.object_store_retry_s): "
                              f"{' '.join(str(err).split())[:240]}") from None
            sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        if ANSWERED_ENV not in os.environ:
            os.environ[ANSWERED_ENV] = "1"  # inherited by the processes this one starts (Ray passes it on too)
        return result


def answered() -> bool:
    """Whether an object store has answered this process, or the driver of its job, at least once."""
    return os.environ.get(ANSWERED_ENV) == "1"


class ResumingReader:
    """A read-only file over `fs.open_input_file(path)` that reopens at its offset when a read fails."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self._fs, self._path = fs, path
        self._file = with_retries(path, lambda: fs.open_input_file(path))
        self._pos = 0
        self.closed = False

    def _reopen(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = self._fs.open_input_file(self._path)
        self._file.seek(self._pos)

    def read(self, nbytes: int | None = None) -> bytes:
        broken = False

        def call() -> bytes:
            nonlocal broken
            if broken:  # the connection under the last read failed: a new one, at the same offset
                self._reopen()
            try:
                data: bytes = self._file.read() if nbytes is None or nbytes < 0 else self._file.read(nbytes)
            except OSError:
                broken = True
                raise
            return data

        data = with_retries(self._path, call)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            offset += self.size()
        self._file.seek(offset)
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return int(with_retries(self._path, self._file.size))

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()


class _WriteOnlyFile:
    """A write-only file object for pa.PythonFile over a local file `_file`, published by the subclass's
    close(); a failed write marks it `_failed`, so that close() never publishes a partial file."""

    _file: IO[bytes]
    _failed: bool

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError:
            self._failed = True
            raise

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class _UploadAtClose(_WriteOnlyFile):
    """A write-only file spooled to local disk and uploaded whole at close, tried again on a blip."""

    def __init__(self, fs: pafs.FileSystem, path: str, metadata: Any) -> None:
        self._fs, self._path, self._metadata = fs, path, metadata
        self._file = tempfile.NamedTemporaryFile(prefix="avgk-upload-", delete=False)  # noqa: SIM115  # closed in close()
        self._failed = False
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._file.close()
        except OSError:
            self._failed = True
        if self._failed:
            with contextlib.suppress(OSError):
                os.unlink(self._file.name)
            raise OSError(f"{self._path}: not uploaded, its local spool file {self._file.name} could not be written")
        try:
            def upload() -> None:
                with open(self._file.name, "rb") as source, \
                        self._fs.open_output_stream(self._path, metadata=self._metadata) as target:
                    shutil.copyfileobj(source, target, length=8 << 20)

            with_retries(self._path, upload)
        finally:
            os.unlink(self._file.name)


class RetryingHandler(pafs.FileSystemHandler):  # type: ignore[misc]  # pyarrow ships no stubs for it
    """pyarrow's FileSystemHandler over another filesystem, each call under `with_retries`."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships the filesystem to its workers
        return (RetryingHandler, (self.fs,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingHandler) and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return hash(self.fs.type_name)

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return str(self.fs.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return with_retries(",".join(paths[:3]), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return with_retries(selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        with_retries(path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        with_retries(path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        with_retries(path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        with_retries("/", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        with_retries(path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        with_retries(src, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        with_retries(src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(ResumingReader(self.fs, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(ResumingReader(self.fs, path), mode="r")

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_UploadAtClose(self.fs, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        raise OSError(f"{path}: appending to an object is not supported by object stores")


class _AtomicLocalWriter(_WriteOnlyFile):
    """A local file written under a temporary name beside its path and renamed over it at close; a failed
    write (or a close after one) removes the temporary file and leaves the old one."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._tmp = f"{path}.tmp-{os.getpid()}-{id(self)}"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(self._tmp, "wb")  # noqa: SIM115  # closed in close()
        self._failed = False
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._file.close()  # flushes: a full disk may show only here
        except OSError:
            self._failed = True
            raise
        finally:
            if self._failed:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
        os.replace(self._tmp, self._path)


class AtomicLocalHandler(pafs.FileSystemHandler):  # type: ignore[misc]  # pyarrow ships no stubs for it
    """The local filesystem, its written files published by a rename at close."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def __reduce__(self) -> tuple[Any, ...]:
        return (AtomicLocalHandler, ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __hash__(self) -> int:
        return hash(AtomicLocalHandler)

    def get_type_name(self) -> str:
        return "atomic-local"

    def normalize_path(self, path: str) -> str:
        return str(self.fs.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of / through avgk's local filesystem")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with open(src, "rb") as source:
            target = _AtomicLocalWriter(dest)
            try:
                shutil.copyfileobj(source, target, length=8 << 20)
            except OSError:
                with contextlib.suppress(OSError):
                    target.close()
                raise
            target.close()

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_AtomicLocalWriter(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return self.fs.open_append_stream(path)


def atomic_local() -> pafs.FileSystem:
    return pafs.PyFileSystem(AtomicLocalHandler())


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
"""No space left on the device; disk quota exceeded."""


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk (or the user's quota) is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class DiskFullError(OSError):
    """A write that found no space: one line naming where, the files written before kept."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no space left on the device of {where}: what was written before is kept (the last "
                         "checkpoint included); free space, then run the same command again: it resumes")
        self.where = where

    def __reduce__(self) -> tuple[Any, ...]:  # from a Ray worker to the driver: the same message, not wrapped twice
        return (DiskFullError, (self.where,))


def resuming_reader(fs: pafs.FileSystem, path: str) -> ResumingReader | None:
    """A resuming reader of `path` when `fs` is `retrying`'s (for a caller that reads it sequentially, without
    pyarrow's Python-file adapter in between); None for any other filesystem."""
    handler = getattr(fs, "handler", None) if isinstance(fs, pafs.PyFileSystem) else None
    return ResumingReader(handler.fs, path) if isinstance(handler, RetryingHandler) else None


def retrying(fs: pafs.FileSystem) -> pafs.FileSystem:
    """`fs` with every call retried within the budget (see the module docstring); local filesystems as they are."""
    if isinstance(fs, (pafs.LocalFileSystem, pafs.PyFileSystem)):
        return fs
    return pafs.PyFileSystem(RetryingHandler(fs))
