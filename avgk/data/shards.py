"""WebDataset shards and their manifest: atomic writing, and train/eval loaders split over ranks and workers."""

# Layout:
#   <shards_dir>/manifest.json                 written last: its presence marks a complete data set
#   <shards_dir>/<split>/shard-000000.tar ...  one folder per split, renamed into place when complete
# Sample format: see write_split. Rank/worker splitting: see train_loader and eval_loader.
# Shape legend: B batch size, L classes, M sparse posterior width, H x W image size.

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from avgk.data.synthetic import generate_synthetic
from avgk.data.transforms import ImageTransform

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "IMAGE_EXTENSIONS",
    "Manifest",
    "SplitInfo",
    "decode_posterior",
    "encode_posterior",
    "epoch_shard_order",
    "eval_loader",
    "num_train_batches",
    "read_manifest",
    "train_loader",
    "worker_shards",
    "write_manifest",
    "write_split",
    "write_synthetic_shards",
]

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

    def to_json(self) -> dict:
        return {
            "shards": list(self.shards),
            "num_samples": self.num_samples,
            "class_counts": list(self.class_counts),
            "skipped": list(self.skipped),
        }


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
    splits = {
        name: SplitInfo(
            shards=tuple(entry["shards"]),
            num_samples=int(entry["num_samples"]),
            class_counts=tuple(int(c) for c in entry["class_counts"]),
            skipped=tuple(entry.get("skipped", ())),
        )
        for name, entry in raw["splits"].items()
    }
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
        info = entry if isinstance(entry, SplitInfo) else SplitInfo(
            shards=tuple(entry["shards"]),
            num_samples=int(entry["num_samples"]),
            class_counts=tuple(int(c) for c in entry["class_counts"]),
            skipped=tuple(entry.get("skipped", ())),
        )
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


# =====================================================================================
# Writing
# =====================================================================================


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


def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not split or "/" in split or split.startswith(".") or split == MANIFEST_NAME:
        raise ValueError(f"split must be a plain folder name (no '/', not starting with '.'), got {split!r}")


def _to_record(sample: Mapping[str, Any], num_classes: int) -> dict:
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
    record = {"__key__": key, ext: bytes(image), "cls": str(int(cls)), "idx": str(int(idx))}
    post = sample.get("post")
    if post is not None:
        post = np.asarray(post, dtype=np.float32)
        if post.ndim != 2 or post.shape[0] != 2:
            raise ValueError(f"sample {key!r}: post must be a 2 x M array [class ids; probs], got shape {post.shape}")
        record["post.npy"] = post
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
    shards_dir: str | os.PathLike,
    split: str,
    num_classes: int,
    maxcount: int = 1000,
    maxsize_bytes: int | None = None,
    skipped: Sequence[Any] | None = None,
) -> dict:
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
    root = Path(shards_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    tmp = root / f".{split}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    class_counts_L = np.zeros(int(num_classes), dtype=np.int64)
    indices: list[int] = []
    try:
        with wds.ShardWriter(
            str(tmp / SHARD_PATTERN),
            maxcount=int(maxcount),
            maxsize=float(maxsize_bytes) if maxsize_bytes is not None else float("inf"),
            verbose=0,
            # an integer mtime: a float one makes tarfile add a PAX header to every member (2x slower both ways)
            mtime=int(time.time()),
        ) as sink:
            for sample in samples:
                record = _to_record(sample, int(num_classes))
                sink.write(record)
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
        shard_names = sorted(p.name for p in tmp.glob("shard-*.tar"))
        if num_samples == 0:
            # ShardWriter opens its first tar before any write; an empty split has no shards
            for name in shard_names:
                (tmp / name).unlink()
            shard_names = []
        _replace_dir(src=tmp, dst=root / split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SplitInfo(
        shards=tuple(f"{split}/{name}" for name in shard_names),
        num_samples=num_samples,
        class_counts=tuple(int(c) for c in class_counts_L),
        skipped=tuple(skipped or ()),
    ).to_json()


def _encode_png(image_HWC: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def refuse_foreign_folder(shards_dir: str | os.PathLike, existing: "Manifest | None") -> None:
    """Synthetic data is written only into a missing or empty folder, or over avgk's own synthetic
    data set: anything else (a prepared real data set, a user's files) is never overwritten."""
    folder = Path(shards_dir)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"data.shards={str(shards_dir)!r} is a file, not a folder: refusing to write synthetic data there")
    if existing is not None and existing.source == "synthetic":
        return
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    what = (f"a prepared {existing.source!r} data set ({existing.num_classes} classes)" if existing is not None
            else f"files that are not avgk's synthetic data ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    raise ValueError(
        f"data.shards={str(shards_dir)!r} holds {what}: refusing to overwrite it with synthetic data; "
        "train on it as it is (its manifest says what it holds), or choose an empty folder"
    )


def write_synthetic_shards(
    *,
    shards_dir: str | os.PathLike,
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
        and all(Path(url).is_file() for name in existing.splits for url in existing.shard_urls(name))
    ):
        return existing
    refuse_foreign_folder(shards_dir, existing)

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
                "image": _encode_png(data.images_NHWC[i]),
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
    return write_manifest(
        shards_dir=shards_dir,
        source="synthetic",
        settings=settings,
        classes=[f"class_{c:0{len(str(num_classes - 1))}d}" for c in range(num_classes)],
        splits=entries,
    )


# =====================================================================================
# Shard assignment (pure functions)
# =====================================================================================


def _seed_int(*parts: int) -> int:
    """One 64-bit seed from several non-negative ints, independent of Python's hash salt."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0])


def epoch_shard_order(*, shard_urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The training shard order of an epoch: the same on every rank, different from epoch to epoch."""
    order = list(shard_urls)
    random.Random(_seed_int(seed, epoch)).shuffle(order)
    return order


def worker_shards(
    *, shard_urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards one worker of one rank reads: every world_size-th from `rank`, then every num_workers-th."""
    return list(shard_urls)[rank::world_size][worker::max(1, num_workers)]


# =====================================================================================
# Reading
# =====================================================================================


class _SkipAndCount:
    """Webdataset exception handler: skip the broken sample or shard, count it, warn at most every 30 s."""

    def __init__(self, interval_s: float = 30.0):
        self.num_skipped = 0
        self.interval_s = interval_s
        self._last_warning = -float("inf")

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, _DataSetupError):
            raise exn
        self.num_skipped += 1
        now = time.monotonic()
        if now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning("skipping broken sample (%d skipped so far in this worker): %r", self.num_skipped, exn)
        return True


class _DataSetupError(ValueError):
    """A configuration error (e.g. a posterior asked for but absent): never skipped."""


def _image_bytes(sample: Mapping[str, Any]) -> bytes:
    for ext in (*IMAGE_EXTENSIONS, "jpeg"):
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_EXTENSIONS)})")


def _decode_image(sample: Mapping[str, Any]) -> Image.Image:
    with Image.open(io.BytesIO(_image_bytes(sample))) as image:
        return image.convert("RGB")


try:
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec (a further dependency, not
    # taken yet) but ships them; once a release drops them, every image goes through PIL.
    from torchvision.io import ImageReadMode, decode_image

    warnings.filterwarnings(
        "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
        category=DeprecationWarning,
    )
except ImportError:  # pragma: no cover - a torchvision without image decoders
    decode_image = None


def _decode_image_uint8(sample: Mapping[str, Any]) -> torch.Tensor:
    """uint8 3 x H x W RGB. torchvision.io decodes straight into a tensor, 1.9x faster than PIL +
    convert + to-tensor on 341 x 256 JPEGs with the same pixels (BENCHMARKS.md, P3); what it
    cannot give as 8-bit RGB (e.g. a 16-bit PNG) goes through PIL, as every image used to."""
    data = _image_bytes(sample)
    if decode_image is not None:
        try:
            # bytearray: a writable copy (~30 us for 100 KB) that torch wraps without a warning
            image_CHW = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if image_CHW.dtype == torch.uint8:
                return image_CHW
        except RuntimeError:
            pass  # PIL decides: it decodes what torchvision does not, and raises on a broken image
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@dataclass
class _SampleDecoder:
    transform: Callable | None
    num_classes: int | None
    with_posterior: bool

    def __call__(self, sample: Mapping[str, Any]) -> dict:
        if isinstance(self.transform, ImageTransform):
            # its geometry takes tensors; uint8 out, the batch is normalised in _Collate or later
            image_CHW = self.transform.geometry(_decode_image_uint8(sample))
        elif self.transform is not None:
            image_CHW = self.transform(_decode_image(sample))  # any other transform gets a PIL image, as documented
        else:
            image_CHW = _decode_image_uint8(sample).float().div_(255.0)
        out = {
            "image": image_CHW,
            "label": int(sample["cls"]),
            "idx": int(sample["idx"]),
            "key": sample["__key__"],
        }
        if self.with_posterior:
            if "post.npy" not in sample:
                raise _DataSetupError(
                    f"with_posterior=True but sample {sample['__key__']!r} has no post.npy "
                    "(only synthetic shards carry posteriors)"
                )
            post_2M = np.load(io.BytesIO(sample["post.npy"]), allow_pickle=False)
            out["posterior"] = decode_posterior(post_2M=post_2M, num_classes=self.num_classes)
        return out


def _shared_float_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 tensor; in a loader worker, in shared memory, where the batch must go to reach
    the main process (a plain tensor would be copied there once more when pickled: 0.3 ms per
    3 x 224 x 224 image). The same calls as torch's default_collate."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    elem = torch.empty(0, dtype=torch.float32)
    storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device=elem.device)
    return elem.new(storage).resize_(*shape)


@dataclass
class _Collate:
    """Samples -> one batch dict. uint8 images from an ImageTransform's geometry are normalised here
    in one pass over the batch, or, with normalize=False, left uint8 for the consumer."""

    transform: Callable | None
    normalize: bool = True

    def __call__(self, samples: list[dict]) -> dict:
        images = [s["image"] for s in samples]
        if isinstance(self.transform, ImageTransform) and self.normalize:
            uint8_BCHW = torch.stack(images)
            image_batch = self.transform.finish(uint8_BCHW, out=_shared_float_batch(tuple(uint8_BCHW.shape)))
        else:
            # default_collate stacks straight into shared memory in a loader worker (see above).
            image_batch = torch.utils.data.default_collate(images)
        batch = {
            "image": image_batch,
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "idx": torch.tensor([s["idx"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples],
        }
        if "posterior" in samples[0]:
            batch["posterior"] = torch.from_numpy(np.stack([s["posterior"] for s in samples]))
        return batch


def _check_normalize(transform: Callable | None, normalize: bool) -> None:
    if not normalize and not isinstance(transform, ImageTransform):
        raise ValueError(
            f"normalize=False needs an ImageTransform (avgk.data.transforms.build_transform) to leave uint8 "
            f"images for the consumer, got transform={transform!r}"
        )


class _ShardStream(torch.utils.data.IterableDataset):
    """Batches from the shards one (rank, worker) owns; the worker index comes from torch, never from env vars."""

    def __init__(
        self,
        *,
        shard_urls: Sequence[str],
        training: bool,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        resampled: bool,
        shuffle_buffer: int,
        batch_size: int,
        decoder: _SampleDecoder,
        normalize: bool = True,
    ):
        super().__init__()
        self.normalize = normalize
        self.shard_urls = list(shard_urls)
        self.training = training
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.decoder = decoder
        self.handler = _SkipAndCount()
        self._num_read = 0
        """Encoded samples read from this worker's shards so far."""
        self._pass_size = 0
        """Encoded samples read in the last complete pass over this worker's shards (0: none yet)."""
        self._worker_shards: list[str] = []
        """The shards this worker cycles over (training), for error messages."""

    @property
    def num_skipped(self) -> int:
        """Broken samples skipped so far (in this process; each worker process counts its own)."""
        return self.handler.num_skipped

    def _urls(self, worker: int, num_workers: int) -> Iterator[str]:
        if not self.training:
            yield from worker_shards(
                shard_urls=self.shard_urls,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
            )
            return
        if self.resampled:
            mine = self.shard_urls
            rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker, 1))
            draw = lambda order: [rng.choice(mine) for _ in mine]  # noqa: E731
        else:
            mine = worker_shards(
                shard_urls=epoch_shard_order(shard_urls=self.shard_urls, seed=self.seed, epoch=self.epoch),
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
            )
            rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker, 2))
            draw = lambda order: rng.sample(order, len(order))  # noqa: E731
        self._worker_shards = mine
        order = list(mine)  # pass 0 keeps the epoch order; later passes reshuffle
        empty_passes = 0
        while True:
            read_before = self._num_read
            yield from order
            # an endless stream over shards that hold nothing readable would otherwise spin forever
            # (shards whose samples read but do not decode: see _decoded)
            self._pass_size = self._num_read - read_before
            empty_passes = empty_passes + 1 if self._pass_size == 0 else 0
            if empty_passes >= 3:
                raise self._stalled(worker)
            order = draw(order)

    def _stalled(self, worker: int) -> RuntimeError:
        mine = self._worker_shards
        return RuntimeError(
            f"rank {self.rank} worker {worker}: no readable sample in 3 passes over its "
            f"{len(mine)} shards (e.g. {mine[:3]}); {self.num_skipped} broken samples or shards skipped"
        )

    def _read(self, urls: Iterator[str]) -> Iterator[dict]:
        for sample in wds.tarfile_samples(({"url": url} for url in urls), handler=self.handler):
            self._num_read += 1
            yield sample

    def _decoded(self, samples: Iterator[dict], worker: int) -> Iterator[dict]:
        failures = 0  # consecutive samples that did not decode
        for sample in samples:
            try:
                decoded = self.decoder(sample)
            except Exception as exn:  # noqa: BLE001 - the handler skips and counts, or re-raises setup errors
                self.handler(exn)
                failures += 1
                # Training streams never end: once every sample of 3 passes (plus whatever the
                # shuffle buffer held) failed, nothing in these shards decodes.
                if self.training and self._pass_size and failures >= 3 * self._pass_size + self.shuffle_buffer:
                    raise self._stalled(worker) from None
                continue
            failures = 0
            yield decoded

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._num_read = self._pass_size = 0
        samples = self._read(self._urls(worker, num_workers))
        if self.training and self.shuffle_buffer > 1:
            # The buffer shuffles encoded samples and decoding comes after it (the open_clip
            # order): it holds compressed bytes, not transformed float tensors (7-20x larger at
            # 224 px: ~600 MB per worker for 1,000 samples), and the samples still in it when
            # the epoch's last batch is taken are never decoded (decoding first wasted
            # shuffle_buffer decodes + transforms per worker and epoch).
            rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker, 3))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        decoded = self._decoded(samples, worker)
        collate = _Collate(self.decoder.transform, normalize=self.normalize)
        yield from wds.batched(self.batch_size, collation_fn=collate, partial=not self.training)(decoded)


def _check_rank(*, rank: int, world_size: int, num_workers: int, batch_size: int) -> None:
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if int(rank) != rank or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _loader(dataset: _ShardStream, *, num_workers: int, seed: int, pin_memory: bool) -> wds.WebLoader:
    generator = torch.Generator()
    # makes the torch seeds of the workers (hence random augmentations) reproducible
    generator.manual_seed(_seed_int(seed, dataset.epoch, dataset.rank, 4) % (1 << 63))
    return wds.WebLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        generator=generator,
    )


def train_loader(
    *,
    shards_dir: str | os.PathLike,
    split: str = "train",
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    transform: Callable | None,
    num_batches: int,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    pin_memory: bool = False,
    normalize: bool = True,
) -> wds.WebLoader:
    """A loader yielding exactly `num_batches` full batches of `batch_size` on this rank; build one per epoch.

    The open_clip scheme: every rank shuffles the full shard list with the same seed
    (seed, epoch), takes every world_size-th shard from its rank, then every
    num_workers-th of those per dataloader worker, so ranks x workers partition the shards.
    Each worker cycles over its shards (reshuffled on every pass after the first) and
    shuffles samples in a buffer of `shuffle_buffer`; partial batches are dropped, and the
    loader stops after `num_batches` batches, so no rank runs short and every rank takes the
    same number of steps. `resampled=True` instead draws shards with replacement, seeded by
    (seed, epoch, rank, worker). Rank and world size come from the arguments only
    (webdataset's RANK/WORLD_SIZE environment lookup is not used). Broken samples are
    skipped, counted and warned about at most every 30 s. Batches: {"image": float32 B x 3 x H x W, "label": int64 B,
    "idx": int64 B, "key": list[str]}. `transform` maps a PIL image to a 3 x H x W tensor
    (None: [0, 1] floats, no augmentation). An ImageTransform (build_transform's) runs its
    geometry per image and normalises each batch in one pass; with `normalize=False` the images
    stay uint8 B x 3 x H x W, for the consumer to normalise where the model runs
    (avgk.engine.model_input): 4x less shared memory and host-to-device traffic.
    """
    _check_rank(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    _check_normalize(transform, normalize)
    if int(num_batches) != num_batches or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(shuffle_buffer) != shuffle_buffer or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}")
    manifest = read_manifest(shards_dir)
    urls = manifest.shard_urls(split)
    num_streams = world_size * max(1, num_workers)
    if not urls:
        raise ValueError(f"split {split!r} in {manifest.root} has no shards to train on")
    if not resampled and len(urls) < num_streams:
        raise ValueError(
            f"split {split!r} has {len(urls)} shards, fewer than world_size x max(1, num_workers) = "
            f"{world_size} x {max(1, num_workers)} = {num_streams}: every worker needs a shard; "
            "write more shards (a smaller maxcount) or use resampled=True"
        )
    dataset = _ShardStream(
        shard_urls=urls,
        training=True,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        batch_size=batch_size,
        decoder=_SampleDecoder(transform=transform, num_classes=manifest.num_classes, with_posterior=False),
        normalize=normalize,
    )
    return _loader(dataset, num_workers=num_workers, seed=seed, pin_memory=pin_memory).with_epoch(num_batches)


def eval_loader(
    *,
    shards_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    transform: Callable | None,
    num_classes: int | None = None,
    with_posterior: bool = False,
    pin_memory: bool = False,
    normalize: bool = True,
) -> wds.WebLoader:
    """A deterministic loader reading each sample of the split exactly once across all ranks.

    Shard i goes to rank i % world_size, then to that rank's workers in turn; the last batch
    of each worker may be partial, and a rank without shards yields nothing. With
    `with_posterior`, batches also hold "posterior": float32 B x L (L = num_classes, by
    default the manifest's). `transform` and `normalize` as in train_loader.
    """
    _check_rank(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    _check_normalize(transform, normalize)
    manifest = read_manifest(shards_dir)
    urls = manifest.shard_urls(split)
    if num_classes is None:
        num_classes = manifest.num_classes
    elif num_classes < manifest.num_classes:
        raise ValueError(f"num_classes must be >= the manifest's {manifest.num_classes}, got {num_classes}")
    dataset = _ShardStream(
        shard_urls=urls,
        training=False,
        rank=rank,
        world_size=world_size,
        seed=0,
        epoch=0,
        resampled=False,
        shuffle_buffer=0,
        batch_size=batch_size,
        decoder=_SampleDecoder(transform=transform, num_classes=num_classes, with_posterior=with_posterior),
        normalize=normalize,
    )
    return _loader(dataset, num_workers=num_workers, seed=0, pin_memory=pin_memory)


def num_train_batches(*, num_samples: int, batch_size: int, world_size: int) -> int:
    """Steps per epoch so that every rank sees about one pass: floor(num_samples / (batch_size * world_size))."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    num_batches = int(num_samples) // (int(batch_size) * int(world_size))
    if num_batches < 1:
        raise ValueError(
            f"num_samples={num_samples} is less than batch_size x world_size = {batch_size} x {world_size} "
            f"= {batch_size * world_size}: not one full batch per rank"
        )
    return num_batches
