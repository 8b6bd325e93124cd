"""Benchmark: what the retrying filesystem (avgk.runtime.safe_fs) costs on the read path of shards in s3://.

Run: python benchmarks/bench_object_store_reads.py [--objects 4] [--mb 32] [--rounds 3]

Starts a real S3 server on 127.0.0.1 (SeaweedFS, tests/helpers/s3.py, as the tests), uploads --objects
objects of --mb MiB, then reads every object whole, sequentially in 4 MiB requests as a training worker
reads a shard (storage.open_input_stream's buffered reader), through (a) pyarrow's own S3 filesystem,
the read path before the retries, and (b) avgk's storage (the same S3 filesystem behind
safe_fs.retrying). In --rounds rounds of a, b, b, a (ABBA: a drift of the machine's speed within a round
hits both sides alike). Reported: MiB/s per side (median over reads) and the ratio b / a (1.0: free). The
server runs on the same CPUs as the reader; its own CPU time is counted against both sides alike.
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pyarrow.fs as pafs  # noqa: E402

from avgk.runtime import storage  # noqa: E402
from tests.helpers.s3 import S3Server  # noqa: E402

__test__ = False
CHUNK = storage.READ_BUFFER_BYTES


def _read_all(stream: io.BufferedIOBase) -> int:
    total = 0
    while True:
        data = stream.read(1 << 20)  # a tar reader's reads are smaller; the buffered reader fetches CHUNK per request
        if not data:
            return total
        total += len(data)


class _Raw(io.RawIOBase):
    """A pyarrow stream as a raw stream for io.BufferedReader: the read path of avgk's storage before issue 33."""

    def __init__(self, native: object) -> None:
        self._native = native

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        with memoryview(buffer) as view:
            data = self._native.read(len(view))  # type: ignore[attr-defined]
            view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._native.close()  # type: ignore[attr-defined]
        super().close()


def read_native(fs: pafs.FileSystem, path: str) -> int:
    with io.BufferedReader(_Raw(fs.open_input_stream(path)), buffer_size=CHUNK) as stream:
        return _read_all(stream)


def read_avgk(uri: str) -> int:
    with storage.open_input_stream(uri) as stream:
        return _read_all(stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, S3Server(Path(tmp) / "s3") as server:
        os.environ.update(server.env())
        bucket = server.create_bucket("avgk-bench-reads")
        native = server.filesystem()
        uris = []
        for i in range(args.objects):
            uri = f"{bucket}/shard-{i:04d}.tar"
            storage.write_bytes(uri, os.urandom(args.mb << 20))
            uris.append(uri)
        seconds: dict[str, list[float]] = {"pyarrow S3": [], "avgk (retrying)": []}

        def timed(side: str) -> None:
            for uri in uris:
                start = time.perf_counter()
                size = read_native(native, uri.removeprefix("s3://")) if side == "pyarrow S3" else read_avgk(uri)
                seconds[side].append(time.perf_counter() - start)
                assert size == args.mb << 20

        for _ in range(args.rounds):
            for side in ("pyarrow S3", "avgk (retrying)", "avgk (retrying)", "pyarrow S3"):
                timed(side)
    rate = {side: args.mb / statistics.median(values) for side, values in seconds.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                            check=False).stdout.strip()
    print(f"`python benchmarks/bench_object_store_reads.py --objects {args.objects} --mb {args.mb} --rounds "
          f"{args.rounds}`, {date.today()}, commit {commit}, {os.cpu_count()} CPUs")
    print("| read path | MiB/s (median of reads) | reads |")
    print("|---|---:|---:|")
    for side, values in seconds.items():
        print(f"| {side} | {rate[side]:.0f} | {len(values)} |")
    print(f"ratio avgk / pyarrow: {rate['avgk (retrying)'] / rate['pyarrow S3']:.3f}")


if __name__ == "__main__":
    main()
