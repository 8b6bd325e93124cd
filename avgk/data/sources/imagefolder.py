"""`imagefolder` source: root/<split>/<class>/<image> folders, or root/<class>/<image> split by ratio."""

# Layouts (hidden names, starting with '.', are never splits or classes):
#   split folders   root/train/<class>/...  plus root/val/<class>/... and/or root/test/<class>/...
#                   (chosen as soon as root has a train, val or test folder)
#   single folder   root/<class>/...  split per class by data.split_ratios, seeded by data.split_seed
# Classes: the sorted union of class folder names over all splits -> ids 0..L-1, whether or
# not a folder holds a readable image (ids stay stable when images come and go; such a
# class simply has count 0). Order within a split: sorted relative paths; idx numbers the
# readable images in that order, so a path's idx is reproducible from the listing alone.

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avgk.config import DataConfig
from avgk.data.manifest import Manifest
from avgk.data.sources.common import (
    ClassTree,
    ConvertOptions,
    Item,
    SplitPlan,
    convert_file,
    file_digest,
    scan_class_folders,
    write_image_dataset,
)

__all__ = ["SPLITS", "check_root", "detect_layout", "plan_class_splits", "prepare_imagefolder", "ratio_split"]

SPLITS = ("train", "val", "test")


def check_root(root: str | os.PathLike[str], *, what: str = "data.root") -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}={str(root)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what}={str(root)!r} must be a folder, got a file")
    return path.resolve()


def detect_layout(root: Path) -> str:
    """'splits' when root holds a train, val or test folder (then train and val or test are required), else 'single'."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        return "single"
    if "train" not in present or len(present) < 2:
        raise ValueError(
            f"data.root={str(root)!r} has split folders {present}: a split layout needs root/train and at least "
            "one of root/val, root/test (or no split folder at all: root/<class>/<image>, split by data.split_ratios)"
        )
    return "splits"


def _require_classes(tree_names: Sequence[str], where: str) -> None:
    if not tree_names:
        raise ValueError(f"no class folders in {where}: expected <class>/<image> sub-folders (hidden ones ignored)")


def plan_class_splits(*, trees: Mapping[str, ClassTree], root: str) -> tuple[list[str], dict[str, SplitPlan]]:
    """Split-folder trees -> (sorted class folder names, a plan per split with items in sorted-path order)."""
    names = sorted(set().union(*(tree.files for tree in trees.values())))
    _require_classes(names, f"any split folder of {root}")
    class_id = {name: i for i, name in enumerate(names)}
    plans = {}
    for split, tree in trees.items():
        items = sorted(
            (rel, class_id[name], path) for name, files in tree.files.items() for rel, path in files
        )
        plans[split] = SplitPlan(items=items, skipped=list(tree.skipped))
    return names, plans


def _stable_seed(seed: int, name: str) -> list[int]:
    # per class, so adding a class never changes how another class is split
    return [seed, zlib.crc32(name.encode("utf-8"))]


def ratio_split(num_items: int, *, ratios: Sequence[float], seed: list[int]) -> np.ndarray:
    """Split assignment (0 train, 1 val, 2 test) of `num_items` sorted items of one class.

    val and test get floor(n * ratio + 0.5) items each (at most n together, val first), the
    rest is train, so a class of 1 image lands in train; which items go where is a seeded
    permutation.
    """
    num_val = min(num_items, int(np.floor(num_items * ratios[1] + 0.5)))
    num_test = min(num_items - num_val, int(np.floor(num_items * ratios[2] + 0.5)))
    assignment = np.zeros(num_items, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(num_items)
    assignment[order[:num_val]] = 1
    assignment[order[num_val : num_val + num_test]] = 2
    return assignment


def prepare_imagefolder(
    *,
    root: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    options: ConvertOptions,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
) -> Manifest:
    """Convert an image-folder tree to shards + manifest (idempotent: see write_image_dataset)."""
    base = check_root(root)
    layout = detect_layout(base)
    settings: dict[str, Any] = {"root": str(base), "layout": layout}
    if layout == "splits":
        trees = {s: scan_class_folders(base / s, root=base) for s in SPLITS if (base / s).is_dir()}
        classes, plans = plan_class_splits(trees=trees, root=str(base))
        stats = [stat for tree in trees.values() for stat in tree.stats]
    else:
        ratios = [float(r) for r in split_ratios]
        if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0 or abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"split_ratios must be 3 fractions >= 0 summing to 1 with train > 0, got {ratios}")
        tree = scan_class_folders(base, root=base)
        classes = sorted(tree.files)
        _require_classes(classes, str(base))
        split_items: dict[str, list[Item]] = {s: [] for s in SPLITS}
        for cls, name in enumerate(classes):
            files = tree.files[name]
            assignment = ratio_split(len(files), ratios=ratios, seed=_stable_seed(split_seed, name))
            for (rel, path), split in zip(files, assignment, strict=True):
                split_items[SPLITS[split]].append((rel, cls, path))
        kept = [s for s, ratio in zip(SPLITS, ratios, strict=True) if ratio > 0]
        # files that are not images belong to no split: they are listed with train
        plans = {s: SplitPlan(items=sorted(split_items[s]), skipped=list(tree.skipped) if s == "train" else [])
                 for s in kept}
        stats = tree.stats
        settings.update(split_ratios=ratios, split_seed=int(split_seed))
    settings["num_classes"] = len(classes)
    return write_image_dataset(
        shards_dir=shards_dir,
        source="imagefolder",
        root=str(base),
        classes=classes,
        plans=plans,
        convert=convert_file,
        options=options,
        settings=settings,
        inputs_digest=file_digest(stats) + file_digest([(c, 0, 0) for c in classes]),
    )


def from_config(data: DataConfig, options: ConvertOptions) -> Manifest:
    assert data.root is not None  # DataConfig requires data.root for every source but synthetic
    return prepare_imagefolder(root=data.root, shards_dir=data.shards, options=options,
                               split_ratios=data.split_ratios, split_seed=data.split_seed)
