"""Mirror a folder between a local disk and an object store (s3://, gs://, any pyarrow URI), one way.

avgk streams shards from a bucket itself (data.shards=s3://...), but reads pretrained weights
(model.pretrained) from local disk only, so every node pulls them before Ray starts on it:

    python /app/infra/sync_data.py s3://my-avgk-bucket/avgk/weights /home/ray/data   # on a node (the image has it)

As an option (infra/README.md, step 3), nodes with fast disks and a slow or per-request-charged
link to the bucket pull the shards once the same way and train with data.shards=<local folder>;
and a workstation can push shards prepared locally:

    python infra/sync_data.py data/plantnet300k s3://my-avgk-bucket/avgk/data/plantnet300k

Files missing at the destination, or of another size, are copied; nothing is deleted.
`manifest.json` files go last, so a folder that holds a manifest holds its shards too.
Standard library and pyarrow only (both in the avgk image); credentials come from the
environment as pyarrow reads them (instance profile, AWS_* variables, ~/.aws).
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

MANIFEST = "manifest.json"


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def sync(source: str, destination: str, *, threads: int = 8) -> list[str]:
    """Copy what `destination` lacks from `source`; return the copied paths, relative to `source`."""
    src_fs, src_root = _resolve(source)
    dst_fs, dst_root = _resolve(destination)
    if src_fs.get_file_info(src_root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{source} is not a folder")
    files = [
        info for info in src_fs.get_file_info(pafs.FileSelector(src_root, recursive=True))
        if info.type == pafs.FileType.File
    ]
    todo: list[tuple[str, str]] = []
    for info in files:
        relative = info.path[len(src_root):].lstrip("/")
        target = f"{dst_root}/{relative}"
        existing = dst_fs.get_file_info(target)
        if existing.type != pafs.FileType.File or existing.size != info.size:
            todo.append((relative, target))

    def copy(item: tuple[str, str]) -> str:
        relative, target = item
        dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(
            f"{src_root}/{relative}", target, source_filesystem=src_fs, destination_filesystem=dst_fs
        )
        return relative

    shards = [item for item in todo if os.path.basename(item[0]) != MANIFEST]
    manifests = [item for item in todo if os.path.basename(item[0]) == MANIFEST]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        copied = list(pool.map(copy, shards))
    copied += [copy(item) for item in manifests]
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="local folder or URI to copy from")
    parser.add_argument("destination", help="local folder or URI to copy to")
    parser.add_argument("--threads", type=int, default=8, help="parallel copies (default 8)")
    args = parser.parse_args(argv)
    copied = sync(args.source, args.destination, threads=args.threads)
    print(f"sync_data: {len(copied)} file(s) copied from {args.source} to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
