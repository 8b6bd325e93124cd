"""The shard set's manifest and on-disk sample format: what a data set holds, read and written atomically.

Layout:
  <shards_dir>/manifest.json                 written last: its presence marks a complete data set
  <shards_dir>/<split>/shard-000000.tar ...  one folder per split, renamed into place when complete
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

    def to_json(self) -> dict:
        return {
            "shards": list(self.shards),
            "num_samples": self.num_samples,
            "class_counts": list(self.class_counts),
            "skipped": list(self.skipped),
            "shard_samples": list(self.shard_samples),
            "shard_sha256": list(self.shard_sha256),
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "SplitInfo":
        return cls(
            shards=tuple(entry["shards"]),
            num_samples=int(entry["num_samples"]),
            class_counts=tuple(int(c) for c in entry["class_counts"]),
            skipped=tuple(entry.get("skipped", ())),
            shard_samples=tuple(int(n) for n in entry.get("shard_samples", ())),
            shard_sha256=tuple(str(h) for h in entry.get("shard_sha256", ())),
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of a shards folder: the single source of truth for classes and counts."""

    root: Path
    """Absolute path of the shards folder."""
    format_version: int
    source: str
    settings: dict
    num_classes: int
    classes: dict[int, str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        """The entry of split `name`; an unknown name raises a ValueError listing the known ones."""
        if name not in self.splits:
            raise ValueError(
                f"unknown split {name!r} in {self.root / MANIFEST_NAME}; known splits: {sorted(self.splits)}"
            )
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Absolute paths of the split's shards, in manifest order."""
        return [str(self.root / rel) for rel in self.split(split).shards]

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "source": self.source,
            "settings": self.settings,
            "num_classes": self.num_classes,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            "splits": {name: info.to_json() for name, info in self.splits.items()},
        }


def _missing_data_message(path: Path) -> str:
    return f"{path} does not exist: no complete shards there; run `avgk prepare CONFIG` first"


def read_manifest(shards_dir: str | os.PathLike) -> Manifest:
    """Read `<shards_dir>/manifest.json`; FileNotFoundError if the folder or the manifest is missing."""
    root = Path(shards_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(_missing_data_message(root))
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(_missing_data_message(path))
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the manifest is corrupt; prepare the data again") from None
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
    shards_dir: str | os.PathLike,
    source: str,
    settings: Mapping[str, Any],
    classes: Mapping[int, str] | Sequence[str],
    splits: Mapping[str, Mapping[str, Any] | SplitInfo],
) -> Manifest:
    """Write `manifest.json` atomically; call it last, once every split is written.

    `splits` maps each split name to the dict `write_split` returned (or a SplitInfo).
    """
    root = Path(shards_dir).expanduser().resolve()
    named = _normalise_classes(classes)
    num_classes = len(named)
    infos: dict[str, SplitInfo] = {}
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
        missing = [rel for rel in info.shards if not (root / rel).is_file()]
        if missing:
            raise FileNotFoundError(f"split {name!r}: shards listed but not on disk under {root}: {missing[:5]}")
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
    path = root / MANIFEST_NAME
    tmp = root / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_problems(manifest: Manifest) -> list[str]:
    """What differs between the manifest and the shard files on disk: missing files, and files
    whose SHA-256 is not the one recorded (truncated, rewritten). Empty when the data set is intact.
    Reads every shard: run it when reusing a data set, not on each epoch."""
    problems = []
    for name, info in manifest.splits.items():
        for i, relative in enumerate(info.shards):
            path = manifest.root / relative
            if not path.is_file():
                problems.append(f"{relative} is missing")
            elif i < len(info.shard_sha256) and file_sha256(path) != info.shard_sha256[i]:
                problems.append(f"{relative} differs from the manifest (SHA-256)")
    return problems
