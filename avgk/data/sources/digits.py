"""`digits` source: an ambiguous, long-tailed 100-class image set that avgk did not draw: pairs of real handwritten digits.

The digits are scikit-learn's bundled `load_digits` (1,797 scans of handwriting, 8 x 8 pixels, 17
grey levels; shipped inside the package, nothing downloaded). Class `10 a + b` is the pair "ab"
drawn side by side. Classes follow a Zipf prior over a random order, so the set is long-tailed;
with probability `ambiguity` the second digit is blended half and half with a confusable digit,
so that image's label is genuinely uncertain (either digit, at random). Train draws its scans from
one half of each digit's scans, val and test from the other, so test handwriting is never seen
in training.

Generated on first use like the synthetic source (`data.source=digits`), from data.synthetic's
sizes, image size, ambiguity rate, Zipf exponent and seed (num_classes must be 100). The studies
use it as a real-image check of what they measure on the synthetic data
(configs/pipelines/recipe-screen.yaml); tests write it as an image folder (write_digit_pairs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from avgk.config import DataConfig
from avgk.data.manifest import Manifest
from avgk.data.sources.common import ConvertOptions, Item, SplitPlan, encode_array, write_image_dataset

__all__ = ["CONFUSABLE", "NUM_CLASSES", "digit_pairs", "from_config", "write_digit_pairs"]

# Digits often confused in handwriting: the blend partner of each digit.
CONFUSABLE = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 0, 7: 1, 8: 3, 9: 4}
NUM_CLASSES = 100
SPLITS = ("train", "val", "test")


def _scans_by_digit(rng: np.random.Generator) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise ValueError("data.source='digits' reads scikit-learn's bundled handwritten digits: "
                         "pip install scikit-learn") from None

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.float32)
    train, held = {}, {}
    for d in range(10):
        scans = images[digits.target == d]
        scans = scans[rng.permutation(len(scans))]
        half = len(scans) // 2
        train[d], held[d] = scans[:half], scans[half:]
    return train, held


def _pair_image(first: np.ndarray, second: np.ndarray, *, size: int) -> np.ndarray:
    """The two 8 x 8 scans side by side on a 16 x 16 canvas, scaled to size x size, as uint8 RGB."""
    pair = np.concatenate([first, second], axis=1)  # 8 x 16
    canvas = np.zeros((16, 16), dtype=np.float32)
    canvas[4:12, :] = pair
    grey = Image.fromarray(canvas.clip(0, 255).astype(np.uint8), mode="L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(grey.convert("RGB"))


def digit_pairs(*, num_train: int = 3000, num_val: int = 1000, num_test: int = 1000, ambiguity: float = 0.3,
                size: int = 16, zipf_exponent: float = 1.0, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images N x size x size x 3 uint8, labels N)}; the same arguments give the same images."""
    rng = np.random.default_rng(seed)
    pools = dict(zip(("train", "held"), _scans_by_digit(rng), strict=True))
    prior = 1.0 / np.arange(1, NUM_CLASSES + 1) ** zipf_exponent
    prior = (prior / prior.sum())[rng.permutation(NUM_CLASSES)]
    out = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        pool = pools["train" if split == "train" else "held"]
        drawn = rng.choice(NUM_CLASSES, size=count, p=prior)
        images, labels = [], []
        for label in drawn:
            tens, units = divmod(int(label), 10)
            first = pool[tens][rng.integers(len(pool[tens]))]
            if rng.random() < ambiguity:
                # Blend the units digit with its confusable partner; the label is either, at random.
                partner = CONFUSABLE[units]
                a = pool[units][rng.integers(len(pool[units]))]
                b = pool[partner][rng.integers(len(pool[partner]))]
                second = 0.5 * a + 0.5 * b
                label = 10 * tens + (units if rng.random() < 0.5 else partner)
            else:
                second = pool[units][rng.integers(len(pool[units]))]
            images.append(_pair_image(first, second, size=size))
            labels.append(int(label))
        out[split] = (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                      np.asarray(labels, dtype=np.int64))
    return out


def write_digit_pairs(root: str | Path, *, num_train: int = 3000, num_val: int = 1000, num_test: int = 1000,
                      ambiguity: float = 0.3, size: int = 16, seed: int = 0) -> Path:
    """The same images as an image folder (`root/{train,val,test}/<class>/<n>.png`, every class folder
    present under train) for `data.source=imagefolder`; returns the root."""
    root = Path(root)
    for label in range(NUM_CLASSES):  # every class exists, images or not: ids 0..99 are the labels
        (root / "train" / f"{label:02d}").mkdir(parents=True, exist_ok=True)
    pairs = digit_pairs(num_train=num_train, num_val=num_val, num_test=num_test, ambiguity=ambiguity, size=size,
                        seed=seed)
    for split, (images, labels) in pairs.items():
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"{int(label):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{n:06d}.png")
    return root


def from_config(data: DataConfig, options: ConvertOptions) -> Manifest:
    s = data.synthetic
    if s.num_classes != NUM_CLASSES:
        raise ValueError(f"data.synthetic.num_classes must be {NUM_CLASSES} for data.source='digits' (the pairs "
                         f"00 to 99), got {s.num_classes}")
    settings = {"layout": "digit-pairs", "num_classes": NUM_CLASSES, "num_train": s.num_train, "num_val": s.num_val,
                "num_test": s.num_test, "image_size": s.image_size, "ambiguity_rate": s.ambiguity_rate,
                "zipf_exponent": s.zipf_exponent, "seed": s.seed}
    pairs = digit_pairs(num_train=s.num_train, num_val=s.num_val, num_test=s.num_test, ambiguity=s.ambiguity_rate,
                        size=s.image_size, zipf_exponent=s.zipf_exponent, seed=s.seed)
    plans = {}
    for split in SPLITS:
        images, labels = pairs[split]
        items: list[Item] = [(f"digits/{split}/{n}", int(y), images[n]) for n, y in enumerate(labels.tolist())]
        plans[split] = SplitPlan(items)
    import sklearn

    source_version = f"scikit-learn {sklearn.__version__} load_digits"
    return write_image_dataset(
        shards_dir=data.shards, source="digits", root=source_version, classes=[f"{c:02d}" for c in range(NUM_CLASSES)],
        plans=plans, convert=encode_array, options=options, settings=settings,
        inputs_digest=hashlib.sha256(source_version.encode()).hexdigest(),
    )
