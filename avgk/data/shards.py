"""Writing WebDataset shards: one split at a time into a temporary folder renamed into place,
and the synthetic data set, generated only into an empty folder or over avgk's own synthetic set.

Sample format: see write_split. The manifest and its layout: avgk.data.manifest.
Shape legend: L classes, M sparse posterior width, H x W image size.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from avgk.data.manifest import (
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    SHARD_PATTERN,
    SYNTHETIC_SPLITS,
    Manifest,
    SplitInfo,
    encode_posterior,
    file_sha256,
    read_manifest,
    shard_problems,
    write_manifest,
)
from avgk.data.synthetic import generate_synthetic
from avgk.runtime import storage

log = logging.getLogger(__name__)

def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not split or "/" in split or split.startswith(".") or split == MANIFEST_NAME:
        raise ValueError(f"split must be a plain folder name (no '/', not starting with '.'), got {split!r}")


def _to_record(sample: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    key = sample.get("key")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        # webdataset splits a tar member name at its first '.' to find the sample key
        raise ValueError(f"sample key must be a non-empty string without '.' or '/', got {key!r}")
    ext = sample.get("ext")
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"sample {key!r}: ext must be one of {IMAGE_EXTENSIONS}, got {ext!r}")
    image = sample.get("image")
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise ValueError(f"sample {key!r}: image must be non-empty encoded bytes, got {type(image).__name__}")
    cls = sample.get("cls")
    if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)) or not 0 <= cls < num_classes:
        raise ValueError(f"sample {key!r}: cls must be an integer in [0, {num_classes}), got {cls!r}")
    idx = sample.get("idx")
    if isinstance(idx, (bool, np.bool_)) or not isinstance(idx, (int, np.integer)) or idx < 0:
        raise ValueError(f"sample {key!r}: idx must be a non-negative integer, got {idx!r}")
    record: dict[str, Any] = {"__key__": key, ext: bytes(image), "cls": str(int(cls)), "idx": str(int(idx))}
    post = sample.get("post")
    if post is not None:
        post_2M = np.asarray(post, dtype=np.float32)
        if post_2M.ndim != 2 or post_2M.shape[0] != 2:
            raise ValueError(f"sample {key!r}: post must be a 2 x M array [class ids; probs], got shape {post_2M.shape}")
        record["post.npy"] = post_2M
    return record


def _replace_dir(*, src: Path, dst: Path) -> None:
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_split(
    *,
    samples: Iterable[Mapping[str, Any]],
    shards_dir: str | os.PathLike[str],
    split: str,
    num_classes: int,
    maxcount: int = 1000,
    maxsize_bytes: int | None = None,
    skipped: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Write one split's samples as tar shards and return its manifest entry.

    Each sample is {"key", "image" (encoded bytes), "ext" ("png" | "jpg"), "cls", "idx",
    optional "post"} and becomes these tar members:

        <key>.png | <key>.jpg  the encoded image; the key has no "." or "/"
                               (generated data uses "<split>-<idx:08d>")
        <key>.cls              the label, an ASCII integer in [0, num_classes)
        <key>.idx              the global index within the split; the values must be exactly 0..N-1
        <key>.post.npy         optional sparse posterior (synthetic data): float32, 2 x M, row 0
                               the class ids (exact as float32 up to 2**24; padding -1), row 1
                               their probabilities (padding 0); see encode_posterior

    Shards are named shard-%06d.tar, at most `maxcount` samples (and about `maxsize_bytes`)
    each. They go to a hidden temporary folder that is renamed to `<shards_dir>/<split>`
    only once every sample is written, and any existing manifest is removed first (the
    data set is no longer complete), so an interrupted write never looks complete.
    `shards_dir` may be a URI (s3://bucket/prefix, see avgk.runtime.storage): the split's old objects
    are deleted, then each shard is staged in a local temporary folder and uploaded as soon as
    it is complete (local disk holds one shard at a time); the manifest, written last by
    write_manifest, again marks the data set complete.
    `skipped` (e.g. a list the sample generator appends unreadable source files to while it
    runs) is read after the samples are consumed and stored in the entry.
    """
    _check_split_name(split)
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if int(maxcount) != maxcount or maxcount < 1:
        raise ValueError(f"maxcount must be an integer >= 1, got {maxcount!r}")
    if maxsize_bytes is not None and maxsize_bytes < 1:
        raise ValueError(f"maxsize_bytes must be >= 1 or None, got {maxsize_bytes!r}")
    remote = storage.is_remote(str(shards_dir))
    if remote:
        root_uri = storage.absolute(str(shards_dir))
        storage.check_bucket(root_uri)
        storage.delete(storage.join(root_uri, MANIFEST_NAME))
        storage.delete(storage.join(root_uri, split))
        tmp = Path(tempfile.mkdtemp(prefix=f"avgk-{split}-"))
    else:
        root = Path(shards_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        remove_stale_partials(root, split)
        tmp = root / f".{split}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sealed: dict[str, tuple[str, int]] = {}
    """shard name -> (SHA-256, bytes), recorded as each shard is closed."""

    def seal(fname: str) -> None:
        path = Path(fname)
        sealed[path.name] = (file_sha256(path), path.stat().st_size)
        if remote:
            storage.upload_file(path, storage.join(root_uri, split, path.name))
            path.unlink()

    class_counts_L = np.zeros(int(num_classes), dtype=np.int64)
    indices: list[int] = []
    per_shard: dict[int, int] = {}
    try:
        with wds.ShardWriter(
            str(tmp / SHARD_PATTERN),
            maxcount=int(maxcount),
            maxsize=float(maxsize_bytes) if maxsize_bytes is not None else float("inf"),
            verbose=0,
            post=seal,
            # an integer mtime: a float one makes tarfile add a PAX header to every member (2x slower both ways)
            mtime=int(time.time()),
        ) as sink:
            for sample in samples:
                record = _to_record(sample, int(num_classes))
                sink.write(record)
                per_shard[sink.shard - 1] = per_shard.get(sink.shard - 1, 0) + 1  # next_stream advanced sink.shard
                class_counts_L[int(record["cls"])] += 1
                indices.append(int(record["idx"]))
        num_samples = len(indices)
        if sorted(indices) != list(range(num_samples)):
            seen = np.bincount(np.asarray(indices, dtype=np.int64)) if indices else np.zeros(0)
            duplicates = np.flatnonzero(seen > 1)[:5].tolist()
            raise ValueError(
                f"split {split!r}: idx values must be exactly 0..{num_samples - 1}, each once; "
                f"got max {max(indices, default=-1)}, duplicated {duplicates}"
            )
        shard_names = sorted(sealed)
        if num_samples == 0:
            # a ShardWriter may open its first tar before any write; an empty split has no shards
            for name in shard_names:
                if remote:
                    storage.delete(storage.join(root_uri, split, name))
                else:
                    (tmp / name).unlink()
            shard_names = []
        shard_samples = [per_shard.get(int(name[len("shard-"):-len(".tar")]), 0) for name in shard_names]
        shard_sha256 = [sealed[name][0] for name in shard_names]
        shard_bytes = [sealed[name][1] for name in shard_names]
        if remote:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _replace_dir(src=tmp, dst=root / split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SplitInfo(
        shards=tuple(f"{split}/{name}" for name in shard_names),
        num_samples=num_samples,
        class_counts=tuple(int(c) for c in class_counts_L),
        skipped=tuple(skipped or ()),
        shard_samples=tuple(shard_samples),
        shard_sha256=tuple(shard_sha256),
        shard_bytes=tuple(shard_bytes),
    ).to_json()


def remove_stale_partials(root: Path, split: str) -> None:
    """Remove the temporary folders of writers of `split` that died (kill -9) before renaming them into
    place; a folder whose writer is still running is left alone."""
    for folder in root.glob(f".{split}.partial-*"):
        try:
            pid = int(folder.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def encode_png(image_HWC: np.ndarray) -> bytes:
    """PNG bytes of an H x W x C uint8 image, at the fastest compression level (synthetic shards)."""
    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


WRITING_MARKER = ".avgk-synthetic-writing"


def refuse_foreign_folder(shards_dir: str | os.PathLike[str], existing: Manifest | None) -> None:
    """Synthetic data is written only into a missing or empty folder (or prefix), or over avgk's own
    synthetic data set: anything else (a prepared real data set, a user's files) is never overwritten."""
    if not storage.is_remote(str(shards_dir)):
        folder = Path(shards_dir)
        if not folder.exists():
            return
        if not folder.is_dir():
            raise ValueError(f"data.shards={str(shards_dir)!r} is a file, not a folder: refusing to write synthetic data there")
    if existing is not None and existing.source == "synthetic":
        return
    if storage.is_remote(str(shards_dir)):
        entries = sorted(storage.list_files(str(shards_dir)))  # every object under the prefix
    else:
        entries = sorted(p.name for p in Path(shards_dir).iterdir())
    if existing is None and WRITING_MARKER in entries:
        return  # avgk's own synthetic write, interrupted before its manifest
    if not entries:
        return
    what = (f"a prepared {existing.source!r} data set ({existing.num_classes} classes)" if existing is not None
            else f"files that are not avgk's synthetic data ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    raise ValueError(
        f"data.shards={storage.display(str(shards_dir))!r} holds {what}: refusing to overwrite it with synthetic data; "
        "train on it as it is (its manifest says what it holds), or choose an empty folder"
    )


def write_synthetic_shards(
    *,
    shards_dir: str | os.PathLike[str],
    num_classes: int,
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int,
    zipf_exponent: float,
    ambiguity_rate: float,
    seed: int,
    maxcount: int,
) -> Manifest:
    """Generate the synthetic train/val/test splits (PNG, with posteriors) and write them with their manifest.

    Idempotent: if a complete manifest with the same settings exists (and its shards are
    on disk) it is returned untouched; otherwise the data set is rewritten.
    """
    settings = {
        "num_classes": num_classes,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "zipf_exponent": zipf_exponent,
        "ambiguity_rate": ambiguity_rate,
        "seed": seed,
        "maxcount": maxcount,
    }
    for name in ("num_train", "num_val", "num_test", "maxcount"):
        if int(settings[name]) != settings[name] or settings[name] < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {settings[name]!r}")
    settings = json.loads(json.dumps(settings))  # compare as they will read back
    try:
        existing = read_manifest(shards_dir)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        existing = None
    if (
        existing is not None
        and existing.source == "synthetic"
        and existing.settings == settings
        and not shard_problems(existing)
    ):
        return existing
    refuse_foreign_folder(shards_dir, existing)
    # Marks the folder as avgk's synthetic data while it has no manifest, so that a write killed
    # half-way is finished by the next one instead of being refused as someone else's files.
    marker = storage.join(storage.absolute(str(shards_dir)), WRITING_MARKER)
    storage.write_bytes(marker, b"synthetic\n")

    sizes = {"train": num_train, "val": num_val, "test": num_test}
    entries = {}
    for split in SYNTHETIC_SPLITS:
        data = generate_synthetic(
            num_samples=sizes[split],
            num_classes=num_classes,
            image_size=image_size,
            zipf_exponent=zipf_exponent,
            ambiguity_rate=ambiguity_rate,
            seed=seed,
            split=split,
        )
        samples = (
            {
                "key": f"{split}-{i:08d}",
                "image": encode_png(data.images_NHWC[i]),
                "ext": "png",
                "cls": int(data.labels_N[i]),
                "idx": i,
                "post": encode_posterior(indices=data.posterior_indices[i], probs=data.posterior_probs[i]),
            }
            for i in range(data.num_samples)
        )
        entries[split] = write_split(
            samples=samples, shards_dir=shards_dir, split=split, num_classes=num_classes, maxcount=maxcount
        )
    manifest = write_manifest(
        shards_dir=shards_dir,
        source="synthetic",
        settings=settings,
        classes=[f"class_{c:0{len(str(num_classes - 1))}d}" for c in range(num_classes)],
        splits=entries,
    )
    storage.delete(marker)
    return manifest


