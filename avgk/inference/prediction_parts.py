"""The prediction job's inputs and outputs, without Ray: what to label, how it is cut into parts, and
which parts an earlier run already wrote.

Legend: an input is one image, named by its key (a local path, a URI in a bucket, or a shard set's
sample key). Files go to one of `num_parts` parts by a hash of their key, so adding inputs never
moves the ones already labelled; a shard set's samples go to their shard's part (one part per
shard: the set does not grow, and each part streams from one file). A part is written as one Parquet file, then its record (a JSON
file beside it): the record is what makes the part count as done, and a rerun skips a part only
when its record names the same inputs, the same checkpoint and the same rule (K, top-K).

    OUT/job.json                 the job's parts count (kept by reruns) and what it labels
    OUT/part-00007.parquet       the rows of part 7: source, labels, names, scores, set_size, error
    OUT/part-00007.json          its record: inputs digest, checkpoint, rule, counts
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avgk.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from avgk.inference.predict import IMAGE_SUFFIXES
from avgk.runtime import storage

__all__ = [
    "JOB_FILE", "Inputs", "PartRecord", "checkpoint_identity", "done_parts", "list_inputs", "needs_job", "part_name",
    "part_of", "rows_to_parquet",
]

JOB_FILE = "job.json"
DEFAULT_PARTS = 64


def part_of(key: str, num_parts: int) -> int:
    """The part an input goes to: a stable hash of its key (the same in every process and run)."""
    return zlib.crc32(key.encode("utf-8")) % num_parts


def part_name(part: int) -> str:
    return f"part-{part:05d}"


@dataclass
class Inputs:
    """What one prediction job labels: image files by key (with their sizes), or one split of a shard set."""

    kind: str  # "files" (local or in a bucket) or "shards"
    files: dict[str, int] = field(default_factory=dict)  # key (path or URI) -> size in bytes
    manifest: Manifest | None = None
    split: str | None = None

    @property
    def count(self) -> int:
        if self.manifest is not None and self.split is not None:
            return self.manifest.split(self.split).num_samples
        return len(self.files)

    def digests(self, num_parts: int) -> dict[int, str]:
        """Per part: a digest of the inputs it holds (keys and sizes; a shard set's split by its shard hashes)."""
        if self.manifest is not None and self.split is not None:
            info = self.manifest.split(self.split)
            whole = hashlib.sha256(json.dumps([self.manifest.root, self.split, info.shards, info.shard_sha256])
                                   .encode()).hexdigest()
            return {part: f"{whole}:{part}" for part in range(num_parts)}  # every part reads the whole split
        lines: dict[int, list[str]] = {}
        for key, size in self.files.items():
            lines.setdefault(part_of(key, num_parts), []).append(f"{key}\t{size}")
        return {part: hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest() for part, items in lines.items()}


def needs_job(item: str) -> bool:
    """A bucket prefix or a shard set: labelled by the Ray Data job (pipelines.predict_job), not in process."""
    return storage.is_remote(item) or (Path(item).is_dir() and (Path(item) / MANIFEST_NAME).is_file())


def _is_shard_set(uri: str) -> bool:
    return storage.exists(storage.join(uri, MANIFEST_NAME))


def list_inputs(items: Sequence[str], *, split: str = "test") -> Inputs:
    """The images named by `items`: files or folders on local disk (folders searched recursively), bucket
    prefixes (every image object below), or one shard set (a folder or prefix holding manifest.json)."""
    if not items:
        raise ValueError("predict needs at least one INPUT: image files, folders, a bucket prefix or a shard set")
    shard_sets = [item for item in items if (storage.is_remote(item) or Path(item).is_dir()) and _is_shard_set(item)]
    if shard_sets:
        if len(items) > 1:
            raise ValueError(f"a shard set is labelled alone: {shard_sets[0]} holds {MANIFEST_NAME}, and "
                             f"{len(items) - 1} other input(s) were given")
        manifest = read_manifest(storage.absolute(shard_sets[0]))
        manifest.split(split)  # an unknown split names the known ones
        return Inputs(kind="shards", manifest=manifest, split=split)
    files: dict[str, int] = {}
    for item in items:
        if storage.is_remote(item):
            found = {storage.join(item, rel): size for rel, size in storage.list_files(item).items()
                     if Path(rel).suffix.lower() in IMAGE_SUFFIXES}
            if not found and storage.exists(item):
                found = {item: int(storage.file_info(item).size or 0)}  # one object, named whole
            if not found:
                raise FileNotFoundError(f"{item}: no image below this prefix (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.update(found)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            files.update({str(p.resolve()): p.stat().st_size for p in sorted(path.rglob("*"))
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES})
        elif path.exists():
            files[str(path.resolve())] = path.stat().st_size
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no image file in {list(items)} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return Inputs(kind="files", files=files)


def checkpoint_identity(uri: str) -> dict[str, Any]:
    """What names a checkpoint file for the part records: where it is, its size and modification time."""
    info = storage.file_info(uri)
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return {"path": uri, "size": int(info.size or 0), "mtime": mtime}


@dataclass(frozen=True)
class PartRecord:
    """What a written part was made from; a rerun reuses the part when this is equal."""

    part: int
    num_parts: int
    inputs: str
    checkpoint: Mapping[str, Any]
    rule: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "num_parts": self.num_parts, "inputs": self.inputs,
                "checkpoint": dict(self.checkpoint), "rule": dict(self.rule)}


def done_parts(out: str, wanted: Iterable[PartRecord]) -> set[int]:
    """The parts whose record under `out` equals the wanted one (and whose rows file is there)."""
    done = set()
    for record in wanted:
        name = part_name(record.part)
        record_file = storage.join(out, f"{name}.json")
        if not storage.exists(record_file) or not storage.exists(storage.join(out, f"{name}.parquet")):
            continue
        try:
            written = storage.read_json(record_file)
        except (OSError, ValueError):
            continue  # unreadable: written again
        if {k: written.get(k) for k in record.to_dict()} == record.to_dict():
            done.add(record.part)
    return done


PART_COLUMNS = ("source", "labels", "names", "scores", "set_size", "error")


def rows_to_parquet(rows: Mapping[str, Sequence[Any]]) -> bytes:
    """One part's rows as Parquet bytes: source, labels, names, scores, set_size, error (and label,
    in_set for a shard set with labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"source": pa.string(), "labels": pa.list_(pa.int32()), "names": pa.list_(pa.string()),
             "scores": pa.list_(pa.float32()), "set_size": pa.int32(), "error": pa.string(),
             "label": pa.int32(), "in_set": pa.bool_()}
    table = pa.table({name: pa.array(list(values), type=types[name]) for name, values in rows.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
