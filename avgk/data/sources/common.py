"""What every source converter shares: image conversion, class-folder scans, parallel ordered writing, reuse."""

# A converter (imagefolder.py, plantnet300k.py, cifar100.py) turns its input into a
# `SplitPlan` per split (items in their final order, plus files already known to be
# skipped) and hands them to `write_image_dataset`, which
#   1. fingerprints the inputs and settings, and returns the existing manifest untouched
#      when a complete one carries the same fingerprint (idempotent re-runs);
#   2. converts the items in a process pool, in order, numbering readable ones idx 0..N-1;
#   3. writes each split with shards.write_split (atomic), then the manifest (last).
# An item is (name, class id, payload); `convert(payload, resize_shorter, jpeg_quality)`
# returns (encoded bytes, "jpg" | "png") or (None, reason) for an unreadable input.

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from avgk.data.manifest import Manifest, read_manifest, shard_problems, write_manifest
from avgk.data.shards import write_split

__all__ = [
    "CONVERTER_VERSION",
    "HIDDEN_REASON",
    "IMAGE_SUFFIXES",
    "ClassTree",
    "Convert",
    "ConvertOptions",
    "Converted",
    "Item",
    "SplitPlan",
    "available_cpus",
    "convert_file",
    "encode_array",
    "encode_image",
    "file_digest",
    "scan_class_folders",
    "write_image_dataset",
]

CONVERTER_VERSION = 1
"""Bump when the bytes written for the same inputs and settings change: it invalidates earlier outputs."""
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""Files with these suffixes (any case) are decoded; other files are skipped as non-images."""
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
"""Formats whose original bytes go into the shards when no resizing is needed."""
HIDDEN_REASON = "hidden file"
"""Skip reason of names starting with '.' (.DS_Store, ._x AppleDouble): listed, never fatal under strict."""
_CHUNK = 16
"""Items per process-pool task: amortises pickling without starving the ordered writer."""

Item = tuple[str, int, Any]
Converted = tuple[bytes | None, str]
"""(encoded bytes, "jpg" | "png"), or (None, the reason) for an unreadable input."""
Convert = Callable[[Any, int, int], Converted]
"""convert(payload, resize_shorter, jpeg_quality) of a source's items."""


@dataclass(frozen=True)
class ConvertOptions:
    """How images are converted and shards cut (data.resize_shorter, jpeg_quality, strict, shard_*, prepare_workers)."""

    resize_shorter: int = 0
    """Shrink images whose shorter side exceeds this to exactly this side, then JPEG; 0 = never resize."""
    jpeg_quality: int = 90
    strict: bool = False
    """Raise on the first unreadable or non-image file (hidden files excepted) instead of skipping it."""
    maxcount: int = 1000
    maxsize_mb: float = 0.0
    """Also cut shards past about this many MB; 0 = by count only."""
    workers: int = 1
    """Conversion processes; 1 converts in this process."""
    progress: bool = True
    """tqdm bars on stderr."""

    def __post_init__(self) -> None:
        if self.resize_shorter != 0 and self.resize_shorter < 8:
            raise ValueError(f"resize_shorter must be 0 (keep) or >= 8 pixels, got {self.resize_shorter}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {self.maxcount}")
        if self.maxsize_mb < 0:
            raise ValueError(f"maxsize_mb must be >= 0 (0 = no size limit), got {self.maxsize_mb}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def output_settings(self) -> dict[str, Any]:
        """The options that change the bytes written (workers, progress and strict do not)."""
        return {
            "resize_shorter": self.resize_shorter,
            "jpeg_quality": self.jpeg_quality,
            "shard_maxcount": self.maxcount,
            "shard_maxsize_mb": self.maxsize_mb,
            "converter_version": CONVERTER_VERSION,
        }


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# =====================================================================================
# Image conversion (runs in the pool's worker processes: module-level, picklable)
# =====================================================================================


def _target_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter


def encode_image(data: bytes, resize_shorter: int, jpeg_quality: int) -> tuple[bytes, str]:
    """Validate (full decode) and convert one encoded image; raises whatever PIL raises on a broken one.

    JPEG/PNG not needing a resize keep their original bytes (EXIF and ICC included);
    anything else is decoded to RGB, shrunk if its shorter side exceeds `resize_shorter`
    (bicubic, aspect kept) and re-encoded as JPEG at `jpeg_quality`. EXIF orientation is
    not applied, as neither the shard loader nor torchvision's ImageFolder applies it.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        shrink = resize_shorter > 0 and min(width, height) > resize_shorter
        if not shrink and image.format in KEPT_FORMATS:
            ext = KEPT_FORMATS[image.format]
            if image.format == "JPEG":
                # decoding at 1/8 scale still entropy-decodes every byte: truncation is caught at a fraction of the cost
                image.draft(None, (max(1, width // 8), max(1, height // 8)))
            image.load()
            return data, ext
        if shrink:
            size = _target_size(width, height, resize_shorter)
            image.draft("RGB", size)  # JPEG: decode at the smallest 1/2^k scale still >= size
            rgb = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        else:
            rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue(), "jpg"


def convert_file(path: str, resize_shorter: int, jpeg_quality: int) -> tuple[bytes | None, str]:
    """One image file -> (bytes, ext), or (None, reason) when it cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return None, f"unreadable file: {err.strerror or err}"
    if not data:
        return None, "empty file"
    try:
        return encode_image(data, resize_shorter, jpeg_quality)
    except Exception as err:
        return None, f"not a readable image: {type(err).__name__}: {err}"


def encode_array(image_HWC: np.ndarray, resize_shorter: int, jpeg_quality: int) -> tuple[bytes | None, str]:
    """A uint8 H x W x 3 array -> lossless PNG, or a shrunk JPEG when its shorter side exceeds `resize_shorter`."""
    image = Image.fromarray(np.ascontiguousarray(image_HWC))
    width, height = image.size
    if resize_shorter > 0 and min(width, height) > resize_shorter:
        image = image.resize(_target_size(width, height, resize_shorter), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        return buffer.getvalue(), "jpg"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), "png"


def _convert_chunk(convert: Convert, payloads: list[Any], resize_shorter: int, jpeg_quality: int) -> list[Converted]:
    return [convert(payload, resize_shorter, jpeg_quality) for payload in payloads]


def _ordered_map(
    convert: Convert, payloads: Sequence[Any], *, resize_shorter: int, jpeg_quality: int, workers: int
) -> Generator[Converted, None, None]:
    """convert(payload, ...) for every payload, in input order; at most 4 chunks per worker in flight.

    The bound keeps memory flat on 300k-image sets: the writer consumes in order, so
    unbounded submission would buffer every image converted ahead of a slow chunk.
    """
    if workers <= 1:
        for payload in payloads:
            yield convert(payload, resize_shorter, jpeg_quality)
        return
    chunks = (list(payloads[i : i + _CHUNK]) for i in range(0, len(payloads), _CHUNK))
    # the platform's default start method: fork on Linux (workers up in milliseconds, nothing re-imported)
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        pending: deque[Future[list[Converted]]] = deque(
            pool.submit(_convert_chunk, convert, chunk, resize_shorter, jpeg_quality)
            for chunk in islice(chunks, 4 * workers)
        )
        while pending:
            results = pending.popleft().result()
            for chunk in islice(chunks, 1):
                pending.append(pool.submit(_convert_chunk, convert, chunk, resize_shorter, jpeg_quality))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# =====================================================================================
# Class-folder scans
# =====================================================================================


@dataclass
class ClassTree:
    """Files found under one or more `<parent>/<class>/...` folders, relative to the data root."""

    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """class folder name -> sorted [(relative path, absolute path)] of candidate images, per parent."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """{"path", "reason"} of files that are not candidate images (sorted by path)."""
    stats: list[tuple[str, int, int]] = field(default_factory=list)
    """(relative path, size, mtime_ns) of every file seen, images or not: the input fingerprint."""


def _hidden(name: str) -> bool:
    return name.startswith(".")


def scan_class_folders(parent: Path, *, root: Path) -> ClassTree:
    """Scan `parent/<class>/**` (sub-folders of a class belong to it); hidden folders are not classes.

    Candidate images are files with an IMAGE_SUFFIXES suffix; other files are listed in
    `skipped` (reason names the rule), files directly in `parent` as "not in a class folder".
    A class folder with no candidate keeps its (empty) entry: classes come from folder names.
    """
    tree = ClassTree()

    def note(path: Path) -> None:
        stat = path.stat()
        tree.stats.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))

    def skip(path: Path, reason: str) -> None:
        tree.skipped.append({"path": path.relative_to(root).as_posix(), "reason": reason})

    for entry in sorted(parent.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            if _hidden(entry.name):
                continue
            found: list[tuple[str, str]] = []
            for dirpath, dirnames, filenames in os.walk(entry, followlinks=True):
                dirnames[:] = [d for d in dirnames if not _hidden(d)]
                for name in filenames:
                    path = Path(dirpath) / name
                    note(path)
                    if _hidden(name):
                        skip(path, HIDDEN_REASON)
                    elif path.suffix.lower() not in IMAGE_SUFFIXES:
                        skip(path, f"not an image file (suffix {path.suffix or '(none)'!r})")
                    else:
                        found.append((path.relative_to(root).as_posix(), str(path)))
            tree.files[entry.name] = sorted(found)
        elif entry.is_file():
            note(entry)
            skip(entry, HIDDEN_REASON if _hidden(entry.name) else "not in a class folder")
    tree.skipped.sort(key=lambda s: s["path"])
    return tree


def file_digest(stats: Sequence[tuple[str, int, int]]) -> str:
    """sha256 of the sorted (path, size, mtime_ns) list: any added, removed, resized or touched file changes it."""
    digest = hashlib.sha256()
    for rel, size, mtime_ns in sorted(stats):
        digest.update(f"{rel}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()


# =====================================================================================
# Writing
# =====================================================================================


@dataclass
class SplitPlan:
    """One split to write: items in idx order (readable ones get idx 0, 1, ...) and already-known skips."""

    items: Sequence[Item]
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _fatal(entry: Mapping[str, Any]) -> bool:
    return entry.get("reason") != HIDDEN_REASON


def _strict_error(split: str, entry: Mapping[str, Any], root: str) -> ValueError:
    return ValueError(
        f"data.strict=true: {entry['path']} (split {split!r}, under {root}): {entry['reason']}; "
        "remove or fix the file, or set data.strict=false to skip and list it in the manifest"
    )


def _fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _reusable(shards_dir: str | os.PathLike[str], source: str, fingerprint: str) -> Manifest | None:
    try:
        existing = read_manifest(shards_dir)
    except (FileNotFoundError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if existing.source != source or existing.settings.get("fingerprint") != fingerprint:
        return None
    if shard_problems(existing):  # a missing, truncated or rewritten shard: convert again
        return None
    return existing


def _samples(
    *,
    split: str,
    plan: SplitPlan,
    convert: Convert,
    options: ConvertOptions,
    skipped: list[dict[str, Any]],
    root: str,
) -> Iterator[dict[str, Any]]:
    num_written = 0
    converted = _ordered_map(
        convert,
        [payload for _, _, payload in plan.items],
        resize_shorter=options.resize_shorter,
        jpeg_quality=options.jpeg_quality,
        workers=options.workers,
    )
    quiet = {} if options.progress else {"disable": True}  # unset, so TQDM_DISABLE=1 in the environment works
    bar = tqdm(total=len(plan.items), desc=f"prepare {split}", unit="img", file=sys.stderr, **quiet)
    try:
        for (name, cls, _), (image, ext) in zip(plan.items, converted, strict=True):
            bar.update()
            if image is None:
                entry = {"path": name, "reason": ext}
                if options.strict:
                    raise _strict_error(split, entry, root)
                skipped.append(entry)
                continue
            yield {"key": f"{split}-{num_written:08d}", "image": image, "ext": ext, "cls": cls, "idx": num_written}
            num_written += 1
    finally:
        bar.close()
        converted.close()  # stops the process pool now, also when the writer gives up half-way


def write_image_dataset(
    *,
    shards_dir: str | os.PathLike[str],
    source: str,
    root: str,
    classes: Sequence[str],
    plans: Mapping[str, SplitPlan],
    convert: Callable[[Any, int, int], tuple[bytes | None, str]],
    options: ConvertOptions,
    settings: Mapping[str, Any],
    inputs_digest: str,
    results: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert and write every split, then the manifest; reuse a complete output with the same fingerprint.

    `settings` (JSON values describing the layout and split rules) plus options.output_settings()
    plus `inputs_digest` form the fingerprint stored in the manifest settings; `results`
    (e.g. noise counts, determined by the fingerprinted inputs) are recorded beside them.
    Samples get keys "<split>-<idx:08d>"; idx follows the plan's item order, skipping
    unreadable items, which are listed in the split's `skipped` entry with their reason.
    Under options.strict, the first non-hidden skip raises a ValueError naming the file,
    also when an earlier non-strict output is reused.
    """
    recorded = {**settings, **options.output_settings()}
    fingerprint = _fingerprint({"settings": recorded, "inputs": inputs_digest, "source": source})
    existing = _reusable(shards_dir, source, fingerprint)
    if existing is not None:
        if options.strict:
            for split, info in existing.splits.items():
                for entry in info.skipped:
                    if isinstance(entry, Mapping) and _fatal(entry):
                        raise _strict_error(split, entry, root)
        return existing
    if options.strict:
        for split, plan in plans.items():
            for entry in plan.skipped:
                if _fatal(entry):
                    raise _strict_error(split, entry, root)

    maxsize = int(options.maxsize_mb * 1e6) if options.maxsize_mb > 0 else None
    entries = {}
    for split, plan in plans.items():
        skipped = list(plan.skipped)
        samples = _samples(split=split, plan=plan, convert=convert, options=options, skipped=skipped, root=root)
        entry = write_split(
            samples=samples,
            shards_dir=shards_dir,
            split=split,
            num_classes=len(classes),
            maxcount=options.maxcount,
            maxsize_bytes=maxsize,
            skipped=skipped,  # read by write_split after the samples are consumed
        )
        entry["skipped"] = sorted(entry["skipped"], key=lambda s: s["path"])
        entries[split] = entry
    return write_manifest(
        shards_dir=shards_dir,
        source=source,
        settings={**recorded, **(results or {}), "fingerprint": fingerprint},
        classes=list(classes),
        splits=entries,
    )
