"""`avgk prepare` sources: imagefolder, plantnet300k and cifar100 trees built on the fly -> shards that round-trip."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avgk.config import ConfigError, build_config
from avgk.data.loaders import eval_loader
from avgk.data.manifest import MANIFEST_NAME, read_manifest
from avgk.data.prepare import prepare
from avgk.data.sources import (
    HIDDEN_REASON,
    SPECIES_NAMES_FILE,
    ConvertOptions,
    block_label_noise,
    encode_image,
    ratio_split,
    stratified_holdout,
)

# =====================================================================================
# Fake inputs
# =====================================================================================


def _image(path: Path, *, seed: int, size: tuple[int, int] = (20, 14), fmt: str = "JPEG") -> Path:
    """A unique random image (its seed makes its bytes unique)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _corrupt_jpeg(path: Path) -> Path:
    """A JPEG cut in half: PIL opens it, decoding fails."""
    _image(path, seed=999, size=(64, 48))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# split -> class -> number of good images ("emu" is absent from val, "zebra" is an empty folder)
SPLIT_TREE = {
    "train": {"cat": 3, "dog": 3, "emu": 2, "zebra": 0},
    "val": {"cat": 1, "dog": 1},
    "test": {"cat": 1, "dog": 1, "emu": 1},
}
CLASSES = ["cat", "dog", "emu", "zebra"]


def make_split_tree(root: Path, *, strays: bool = True, corrupt: bool = True) -> dict[str, list[tuple[str, int]]]:
    """root/<split>/<class>/... with a PNG, a nested sub-folder, strays and a corrupt JPEG.

    Returns split -> sorted [(relative path, class id)] of the readable images.
    """
    expected: dict[str, list[tuple[str, int]]] = {}
    seed = 0
    for split, classes in SPLIT_TREE.items():
        good = []
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                rel = f"{split}/{name}/img{i}.png" if i == 0 else f"{split}/{name}/img{i}.jpg"
                if split == "train" and name == "cat" and i == 2:
                    rel = f"{split}/{name}/sub/img{i}.jpg"
                _image(root / rel, seed=seed, fmt="PNG" if rel.endswith(".png") else "JPEG")
                good.append((rel, CLASSES.index(name)))
        expected[split] = sorted(good)
    if corrupt:
        _corrupt_jpeg(root / "train/dog/broken.jpg")
    if strays:
        (root / "train/cat/notes.txt").write_text("not an image")
        (root / "train/dog/.DS_Store").write_bytes(b"\0\1")
        (root / "val/README.md").write_text("stray file in a split folder")
        (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    return expected


def read_split(shards: Path, split: str) -> list[dict]:
    """Every sample of a split, read straight from the tars, sorted by idx."""
    manifest = read_manifest(shards)
    samples: dict[str, dict] = {}
    for url in manifest.shard_urls(split):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {"key": key})[ext] = tar.extractfile(member).read()
    out = []
    for sample in samples.values():
        ext = "jpg" if "jpg" in sample else "png"
        out.append({"key": sample["key"], "ext": ext, "image": sample[ext], "cls": int(sample["cls"]),
                    "idx": int(sample["idx"])})
    return sorted(out, key=lambda s: s["idx"])


def _config(root: Path, shards: Path, *overrides: str, source: str = "imagefolder"):
    return build_config({}, [f"data.source={source}", f"data.root={root}", f"data.shards={shards}",
                             "data.prepare_workers=1", *overrides])


def _prepare(root: Path, shards: Path, *overrides: str, source: str = "imagefolder"):
    return prepare(_config(root, shards, *overrides, source=source), progress=False)


def _mtimes(shards: Path) -> dict[str, int]:
    return {str(p.relative_to(shards)): p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# =====================================================================================
# imagefolder
# =====================================================================================


def test_imagefolder_split_layout_round_trips(tmp_path):
    root, shards = tmp_path / "src", tmp_path / "shards"
    expected = make_split_tree(root)
    manifest = _prepare(root, shards, "data.shard_maxcount=2")

    assert manifest.source == "imagefolder"
    assert manifest.classes == dict(enumerate(CLASSES))  # sorted folder names; empty zebra kept
    assert set(manifest.splits) == {"train", "val", "test"}
    for split, items in expected.items():
        samples = read_split(shards, split)
        assert [s["idx"] for s in samples] == list(range(len(items)))  # every readable image exactly once
        assert [s["cls"] for s in samples] == [cls for _, cls in items]
        # no resize: the original bytes, in sorted-path order, with the right extension
        assert [s["image"] for s in samples] == [(root / rel).read_bytes() for rel, _ in items]
        assert [s["ext"] for s in samples] == ["png" if rel.endswith(".png") else "jpg" for rel, _ in items]
        info = manifest.split(split)
        assert info.num_samples == len(items)
        assert list(info.class_counts) == [sum(c == k for _, c in items) for k in range(len(CLASSES))]
    assert manifest.split("val").class_counts[CLASSES.index("emu")] == 0
    assert len(manifest.split("train").shards) == 4  # 8 samples, 2 per shard

    reasons = {s["path"]: s["reason"] for split in manifest.splits for s in manifest.split(split).skipped}
    assert set(reasons) == {"train/dog/broken.jpg", "train/cat/notes.txt", "train/dog/.DS_Store", "val/README.md"}
    assert reasons["train/dog/broken.jpg"].startswith("not a readable image")
    assert reasons["train/cat/notes.txt"] == "not an image file (suffix '.txt')"
    assert reasons["train/dog/.DS_Store"] == HIDDEN_REASON
    assert reasons["val/README.md"] == "not in a class folder"
    assert [s["path"] for s in manifest.split("val").skipped] == ["val/README.md"]

    # the training loaders read them back: labels, idx and decodable pixels
    [batch] = list(eval_loader(shards_dir=shards, split="test", batch_size=10, rank=0, world_size=1,
                               num_workers=0, transform=None))
    assert sorted(batch["idx"].tolist()) == [0, 1, 2]
    assert [batch["label"][batch["idx"] == i].item() for i in range(3)] == [c for _, c in expected["test"]]
    assert batch["image"].shape == (3, 3, 14, 20)


def test_imagefolder_single_folder_is_split_by_ratio_per_class(tmp_path):
    root = tmp_path / "src"
    sources = {}
    for c, name in enumerate(["a", "b", "c"]):
        for i in range(10):
            path = _image(root / name / f"{i:02d}.jpg", seed=100 * c + i)
            sources[_sha(path.read_bytes())] = c
    (root / "a" / "notes.txt").write_text("x")

    def run(shards: Path, seed: int) -> dict[str, list[dict]]:
        manifest = _prepare(root, shards, "data.split_ratios=[0.6, 0.2, 0.2]", f"data.split_seed={seed}")
        assert {s: list(manifest.split(s).class_counts) for s in manifest.splits} == {
            "train": [6, 6, 6], "val": [2, 2, 2], "test": [2, 2, 2]}
        assert [e["path"] for e in manifest.split("train").skipped] == ["a/notes.txt"]
        assert manifest.settings["layout"] == "single"
        return {split: read_split(shards, split) for split in manifest.splits}

    first = run(tmp_path / "s1", seed=0)
    seen = [(_sha(s["image"]), s["cls"]) for split in first.values() for s in split]
    assert sorted(seen) == sorted(sources.items())  # each image exactly once, with its class
    assert run(tmp_path / "s2", seed=0) == first  # deterministic
    other = run(tmp_path / "s3", seed=1)
    assert [s["image"] for s in other["val"]] != [s["image"] for s in first["val"]]


@pytest.mark.parametrize("num_items, ratios, expected", [
    (10, (0.8, 0.1, 0.1), (8, 1, 1)),
    (5, (0.8, 0.1, 0.1), (3, 1, 1)),
    (1, (0.8, 0.1, 0.1), (1, 0, 0)),
    (0, (0.8, 0.1, 0.1), (0, 0, 0)),
    (3, (0.0 + 0.5, 0.5, 0.0), (1, 2, 0)),
    (7, (0.2, 0.4, 0.4), (1, 3, 3)),
])
def test_ratio_split_counts(num_items, ratios, expected):
    assignment = ratio_split(num_items, ratios=ratios, seed=[0, 1])
    assert tuple(np.bincount(assignment, minlength=3)) == expected


def test_resize_on_write_shrinks_and_never_enlarges(tmp_path):
    root, shards = tmp_path / "src", tmp_path / "shards"
    _image(root / "train/a/big.jpg", seed=1, size=(60, 40))
    _image(root / "train/a/tall.png", seed=2, size=(30, 90), fmt="PNG")
    small = _image(root / "train/a/small.png", seed=3, size=(12, 10), fmt="PNG")
    _image(root / "train/a/bitmap.bmp", seed=4, size=(10, 10), fmt="BMP")
    _image(root / "val/a/v.jpg", seed=5, size=(16, 16))
    manifest = _prepare(root, shards, "data.resize_shorter=20", "data.jpeg_quality=80")
    samples = read_split(shards, "train")  # sorted: big.jpg, bitmap.bmp, small.png, tall.png
    sizes = [Image.open(io.BytesIO(s["image"])).size for s in samples]
    assert sizes == [(30, 20), (10, 10), (12, 10), (20, 60)]
    assert [s["ext"] for s in samples] == ["jpg", "jpg", "png", "jpg"]
    assert samples[2]["image"] == small.read_bytes()  # small enough: original bytes
    assert manifest.settings["resize_shorter"] == 20 and manifest.settings["jpeg_quality"] == 80


@pytest.mark.parametrize("size, shorter, expected", [((500, 375), 256, (341, 256)), ((375, 500), 256, (256, 341)),
                                                     ((300, 300), 256, (256, 256)), ((200, 100), 256, (200, 100))])
def test_encode_image_target_sizes(size, shorter, expected):
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="JPEG")
    data, ext = encode_image(buffer.getvalue(), shorter, 90)
    assert (Image.open(io.BytesIO(data)).size, ext) == (expected, "jpg")
    assert (data == buffer.getvalue()) == (expected == size)


def test_encode_image_rejects_truncated_jpeg(tmp_path):
    data = _corrupt_jpeg(tmp_path / "x.jpg").read_bytes()
    for shorter in (0, 16):
        with pytest.raises(OSError, match="truncated"):
            encode_image(data, shorter, 90)


@pytest.mark.parametrize("strays, corrupt, culprit", [
    (False, True, "train/dog/broken.jpg"),
    (True, True, "train/cat/notes.txt"),  # non-image files are known before any decoding
])
def test_strict_fails_naming_the_file(tmp_path, strays, corrupt, culprit):
    root, shards = tmp_path / "src", tmp_path / "shards"
    make_split_tree(root, strays=strays, corrupt=corrupt)
    with pytest.raises(ValueError, match=f"data.strict=true: .*{culprit}"):
        _prepare(root, shards, "data.strict=true")
    assert not (shards / MANIFEST_NAME).exists()


def test_strict_accepts_hidden_files_and_rejects_reused_lenient_output(tmp_path):
    root, shards = tmp_path / "src", tmp_path / "shards"
    make_split_tree(root, strays=False, corrupt=False)
    (root / "train/dog/.DS_Store").write_bytes(b"\0")
    assert _prepare(root, shards, "data.strict=true").split("train").skipped == (
        {"path": "train/dog/.DS_Store", "reason": HIDDEN_REASON},)

    _corrupt_jpeg(root / "train/dog/broken.jpg")
    _prepare(root, shards)  # lenient: skips and lists it
    before = _mtimes(shards)
    with pytest.raises(ValueError, match=re.escape("train/dog/broken.jpg")):
        _prepare(root, shards, "data.strict=true")
    assert _mtimes(shards) == before  # the check reads the manifest, it rewrites nothing


def test_rerun_is_idempotent_and_changes_trigger_a_rewrite(tmp_path):
    root, shards = tmp_path / "src", tmp_path / "shards"
    make_split_tree(root)
    first = _prepare(root, shards)
    before = _mtimes(shards)
    again = _prepare(root, shards, "data.prepare_workers=2")  # workers do not change the output
    assert _mtimes(shards) == before
    assert again.to_json() == first.to_json()

    changed = _prepare(root, shards, "data.jpeg_quality=70")  # a setting that changes bytes
    assert changed.settings["fingerprint"] != first.settings["fingerprint"]
    assert _mtimes(shards)[MANIFEST_NAME] != before[MANIFEST_NAME]

    _image(root / "test/emu/new.jpg", seed=4242)  # a new input file
    grown = _prepare(root, shards, "data.jpeg_quality=70")
    assert grown.split("test").num_samples == changed.split("test").num_samples + 1


def test_parallel_conversion_writes_the_same_samples(tmp_path):
    root = tmp_path / "src"
    make_split_tree(root)
    one = _prepare(root, tmp_path / "w1", "data.resize_shorter=8")
    two = _prepare(root, tmp_path / "w2", "data.resize_shorter=8", "data.prepare_workers=2")
    for split in one.splits:
        assert read_split(tmp_path / "w1", split) == read_split(tmp_path / "w2", split)
        assert one.split(split).skipped == two.split(split).skipped


def test_interrupted_prepare_never_looks_complete(tmp_path, monkeypatch):
    import avgk.data.sources.imagefolder as imagefolder

    root, shards = tmp_path / "src", tmp_path / "shards"
    make_split_tree(root)
    _prepare(root, shards)
    real_convert, calls = imagefolder.convert_file, []

    def dies_on_third(path, resize_shorter, jpeg_quality):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_convert(path, resize_shorter, jpeg_quality)

    monkeypatch.setattr(imagefolder, "convert_file", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare(root, shards, "data.jpeg_quality=50")  # forces a rewrite, which dies half-way
    with pytest.raises(FileNotFoundError, match="avgk prepare"):
        read_manifest(shards)
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]  # no partial folder left behind
    monkeypatch.undo()
    assert _prepare(root, shards, "data.jpeg_quality=50").split("train").num_samples == 8


@pytest.mark.parametrize("build, expected", [
    (lambda root: None, "does not exist"),
    (lambda root: root.write_text("x"), "must be a folder"),
    (lambda root: (root / "train/a").mkdir(parents=True), "needs root/train and at least one of root/val, root/test"),
    (lambda root: (root / "val/a").mkdir(parents=True), "has split folders ['val']"),
    (lambda root: (root / ".hidden").mkdir(parents=True), "no class folders in"),
    (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "test")], "no class folders in any split"),
])
def test_imagefolder_errors_name_value_and_rule(tmp_path, build, expected):
    root = tmp_path / "src"
    build(root)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        _prepare(root, tmp_path / "shards")
    assert expected in str(info.value)


# =====================================================================================
# plantnet300k
# =====================================================================================


def make_plantnet(root: Path) -> dict[str, list[tuple[str, int]]]:
    species = ["1355868", "1355920", "1363227"]
    expected: dict[str, list] = {"train": [], "val": [], "test": []}
    for split, per_class in [("train", 3), ("val", 1), ("test", 1)]:
        for c, sid in enumerate(species):
            for i in range(per_class):
                rel = f"images/{split}/{sid}/{c}{i}abc.jpg"
                _image(root / rel, seed=1000 * len(split) + 10 * c + i)
                expected[split].append((rel, c))
    _corrupt_jpeg(root / "images/test/1363227/zzbroken.jpg")
    (root / "plantnet300K_metadata.json").write_text("{}")
    return {s: sorted(v) for s, v in expected.items()}


def test_plantnet300k_release_layout_with_species_names(tmp_path):
    root, shards = tmp_path / "plantnet_300K", tmp_path / "shards"
    expected = make_plantnet(root)
    (root / SPECIES_NAMES_FILE).write_text(json.dumps({"1355868": "Lactuca virosa L.", "1355920": "Pinus nigra"}))
    manifest = _prepare(root, shards, source="plantnet300k")
    assert manifest.classes == {0: "Lactuca virosa L.", 1: "Pinus nigra", 2: "1363227"}  # unnamed: its id
    assert manifest.settings["class_folders"] == ["1355868", "1355920", "1363227"]
    assert manifest.settings["num_classes_without_name"] == 1
    for split, items in expected.items():
        samples = read_split(shards, split)
        assert [s["image"] for s in samples] == [(root / rel).read_bytes() for rel, _ in items]
        assert [s["cls"] for s in samples] == [c for _, c in items]
    assert [e["path"] for e in manifest.split("test").skipped] == ["images/test/1363227/zzbroken.jpg"]


def test_plantnet300k_without_metadata_and_errors(tmp_path):
    root = tmp_path / "plantnet_300K"
    make_plantnet(root)
    manifest = _prepare(root, tmp_path / "s1", source="plantnet300k")
    assert list(manifest.classes.values()) == ["1355868", "1355920", "1363227"]
    with pytest.raises(FileNotFoundError, match=re.escape("data.plantnet_metadata='names.json' does not exist")):
        _prepare(root, tmp_path / "s2", "data.plantnet_metadata=names.json", source="plantnet300k")
    (root / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold an object mapping species id -> name"):
        _prepare(root, tmp_path / "s3", "data.plantnet_metadata=bad.json", source="plantnet300k")
    for path in sorted((root / "images/val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "images/val").rmdir()
    with pytest.raises(FileNotFoundError, match=r"needs images/train, images/val and images/test.*\['images/val'\]"):
        _prepare(root, tmp_path / "s4", source="plantnet300k")


# =====================================================================================
# cifar100
# =====================================================================================


def _cifar_rows(num: int, offset: int) -> np.ndarray:
    """N x 3072 uint8 rows, each unique (its index is written into the first pixels)."""
    rows = np.random.default_rng(offset).integers(0, 256, (num, 3072), dtype=np.uint8)
    ids = np.arange(offset, offset + num)
    rows[:, 0], rows[:, 1] = ids // 256, ids % 256
    return rows


def make_cifar(folder: Path, *, num_classes: int = 10, per_class_train: int = 20, per_class_test: int = 3) -> dict:
    """A CIFAR-100-format pickle set (protocol 2 dicts with bytes keys, as in the release)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for name, per_class, offset in [("train", per_class_train, 0), ("test", per_class_test, 50_000)]:
        labels = rng.permutation(np.repeat(np.arange(num_classes), per_class)).tolist()
        data = _cifar_rows(len(labels), offset)
        batch = {b"filenames": [f"img_{offset + i}.png".encode() for i in range(len(labels))],
                 b"batch_label": b"training batch 1 of 1", b"fine_labels": labels,
                 b"coarse_labels": [y // 5 for y in labels], b"data": data}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
        out[name] = (data, np.asarray(labels))
    names = [f"class_{c:02d}".encode() for c in range(num_classes)]
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"x"] * (num_classes // 5)}, f, protocol=2)
    return out


def _row_of(image: bytes) -> np.ndarray:
    """Shard PNG -> the CIFAR row it came from (3072 values, channel-major)."""
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).transpose(2, 0, 1).reshape(-1)


@pytest.mark.parametrize("subfolder", ["cifar-100-python", ""])
def test_cifar100_split_round_trip_and_clean_labels(tmp_path, subfolder):
    root, shards = tmp_path / "cifar", tmp_path / "shards"
    source = make_cifar(root / subfolder if subfolder else root)
    manifest = _prepare(root, shards, source="cifar100")
    assert manifest.classes == {c: f"class_{c:02d}" for c in range(10)}
    assert {s: manifest.split(s).num_samples for s in manifest.splits} == {"train": 180, "val": 20, "test": 30}
    assert list(manifest.split("val").class_counts) == [2] * 10  # 45k/5k-style: 10% of every class
    assert manifest.settings["cifar_noise_p"] == 0.0 and manifest.settings["cifar_noise_num_changed"] == 0

    rows = {bytes(r): i for i, r in enumerate(source["train"][0])}
    seen_train_rows = []
    for split in ("train", "val"):
        samples = read_split(shards, split)
        found = [rows[bytes(_row_of(s["image"]))] for s in samples]
        assert found == sorted(found)  # file order kept within a split
        assert [s["cls"] for s in samples] == source["train"][1][found].tolist()
        assert {s["ext"] for s in samples} == {"png"}
        seen_train_rows += found
    assert sorted(seen_train_rows) == list(range(200))  # train + val partition the training file
    test = read_split(shards, "test")
    assert [_row_of(s["image"]).tolist() for s in test] == source["test"][0].tolist()
    assert [s["cls"] for s in test] == source["test"][1].tolist()


def test_cifar100_block_noise_on_train_only(tmp_path):
    root = tmp_path / "cifar"
    source = make_cifar(root, per_class_train=60, per_class_test=5)
    clean = _prepare(root, tmp_path / "clean", source="cifar100")
    noisy = _prepare(root, tmp_path / "noisy", "data.cifar_noise_p=0.5", "data.cifar_noise_seed=3",
                     source="cifar100")
    settings = noisy.settings
    assert (settings["cifar_noise_p"], settings["cifar_noise_seed"]) == (0.5, 3)
    for split in ("val", "test"):  # untouched
        assert read_split(tmp_path / "noisy", split) == read_split(tmp_path / "clean", split)
    before = read_split(tmp_path / "clean", "train")
    after = read_split(tmp_path / "noisy", "train")
    assert [s["image"] for s in after] == [s["image"] for s in before]
    old = np.array([s["cls"] for s in before])
    new = np.array([s["cls"] for s in after])
    assert np.array_equal(new // 5, old // 5)  # changed labels stay in their block of 5
    assert settings["cifar_noise_num_changed"] == int((new != old).sum())
    assert 0 < settings["cifar_noise_num_changed"] <= settings["cifar_noise_num_redrawn"]
    assert abs(settings["cifar_noise_num_redrawn"] / len(old) - 0.5) < 0.1  # 540 draws: sd 0.02
    assert clean.to_json()["splits"]["train"]["num_samples"] == len(source["train"][1]) - 60


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_block_label_noise_rule(p):
    labels_N = np.random.default_rng(1).integers(0, 100, 100_000)
    noisy_N, redrawn_N = block_label_noise(labels_N, p=p, seed=7, num_classes=100)
    assert np.array_equal(noisy_N // 5, labels_N // 5)
    assert np.array_equal(noisy_N[~redrawn_N], labels_N[~redrawn_N])
    assert abs(redrawn_N.mean() - p) < 0.01
    assert abs((noisy_N != labels_N).mean() - 0.8 * p) < 0.01  # a redraw gives the old label back 1 time in 5
    if p:
        counts = np.bincount(noisy_N[redrawn_N] % 5, minlength=5) / redrawn_N.sum()
        assert np.allclose(counts, 0.2, atol=0.02)  # uniform within the block
    again, _ = block_label_noise(labels_N, p=p, seed=7, num_classes=100)
    assert np.array_equal(again, noisy_N)


def test_stratified_holdout_45k_5k():
    labels_N = np.repeat(np.arange(100), 500)
    held_N = stratified_holdout(labels_N, fraction=0.1, seed=0)
    assert held_N.sum() == 5_000 and (~held_N).sum() == 45_000
    assert np.all(np.bincount(labels_N[held_N], minlength=100) == 50)
    assert not np.array_equal(held_N, stratified_holdout(labels_N, fraction=0.1, seed=1))


def test_cifar100_errors(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "train").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"needs the python files \['train', 'test', 'meta'\]"):
        _prepare(root, tmp_path / "s", source="cifar100")
    make_cifar(root, num_classes=7)
    with pytest.raises(ValueError, match="multiple of 5, got 7"):
        _prepare(root, tmp_path / "s", "data.cifar_noise_p=0.1", source="cifar100")
    with (root / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": os.system}, f)  # a pickle naming a global: refused, never run
    with pytest.raises(ValueError, match="refusing to load global"):
        _prepare(root, tmp_path / "s", source="cifar100")


# =====================================================================================
# Config fields
# =====================================================================================


@pytest.mark.parametrize("overrides, expected", [
    (["data.split_ratios=[0.5, 0.6, 0.1]"], "data.split_ratios must be (train, val, test) fractions >= 0 summing"),
    (["data.split_ratios=[0.0, 0.5, 0.5]"], "with train > 0"),
    (["data.resize_shorter=4"], "data.resize_shorter must be 0 (keep) or >= 8 pixels, got 4"),
    (["data.jpeg_quality=101"], "data.jpeg_quality=101"),
    (["data.cifar_noise_p=0.2"], "data.cifar_noise_p applies to data.source='cifar100' only"),
    (["data.source=cifar100", "data.root=/x", "data.cifar_noise_p=1.5"], "data.cifar_noise_p=1.5"),
    (["data.plantnet_metadata=x.json"], "data.plantnet_metadata applies to data.source='plantnet300k' only"),
    (["data.shard_maxsize_mb=64"], "data.shard_maxsize_mb must be 0 for data.source='synthetic'"),
    (["data.prepare_workers=-1"], "data.prepare_workers=-1"),
])
def test_prepare_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    assert expected in str(info.value)


@pytest.mark.parametrize("kwargs, expected", [
    ({"resize_shorter": 4}, "resize_shorter must be 0 (keep) or >= 8 pixels, got 4"),
    ({"jpeg_quality": 0}, "jpeg_quality must be in [1, 100], got 0"),
    ({"maxcount": 0}, "maxcount must be >= 1, got 0"),
    ({"maxsize_mb": -1}, "maxsize_mb must be >= 0 (0 = no size limit), got -1"),
    ({"workers": 0}, "workers must be >= 1, got 0"),
])
def test_convert_options_errors(kwargs, expected):
    with pytest.raises(ValueError) as info:
        ConvertOptions(**kwargs)
    assert expected in str(info.value)


def test_shard_maxsize_cuts_shards(tmp_path):
    root, shards = tmp_path / "src", tmp_path / "shards"
    for i in range(6):
        _image(root / "train/a" / f"{i}.png", seed=i, size=(64, 64), fmt="PNG")  # ~12 kB each
    _image(root / "val/a/v.png", seed=9, fmt="PNG")
    manifest = _prepare(root, shards, "data.shard_maxsize_mb=0.02")
    assert 2 <= len(manifest.split("train").shards) <= 6
    assert len(read_split(shards, "train")) == 6


# =====================================================================================
# digits: pairs of real handwritten digits, generated on first use
# =====================================================================================


def _digits_config(shards: Path, *extra: str):
    return build_config(None, ["data.source=digits", f"data.shards={shards}", "data.synthetic.num_classes=100",
                               "data.synthetic.num_train=60", "data.synthetic.num_val=20", "data.synthetic.num_test=20",
                               "data.synthetic.ambiguity_rate=0.3", "data.synthetic.image_size=16", "train.batch_size=16",
                               "loss.k=2", *extra])


def test_digits_source_writes_the_image_folders_pixels_once_and_reuses_them(tmp_path):
    from avgk.data.prepare import ensure_shards
    from avgk.data.sources.digits import write_digit_pairs
    from tests.helpers.runs import read_split

    shards = tmp_path / "shards"
    ensure_shards(_digits_config(shards))  # generated on first use, like synthetic data; no data.root
    manifest = read_manifest(shards)
    assert manifest.source == "digits" and manifest.num_classes == 100
    assert {s: manifest.splits[s].num_samples for s in ("train", "val", "test")} == {"train": 60, "val": 20, "test": 20}
    folder = write_digit_pairs(tmp_path / "folder", num_train=60, num_val=20, num_test=20, ambiguity=0.3, seed=0)
    for split in ("train", "test"):
        images, labels = read_split(shards, split)
        files = sorted((folder / split).glob("*/*.png"), key=lambda p: p.name)  # written in draw order
        assert labels.tolist() == [int(p.parent.name) for p in files]
        for encoded, file in zip(images, files, strict=True):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), np.asarray(Image.open(file)))
    written = (shards / MANIFEST_NAME).stat().st_mtime_ns
    ensure_shards(_digits_config(shards))
    assert (shards / MANIFEST_NAME).stat().st_mtime_ns == written  # the same settings: reused, not rewritten
    prepare(_digits_config(shards, "data.synthetic.seed=1"))
    assert read_manifest(shards).settings["seed"] == 1  # other settings: written again


def test_digits_source_needs_100_classes(tmp_path):
    with pytest.raises(ValueError, match=r"data.synthetic.num_classes must be 100 for data.source='digits'.*got 50"):
        prepare(build_config(None, ["data.source=digits", f"data.shards={tmp_path}", "data.synthetic.num_classes=50"]))
