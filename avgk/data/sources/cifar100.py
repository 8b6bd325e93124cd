"""`cifar100` source: the CIFAR-100 python pickles, a seeded 45k/5k train/val split, block label noise on train."""

# Input: root/cifar-100-python/{train,test,meta} (the extracted cifar-100-python.tar.gz) or
# root/{train,test,meta}. Each data file is a pickled dict with b"data" (N x 3072 uint8:
# 1024 red, 1024 green, 1024 blue values of a 32 x 32 image, row-major), b"fine_labels"
# and b"filenames"; meta holds b"fine_label_names". Class ids are the release's fine ids
# (its names are alphabetical, so this agrees with "sorted names" of the folder sources).
#
# Splits: val = floor(n_c * val_fraction + 0.5) images of every class c of the training set
# (5,000 of 50,000 at 0.1), drawn with split_seed; train = the rest; test = the test file.
# Each split keeps file order. Block noise (train only): with probability p a label y is
# replaced by y - y % 5 + U{0..4}, a uniform draw from its block of 5 consecutive ids (which
# may give y back: about 4p/5 of the labels change). The manifest settings record p, the
# seed, and how many labels were redrawn and changed.

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from avgk.config import DataConfig
from avgk.data.manifest import Manifest
from avgk.data.sources.common import ConvertOptions, Item, SplitPlan, encode_array, file_digest, write_image_dataset
from avgk.data.sources.imagefolder import check_root

__all__ = [
    "CIFAR_FILES",
    "NOISE_BLOCK",
    "block_label_noise",
    "find_cifar_dir",
    "prepare_cifar100",
    "stratified_holdout",
]

CIFAR_FILES = ("train", "test", "meta")
NOISE_BLOCK = 5
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Loads dicts, lists, bytes, ints and numpy arrays only: a pickle naming any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not part of the CIFAR format)")
        try:
            return super().find_class(canonical, name)
        except ModuleNotFoundError:  # numpy < 2 has numpy.core only
            return super().find_class(module, name)


def _load(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a CIFAR-100 python pickle: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a pickled dict, got {type(obj).__name__}")
    return obj


def find_cifar_dir(root: Path) -> Path:
    """root/cifar-100-python or root itself, whichever holds train, test and meta."""
    candidates = [root / "cifar-100-python", root]
    for folder in candidates:
        if all((folder / name).is_file() for name in CIFAR_FILES):
            return folder
    found = {str(c): [n for n in CIFAR_FILES if (c / n).is_file()] for c in candidates if c.is_dir()}
    raise FileNotFoundError(
        f"data.root={str(root)!r}: CIFAR-100 needs the python files {list(CIFAR_FILES)} in root/cifar-100-python "
        f"or in root (the extracted cifar-100-python.tar.gz); found {found}"
    )


def _class_names(meta: dict[bytes, Any], path: Path) -> list[str]:
    names = meta.get(b"fine_label_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path} must hold b'fine_label_names', a non-empty list of names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _images_and_labels(batch: dict[bytes, Any], path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if b"data" not in batch or b"fine_labels" not in batch:
        raise ValueError(f"{path} must hold b'data' and b'fine_labels', got keys {sorted(batch)[:6]}")
    data_NX = np.asarray(batch[b"data"])
    if data_NX.dtype != np.uint8 or data_NX.ndim != 2 or data_NX.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be an N x 3072 uint8 array, got {data_NX.dtype} {data_NX.shape}")
    labels_N = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    if labels_N.shape != (len(data_NX),):
        raise ValueError(f"{path}: b'fine_labels' must have one label per image ({len(data_NX)}), got {labels_N.shape}")
    if labels_N.size and not 0 <= labels_N.min() <= labels_N.max() < num_classes:
        raise ValueError(
            f"{path}: fine labels must be in [0, {num_classes}), got [{labels_N.min()}, {labels_N.max()}]"
        )
    raw_names = batch.get(b"filenames")
    if raw_names is None or len(raw_names) != len(data_NX):
        raw_names = [b""] * len(data_NX)
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw_names]
    images_NHWC = data_NX.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images_NHWC, labels_N, names


def stratified_holdout(labels_N: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out items: floor(n_c * fraction + 0.5) of each class c, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    held_N = np.zeros(len(labels_N), dtype=bool)
    for c in np.unique(labels_N):
        members = np.flatnonzero(labels_N == c)
        num_held = int(np.floor(len(members) * fraction + 0.5))
        held_N[rng.permutation(members)[:num_held]] = True
    return held_N


def block_label_noise(
    labels_N: np.ndarray, *, p: float, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(new labels, redrawn mask): each label, with probability p, redrawn uniformly from its block of 5 ids.

    Item i is redrawn iff a seeded uniform draw is < p, so with one seed a smaller p
    redraws a subset of a larger p's items.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"noise p must be in [0, 1], got {p}")
    if p > 0 and num_classes % NOISE_BLOCK:
        raise ValueError(
            f"block label noise needs the number of classes to be a multiple of {NOISE_BLOCK}, got {num_classes}"
        )
    rng = np.random.default_rng(seed)
    redraw_N = rng.random(len(labels_N)) < p
    offsets_N = rng.integers(0, NOISE_BLOCK, len(labels_N))
    return np.where(redraw_N, labels_N - labels_N % NOISE_BLOCK + offsets_N, labels_N), redraw_N


def prepare_cifar100(
    *,
    root: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    options: ConvertOptions,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    noise_p: float = 0.0,
    noise_seed: int = 0,
) -> Manifest:
    """Convert CIFAR-100 (python version) to train/val/test shards + manifest (idempotent)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    folder = find_cifar_dir(check_root(root))
    classes = _class_names(_load(folder / "meta"), folder / "meta")
    train_images, train_labels, train_names = _images_and_labels(
        _load(folder / "train"), folder / "train", len(classes)
    )
    test_images, test_labels, test_names = _images_and_labels(_load(folder / "test"), folder / "test", len(classes))

    held_N = stratified_holdout(train_labels, fraction=val_fraction, seed=split_seed)
    train_rows, val_rows = np.flatnonzero(~held_N), np.flatnonzero(held_N)
    clean = train_labels[train_rows]
    noisy, redrawn = block_label_noise(clean, p=noise_p, seed=noise_seed, num_classes=len(classes))

    def items(file: str, rows: np.ndarray, labels: np.ndarray, images: np.ndarray, names: list[str]) -> list[Item]:
        pairs = zip(rows.tolist(), labels.tolist(), strict=True)
        return [(f"{file}[{r}] {names[r]}", int(y), images[r]) for r, y in pairs]

    plans = {
        "train": SplitPlan(items(f"{folder.name}/train", train_rows, noisy, train_images, train_names)),
        "val": SplitPlan(items(f"{folder.name}/train", val_rows, train_labels[val_rows], train_images, train_names)),
        "test": SplitPlan(
            items(f"{folder.name}/test", np.arange(len(test_labels)), test_labels, test_images, test_names)
        ),
    }
    stats = [(name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns) for name in CIFAR_FILES]
    settings = {
        "root": str(folder),
        "layout": "cifar-100-python",
        "num_classes": len(classes),
        "cifar_val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
        "cifar_noise_p": float(noise_p),
        "cifar_noise_seed": int(noise_seed),
    }
    results = {
        "cifar_noise_num_redrawn": int(redrawn.sum()),
        "cifar_noise_num_changed": int((noisy != clean).sum()),
    }
    return write_image_dataset(
        shards_dir=shards_dir,
        source="cifar100",
        root=str(folder),
        classes=classes,
        plans=plans,
        convert=encode_array,
        options=options,
        settings=settings,
        inputs_digest=file_digest(stats),
        results=results,
    )


def from_config(data: DataConfig, options: ConvertOptions) -> Manifest:
    assert data.root is not None  # DataConfig requires data.root for every source but synthetic
    return prepare_cifar100(root=data.root, shards_dir=data.shards, options=options, val_fraction=data.cifar_val_fraction,
                            split_seed=data.split_seed, noise_p=data.cifar_noise_p, noise_seed=data.cifar_noise_seed)
