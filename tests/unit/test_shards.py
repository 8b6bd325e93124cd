"""Shards: write/read round trip, rank and worker splitting, atomic writes, manifest errors, transforms."""

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avgk.data.loaders import epoch_shard_order, eval_loader, num_train_batches, train_loader, worker_shards
from avgk.data.manifest import MANIFEST_NAME, decode_posterior, encode_posterior, read_manifest, write_manifest
from avgk.data.shards import write_split, write_synthetic_shards
from avgk.data.synthetic import generate_synthetic
from avgk.data.transforms import build_transform

SETTINGS = dict(
    num_classes=10,
    num_train=400,
    num_val=150,
    num_test=120,
    image_size=16,
    zipf_exponent=1.0,
    ambiguity_rate=0.4,
    seed=7,
    maxcount=50,
)
SPLIT_SIZES = {"train": 400, "val": 150, "test": 120}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(shards_dir=root, **SETTINGS)
    return root


@pytest.fixture(scope="module")
def reference():
    """The generated arrays the shards were written from."""
    gen = {k: SETTINGS[k] for k in ("num_classes", "image_size", "zipf_exponent", "ambiguity_rate", "seed")}
    return {split: generate_synthetic(num_samples=n, split=split, **gen) for split, n in SPLIT_SIZES.items()}


def _png(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(n, *, num_classes=3, split="x"):
    for i in range(n):
        yield {"key": f"{split}-{i:08d}", "image": _png(i % 255), "ext": "png", "cls": i % num_classes, "idx": i}


def _read_all(loader):
    return list(loader)


# ------------------------------------------------------------------------------------
# Manifest and round trip
# ------------------------------------------------------------------------------------


def test_manifest_describes_the_shards(shards, reference):
    manifest = read_manifest(shards)
    assert manifest.num_classes == 10 and manifest.source == "synthetic"
    assert manifest.settings == SETTINGS
    assert set(manifest.classes) == set(range(10))
    for split, n in SPLIT_SIZES.items():
        info = manifest.splits[split]
        assert info.num_samples == n
        assert len(info.shards) == -(-n // SETTINGS["maxcount"])
        assert info.shards[0] == f"{split}/shard-000000.tar"
        assert list(info.class_counts) == np.bincount(reference[split].labels_N, minlength=10).tolist()
        assert all(Path(url).is_file() and os.path.isabs(url) for url in manifest.shard_urls(split))
    raw = json.loads((shards / MANIFEST_NAME).read_text())
    assert raw["format_version"] == 1 and raw["classes"]["0"] == "class_0"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_round_trip_reads_every_sample_once(shards, reference, world_size, num_workers):
    for split in ("train", "val", "test"):
        data = reference[split]
        seen_idx = []
        for rank in range(world_size):
            loader = eval_loader(
                shards_dir=shards, split=split, batch_size=32, rank=rank, world_size=world_size,
                num_workers=num_workers, transform=None, with_posterior=True,
            )
            for batch in loader:
                idx = batch["idx"].numpy()
                assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 16, 16)
                assert batch["label"].dtype == torch.int64
                np.testing.assert_array_equal(batch["label"].numpy(), data.labels_N[idx])
                np.testing.assert_allclose(batch["posterior"].numpy(), data.posterior_NL()[idx], atol=1e-7)
                assert batch["key"] == [f"{split}-{i:08d}" for i in idx]
                seen_idx.extend(idx.tolist())
        assert sorted(seen_idx) == list(range(SPLIT_SIZES[split]))


def test_images_survive_the_round_trip_losslessly(shards, reference):
    batch = next(iter(eval_loader(
        shards_dir=shards, split="val", batch_size=8, rank=0, world_size=1, num_workers=0, transform=None,
    )))
    pixels_NHWC = np.rint(batch["image"].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels_NHWC, reference["val"].images_NHWC[batch["idx"].numpy()])
    assert "posterior" not in batch


def test_ranks_without_shards_yield_nothing(shards):
    # val has 3 shards; ranks 3 and 4 of 5 get none
    counts = []
    for rank in range(5):
        loader = eval_loader(
            shards_dir=shards, split="val", batch_size=64, rank=rank, world_size=5, num_workers=0, transform=None
        )
        counts.append(sum(len(b["idx"]) for b in loader))
    assert counts[3:] == [0, 0] and sum(counts) == 150


def test_explicit_rank_beats_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    loader = eval_loader(
        shards_dir=shards, split="test", batch_size=64, rank=0, world_size=1, num_workers=0, transform=None
    )
    assert sum(len(b["idx"]) for b in loader) == 120


# ------------------------------------------------------------------------------------
# Training loader
# ------------------------------------------------------------------------------------


def test_train_loader_yields_exactly_num_batches_on_every_rank(shards):
    # 400 samples / 2 ranks = 200 per rank < 20 x 16: each worker must cycle over its shards
    for rank in range(2):
        loader = train_loader(
            shards_dir=shards, batch_size=16, rank=rank, world_size=2, num_workers=2, epoch=0, seed=0,
            transform=build_transform(train=True, resize=16, crop=16), num_batches=20, shuffle_buffer=50,
        )
        batches = _read_all(loader)
        assert len(batches) == 20
        assert all(b["image"].shape == (16, 3, 16, 16) and len(b["key"]) == 16 for b in batches)
        assert all(b["label"].dtype == torch.int64 and b["idx"].dtype == torch.int64 for b in batches)


def test_epoch_shard_order_is_shared_by_ranks_and_changes_with_epoch(shards):
    urls = read_manifest(shards).shard_urls("train")
    orders = {epoch: epoch_shard_order(shard_urls=urls, seed=5, epoch=epoch) for epoch in range(3)}
    assert orders[0] == epoch_shard_order(shard_urls=urls, seed=5, epoch=0)
    assert len({tuple(order) for order in orders.values()}) == 3
    for order in orders.values():
        assert sorted(order) == sorted(urls)
        views = [
            worker_shards(shard_urls=order, rank=r, world_size=2, worker=w, num_workers=2)
            for r in range(2)
            for w in range(2)
        ]
        flat = [url for view in views for url in view]
        assert sorted(flat) == sorted(urls), "ranks x workers must partition the shards"


@pytest.mark.parametrize("epoch", [0, 1])
def test_train_loader_reads_its_ranks_shards(shards, epoch):
    urls = read_manifest(shards).shard_urls("train")
    order = epoch_shard_order(shard_urls=urls, seed=0, epoch=epoch)
    for rank in range(2):
        loader = train_loader(
            shards_dir=shards, batch_size=50, rank=rank, world_size=2, num_workers=0, epoch=epoch, seed=0,
            transform=None, num_batches=4, shuffle_buffer=0,
        )
        first_pass = [b["idx"].numpy() for b in loader]
        shard_of_batch = [int(idx[0]) // SETTINGS["maxcount"] for idx in first_pass]
        expected = worker_shards(shard_urls=order, rank=rank, world_size=2, worker=0, num_workers=1)
        assert [urls[i] for i in shard_of_batch] == expected


def test_train_samples_are_shuffled_within_the_buffer(shards):
    loader = train_loader(
        shards_dir=shards, batch_size=50, rank=0, world_size=1, num_workers=0, epoch=0, seed=0,
        transform=None, num_batches=2, shuffle_buffer=100,
    )
    first = next(iter(loader))["idx"].numpy()
    assert len(set(first // SETTINGS["maxcount"])) > 1 or not np.all(np.diff(first) == 1)


def test_too_few_shards_raises_unless_resampled(shards):
    # train has 8 shards; 3 ranks x 3 workers need 9
    kwargs = dict(
        shards_dir=shards, batch_size=8, rank=0, world_size=3, num_workers=3, epoch=0, seed=0,
        transform=None, num_batches=2,
    )
    with pytest.raises(ValueError, match=r"8 shards.*3 x 3 = 9.*resampled=True"):
        train_loader(**kwargs)
    batches = _read_all(train_loader(**{**kwargs, "num_workers": 0, "world_size": 16, "resampled": True}))
    assert len(batches) == 2 and all(len(b["idx"]) == 8 for b in batches)


def test_num_train_batches():
    assert num_train_batches(num_samples=1000, batch_size=32, world_size=2) == 15
    with pytest.raises(ValueError, match=r"num_samples=10.*32 x 2 = 64"):
        num_train_batches(num_samples=10, batch_size=32, world_size=2)


# ------------------------------------------------------------------------------------
# Writing: validation, atomicity, idempotence, broken samples
# ------------------------------------------------------------------------------------


def test_label_outside_range_raises_naming_key_and_value(tmp_path):
    bad = [*_samples(5), {"key": "x-00000005", "image": _png(), "ext": "png", "cls": 3, "idx": 5}]
    with pytest.raises(ValueError, match=r"'x-00000005'.*\[0, 3\).*got 3"):
        write_split(samples=bad, shards_dir=tmp_path, split="x", num_classes=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    entry = write_split(samples=_samples(20), shards_dir=tmp_path, split="val", num_classes=3, maxcount=8)
    write_manifest(shards_dir=tmp_path, source="test", settings={}, classes=["a", "b", "c"], splits={"val": entry})
    old_val = sorted(p.name for p in (tmp_path / "val").iterdir())

    def interrupted(split):
        yield from _samples(12, split=split)
        raise KeyboardInterrupt("stopped mid-write")

    for split in ("train", "val"):
        with pytest.raises(KeyboardInterrupt):
            write_split(samples=interrupted(split), shards_dir=tmp_path, split=split, num_classes=3, maxcount=8)
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert not (tmp_path / "train").exists()
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == old_val, "the old split stays whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"], "no partial folder left behind"
    with pytest.raises(FileNotFoundError, match="avgk prepare CONFIG"):
        read_manifest(tmp_path)


def test_write_split_checks_idx_and_keys(tmp_path):
    gap = [dict(s, idx=s["idx"] * 2) for s in _samples(4)]
    with pytest.raises(ValueError, match=r"idx values must be exactly 0\.\.3"):
        write_split(samples=gap, shards_dir=tmp_path, split="x", num_classes=3)
    dotted = [dict(s, key="a.b") for s in _samples(1)]
    with pytest.raises(ValueError, match=re.escape("'a.b'")):
        write_split(samples=dotted, shards_dir=tmp_path, split="x", num_classes=3)
    assert not (tmp_path / "x").exists()


def test_read_manifest_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'}.*avgk prepare CONFIG"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"{MANIFEST_NAME}.*avgk prepare CONFIG"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"'holdout'.*\['test', 'train', 'val'\]"):
        read_manifest(shards).shard_urls("holdout")


def test_write_manifest_checks_class_counts(tmp_path):
    entry = write_split(samples=_samples(6), shards_dir=tmp_path, split="x", num_classes=3)
    assert entry["class_counts"] == [2, 2, 2] and entry["num_samples"] == 6
    with pytest.raises(ValueError, match=r"one entry per class.*4.*got 3"):
        write_manifest(shards_dir=tmp_path, source="t", settings={}, classes=list("abcd"), splits={"x": entry})
    manifest = write_manifest(
        shards_dir=tmp_path, source="t", settings={"k": 1}, classes={0: "a", 1: "b", 2: "c"}, splits={"x": entry}
    )
    assert read_manifest(tmp_path) == manifest


def test_write_synthetic_shards_is_idempotent(tmp_path):
    settings = {**SETTINGS, "num_train": 40, "num_val": 20, "num_test": 20, "maxcount": 20}
    first = write_synthetic_shards(shards_dir=tmp_path, **settings)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = write_synthetic_shards(shards_dir=tmp_path, **settings)
    assert again == first
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    first_shard = (tmp_path / first.splits["train"].shards[0]).read_bytes()
    changed = write_synthetic_shards(shards_dir=tmp_path, **{**settings, "seed": 8})
    assert changed.settings["seed"] == 8 and read_manifest(tmp_path).settings["seed"] == 8
    assert (tmp_path / changed.splits["train"].shards[0]).read_bytes() != first_shard


def test_broken_samples_are_skipped_and_counted(tmp_path, caplog):
    samples = list(_samples(10))
    samples[4] = dict(samples[4], image=b"not a png")
    entry = write_split(samples=samples, shards_dir=tmp_path, split="x", num_classes=3)
    write_manifest(shards_dir=tmp_path, source="t", settings={}, classes=list("abc"), splits={"x": entry})
    loader = eval_loader(shards_dir=tmp_path, split="x", batch_size=4, rank=0, world_size=1, num_workers=0,
                         transform=None)
    idx = [i for b in loader for i in b["idx"].tolist()]
    assert idx == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert loader.pipeline[0].dataset.num_skipped == 1
    assert "skipping broken sample (1 skipped so far" in caplog.text


def test_training_on_unreadable_shards_fails_instead_of_spinning(tmp_path):
    samples = [dict(s, image=b"not a png") for s in _samples(6)]
    entry = write_split(samples=samples, shards_dir=tmp_path, split="x", num_classes=3, maxcount=3)
    write_manifest(shards_dir=tmp_path, source="t", settings={}, classes=list("abc"), splits={"x": entry})
    loader = train_loader(shards_dir=tmp_path, split="x", batch_size=2, rank=0, world_size=1, num_workers=0,
                          epoch=0, seed=0, transform=None, num_batches=3)
    with pytest.raises(RuntimeError, match="no readable sample in 3 passes"):
        _read_all(loader)


def test_missing_posterior_is_an_error_not_a_skip(tmp_path):
    entry = write_split(samples=_samples(3), shards_dir=tmp_path, split="x", num_classes=3)
    write_manifest(shards_dir=tmp_path, source="t", settings={}, classes=list("abc"), splits={"x": entry})
    loader = eval_loader(shards_dir=tmp_path, split="x", batch_size=4, rank=0, world_size=1, num_workers=0,
                         transform=None, with_posterior=True)
    with pytest.raises(ValueError, match=r"with_posterior=True.*'x-00000000'.*post\.npy"):
        _read_all(loader)


def test_posterior_encoding_round_trip():
    post_2M = encode_posterior(indices=np.array([3, 1, -1]), probs=np.array([0.7, 0.3, 0.0]))
    assert post_2M.shape == (2, 3) and post_2M.dtype == np.float32
    dense = decode_posterior(post_2M=post_2M, num_classes=5)
    np.testing.assert_allclose(dense, [0, 0.3, 0, 0.7, 0])
    with pytest.raises(ValueError, match="class id 3 is >= num_classes=3"):
        decode_posterior(post_2M=post_2M, num_classes=3)


# ------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train, resize, crop, size",
    [(True, 32, 32, 32), (False, 32, 28, 32), (True, 256, 224, 300), (False, 256, 224, 300)],
)
def test_transforms_output_normalised_tensors(train, resize, crop, size):
    transform = build_transform(train=train, resize=resize, crop=crop)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size + 20, 3), dtype=np.uint8))
    out = transform(image)
    assert out.shape == (3, crop, crop) and out.dtype == torch.float32
    assert -3.0 < float(out.mean()) < 3.0


def test_transform_rejects_crop_larger_than_resize():
    with pytest.raises(ValueError, match=r"crop must be <= resize.*crop=40 > resize=32"):
        build_transform(train=False, resize=32, crop=40)


def _plain_v2_chain(*, train: bool, resize: int, crop: int):
    """The one-piece v2 chain build_transform used to return: ToImage, geometry, ToDtype, Normalize per image."""
    from torchvision.transforms import v2

    from avgk.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if train:
        geometry = [v2.Resize(resize, antialias=True), v2.RandomCrop(crop, padding=max(1, crop // 8)),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))])


@pytest.mark.parametrize("train", [True, False])
def test_split_transform_equals_the_one_piece_chain_bit_for_bit(train):
    # geometry per image + finish per batch must give the values the per-image chain gives
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(6)]
    split, plain = build_transform(train=train, resize=18, crop=16), _plain_v2_chain(train=train, resize=18, crop=16)
    torch.manual_seed(0)
    expected = torch.stack([plain(image) for image in images])
    torch.manual_seed(0)
    geometry = torch.stack([split.geometry(image) for image in images])
    assert geometry.dtype == torch.uint8 and geometry.shape == (6, 3, 16, 16)
    assert torch.equal(split.finish(geometry), expected)
    torch.manual_seed(0)
    assert torch.equal(torch.stack([split(image) for image in images]), expected)
    assert type(split(images[0])) is torch.Tensor  # a plain tensor, not a tv_tensors.Image


def test_finish_rejects_a_float_batch():
    rule = r"normalize_batch expects a uint8 B x 3 x H x W batch, got torch.float32 of shape \(2, 3, 4, 4\)"
    with pytest.raises(ValueError, match=rule):
        build_transform(train=False, resize=4, crop=4).finish(torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_batches_equal_the_per_image_transform(shards, reference, num_workers):
    # the loader finishes uint8 batches in one pass (in the worker, into shared memory with a worker)
    transform = build_transform(train=False, resize=16, crop=12)
    loader = eval_loader(shards_dir=shards, split="val", batch_size=32, rank=0, world_size=1,
                         num_workers=num_workers, transform=transform)
    seen = 0
    for batch in loader:
        idx = batch["idx"].numpy()
        expected = torch.stack([transform(Image.fromarray(reference["val"].images_NHWC[i])) for i in idx])
        assert batch["image"].dtype == torch.float32
        assert torch.equal(batch["image"], expected)
        seen += len(idx)
    assert seen == SPLIT_SIZES["val"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_uint8_batches_normalised_later_equal_the_loader_normalised_ones(shards, num_workers):
    # normalize=False: the consumer (avgk.models.inputs.model_input) normalises where the model runs
    transform = build_transform(train=False, resize=16, crop=16)
    common = dict(shards_dir=shards, split="test", batch_size=32, rank=0, world_size=1, num_workers=num_workers,
                  transform=transform)
    floats, uint8s = list(eval_loader(**common)), list(eval_loader(**common, normalize=False))
    assert len(floats) == len(uint8s) == 4
    for f, u in zip(floats, uint8s, strict=True):
        assert u["image"].dtype == torch.uint8 and torch.equal(u["idx"], f["idx"])
        assert torch.equal(transform.finish(u["image"]), f["image"])


def test_normalize_batch_chunks_and_memory_formats_give_the_same_values(monkeypatch):
    from avgk.data import transforms

    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    whole = transforms.normalize_batch(images)
    monkeypatch.setattr(transforms, "CPU_CHUNK_BYTES", 3 * 5 * 6 * 4 * 2)  # chunks of 2 images: 2+2+2+1
    assert torch.equal(transforms.normalize_batch(images), whole)
    last = transforms.normalize_batch(images, memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, whole)


def test_normalize_false_needs_an_image_transform(shards):
    with pytest.raises(ValueError, match=r"normalize=False needs an ImageTransform.*got transform=None"):
        eval_loader(shards_dir=shards, split="test", batch_size=8, rank=0, world_size=1, num_workers=0,
                    transform=None, normalize=False)


def _encoded(image_HWC: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["jpg-rgb", "jpg-gray", "png-rgb", "png-rgba", "png-16bit-gray"])
def test_tensor_decoding_gives_the_pixels_pil_gives(kind):
    # Loaders with an ImageTransform decode with torchvision.io (faster); it must match PIL's RGB,
    # which predict and any other transform use, and fall back to PIL where it cannot give 8-bit RGB.
    from avgk.data.decoding import decode_sample_image, decode_sample_image_uint8

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    data = {
        "jpg-rgb": lambda: ("jpg", _encoded(rgb, "JPEG", quality=90)),
        "jpg-gray": lambda: ("jpg", _encoded(rgb[..., 0], "JPEG", quality=90)),
        "png-rgb": lambda: ("png", _encoded(rgb, "PNG")),
        "png-rgba": lambda: ("png", _encoded(np.dstack([rgb, rgb[..., :1]]), "PNG")),
        "png-16bit-gray": lambda: ("png", _encoded(rng.integers(0, 65536, (21, 34)).astype(np.uint16), "PNG")),
    }[kind]()
    sample = {"__key__": "k", data[0]: data[1]}
    tensor = decode_sample_image_uint8(sample)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 21, 34)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(decode_sample_image(sample)))


@pytest.mark.parametrize("broken", ["garbage", "truncated"])
def test_a_broken_image_raises_what_pil_raises_for_the_skip_handler(broken):
    # torchvision's decoder fails on it, PIL then raises its own error (not a half-decoded image)
    from avgk.data.decoding import decode_sample_image_uint8

    jpeg = _encoded(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    data = b"not an image at all" if broken == "garbage" else jpeg[: len(jpeg) // 2]
    with pytest.raises(OSError, match="cannot identify image file" if broken == "garbage" else "truncated"):
        decode_sample_image_uint8({"__key__": "k", "jpg": data})
