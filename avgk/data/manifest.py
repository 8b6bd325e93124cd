"""The shard set's manifest and on-disk sample format: what a data set holds, read and written atomically.

Layout:
  <shards_dir>/manifest.json                 written last: its presence marks a complete data set
  <shards_dir>/<split>/shard-000000.tar ...  one folder per split, renamed into place when complete
                                             (on an object store: uploaded shard by shard, the
                                             manifest removed first and written last)
<shards_dir> is a local folder or a filesystem URI (s3://bucket/prefix): see avgk.runtime.storage.
Shape legend: L classes, M sparse posterior width.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avgk.runtime import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_EXTENSIONS = ("png", "jpg")
SYNTHETIC_SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


# =====================================================================================
# Manifest
# =====================================================================================


@dataclass(frozen=True)
class SplitInfo:
    """One split's entry in the manifest."""

    shards: tuple[str, ...]
    """Shard paths relative to the shards folder, in writing order."""
    num_samples: int
    class_counts: tuple[int, ...]
    """Number of samples per class id (length L)."""
    skipped: tuple[Any, ...] = ()
    """Source items the converter could not read (free-form: paths, or {"path", "reason"})."""
    shard_samples: tuple[int, ...] = ()
    """Samples in each shard, in the order of `shards` (empty in manifests written before it existed)."""
    shard_sha256: tuple[str, ...] = ()
    """SHA-256 of each shard file, in the order of `shards` (empty as above)."""
    shard_bytes: tuple[int, ...] = ()
    """Size of each shard file in bytes, in the order of `shards` (empty as above): what
    shard_problems checks on an object store, where hashing means downloading every shard."""

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": list(self.shards),
            "num_samples": self.num_samples,
            "class_counts": list(self.class_counts),
            "skipped": list(self.skipped),
            "shard_samples": list(self.shard_samples),
            "shard_sha256": list(self.shard_sha256),
            "shard_bytes": list(self.shard_bytes),
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> SplitInfo:
        return cls(
            shards=tuple(entry["shards"]),
            num_samples=int(entry["num_samples"]),
            class_counts=tuple(int(c) for c in entry["class_counts"]),
            skipped=tuple(entry.get("skipped", ())),
            shard_samples=tuple(int(n) for n in entry.get("shard_samples", ())),
            shard_sha256=tuple(str(h) for h in entry.get("shard_sha256", ())),
            shard_bytes=tuple(int(n) for n in entry.get("shard_bytes", ())),
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of a shards folder: the single source of truth for classes and counts."""

    root: str
    """The shards folder: an absolute local path or a filesystem URI (s3://bucket/prefix)."""
    format_version: int
    source: str
    settings: dict[str, Any]
    num_classes: int
    classes: dict[int, str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        """The entry of split `name`; an unknown name raises a ValueError listing the known ones."""
        if name not in self.splits:
            raise ValueError(
                f"unknown split {name!r} in {storage.display(self.path)}; known splits: {sorted(self.splits)}"
            )
        return self.splits[name]

    @property
    def path(self) -> str:
        """Where manifest.json is (a path or a URI)."""
        return storage.join(self.root, MANIFEST_NAME)

    @property
    def is_remote(self) -> bool:
        return storage.is_remote(self.root)

    def shard_urls(self, split: str) -> list[str]:
        """Absolute paths (or URIs, for a remote data set) of the split's shards, in manifest order."""
        return [storage.join(self.root, rel) for rel in self.split(split).shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "source": self.source,
            "settings": self.settings,
            "num_classes": self.num_classes,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            "splits": {name: info.to_json() for name, info in self.splits.items()},
        }


def _missing_data_message(where: str) -> str:
    return f"{storage.display(where)} does not exist: no complete shards there; run `avgk prepare CONFIG` first"


def read_manifest(shards_dir: str | os.PathLike[str]) -> Manifest:
    """Read `<shards_dir>/manifest.json` (a local folder or a URI); FileNotFoundError if the folder or
    the manifest is missing, avgk.runtime.storage.StorageError (an OSError) if the location cannot be read."""
    root = storage.absolute(str(shards_dir))
    path = storage.join(root, MANIFEST_NAME)
    if not storage.is_remote(root):
        if not Path(root).is_dir():
            raise FileNotFoundError(_missing_data_message(root))
        if not Path(path).is_file():
            raise FileNotFoundError(_missing_data_message(path))
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:  # an object store has no folders: a missing prefix is a missing manifest
        raise FileNotFoundError(_missing_data_message(path)) from None
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{storage.display(path)} is not valid JSON ({err}): the manifest is corrupt; "
                         "prepare the data again") from None
    path = storage.display(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}: prepare the data again")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version must be {FORMAT_VERSION}, got {version!r}")
    classes = {int(k): str(v) for k, v in raw["classes"].items()}
    splits = {name: SplitInfo.from_json(entry) for name, entry in raw["splits"].items()}
    return Manifest(
        root=root,
        format_version=version,
        source=str(raw["source"]),
        settings=dict(raw.get("settings", {})),
        num_classes=int(raw["num_classes"]),
        classes=classes,
        splits=splits,
    )


def _normalise_classes(classes: Mapping[int, str] | Sequence[str]) -> dict[int, str]:
    if isinstance(classes, Mapping):
        named = {int(k): str(v) for k, v in classes.items()}
    else:
        named = {i: str(name) for i, name in enumerate(classes)}
    if sorted(named) != list(range(len(named))) or not named:
        raise ValueError(
            f"classes must name every id 0..L-1 exactly once (L >= 1), got ids {sorted(named)[:10]}"
            f"{'...' if len(named) > 10 else ''}"
        )
    return named


def write_manifest(
    *,
    shards_dir: str | os.PathLike[str],
    source: str,
    settings: Mapping[str, Any],
    classes: Mapping[int, str] | Sequence[str],
    splits: Mapping[str, Mapping[str, Any] | SplitInfo],
) -> Manifest:
    """Write `manifest.json` atomically; call it last, once every split is written.

    `splits` maps each split name to the dict `write_split` returned (or a SplitInfo).
    `shards_dir` is a local folder (the manifest is renamed into place) or a URI (the object
    is published whole when its upload completes).
    """
    root = storage.absolute(str(shards_dir))
    named = _normalise_classes(classes)
    num_classes = len(named)
    infos: dict[str, SplitInfo] = {}
    stored: dict[str, int] | None = None
    for name, entry in splits.items():
        info = entry if isinstance(entry, SplitInfo) else SplitInfo.from_json(entry)
        if len(info.class_counts) != num_classes:
            raise ValueError(
                f"split {name!r}: class_counts must have one entry per class ({num_classes}), "
                f"got {len(info.class_counts)}"
            )
        if sum(info.class_counts) != info.num_samples:
            raise ValueError(
                f"split {name!r}: class_counts must sum to num_samples={info.num_samples}, "
                f"got {sum(info.class_counts)}"
            )
        if storage.is_remote(root):
            stored = stored if stored is not None else storage.list_files(root)  # one listing, not one request per shard
            missing = [rel for rel in info.shards if rel not in stored]
        else:
            missing = [rel for rel in info.shards if not (Path(root) / rel).is_file()]
        if missing:
            raise FileNotFoundError(f"split {name!r}: shards listed but not stored under {storage.display(root)}: "
                                    f"{missing[:5]}")
        infos[name] = info
    manifest = Manifest(
        root=root,
        format_version=FORMAT_VERSION,
        source=str(source),
        settings=json.loads(json.dumps(dict(settings))),  # fails early on values JSON cannot hold
        num_classes=num_classes,
        classes=named,
        splits=infos,
    )
    storage.write_bytes(manifest.path, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())
    return manifest


def encode_posterior(*, indices: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Pack one sample's sparse posterior (M class ids, padding -1; M probs) into the 2 x M float32 `post.npy`."""
    return np.stack([np.asarray(indices, dtype=np.float32), np.asarray(probs, dtype=np.float32)])


def decode_posterior(*, post_2M: np.ndarray, num_classes: int) -> np.ndarray:
    """Expand a 2 x M `post.npy` array into a dense float32 vector of length num_classes."""
    dense_L = np.zeros(num_classes, dtype=np.float32)
    indices = np.rint(post_2M[0]).astype(np.int64)
    keep = indices >= 0
    if keep.any() and int(indices[keep].max()) >= num_classes:
        raise ValueError(f"post.npy class id {int(indices[keep].max())} is >= num_classes={num_classes}")
    np.add.at(dense_L, indices[keep], post_2M[1][keep])
    return dense_L


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_problems(manifest: Manifest) -> list[str]:
    """What differs between the manifest and the stored shard files: missing files, and files whose
    SHA-256 (local) or size (remote) is not the one recorded (truncated, rewritten). Empty when the
    data set is intact. Locally it reads every shard: run it when reusing a data set, not on each
    epoch. On an object store it lists each split once and compares sizes: hashing there would mean
    downloading the whole data set on every `avgk prepare`; the SHA-256s stay in the manifest for a
    full check (`sha256sum` over a download) when one is wanted."""
    problems = []
    for name, info in manifest.splits.items():
        if manifest.is_remote:
            stored = storage.list_files(storage.join(manifest.root, name)) if info.shards else {}
        for i, relative in enumerate(info.shards):
            if manifest.is_remote:
                size = stored.get(relative.split("/", 1)[-1])
                if size is None:
                    problems.append(f"{relative} is missing")
                elif i < len(info.shard_bytes) and size != info.shard_bytes[i]:
                    problems.append(f"{relative} differs from the manifest (size {size} bytes, "
                                    f"recorded {info.shard_bytes[i]})")
                continue
            path = Path(manifest.root) / relative
            if not path.is_file():
                problems.append(f"{relative} is missing")
            elif i < len(info.shard_sha256) and file_sha256(path) != info.shard_sha256[i]:
                problems.append(f"{relative} differs from the manifest (SHA-256)")
    return problems
