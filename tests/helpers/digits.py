"""An ambiguous, long-tailed 100-class image set that avgk did not generate: pairs of real handwritten digits.

The digits are scikit-learn's bundled `load_digits` (1,797 scans of handwriting, 8 x 8 pixels,
17 grey levels; shipped inside the package, nothing downloaded). Class `10 a + b` is the pair
"ab" drawn side by side. Classes follow a Zipf prior (exponent 1) over a random order, so the
set is long-tailed; with probability `ambiguity` the second digit is blended half and half with
a confusable digit, so that image's label is genuinely uncertain. Train, val and test draw their
digit scans from disjoint halves of the scans, so test handwriting is never seen in training.
Written as an image folder (`root/{train,val,test}/<class>/<n>.png`) for `data.source=imagefolder`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Digits often confused in handwriting: the blend partner of each digit.
CONFUSABLE = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 0, 7: 1, 8: 3, 9: 4}
NUM_CLASSES = 100


def _scans_by_digit(rng: np.random.Generator) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.float32)
    train, held = {}, {}
    for d in range(10):
        scans = images[digits.target == d]
        scans = scans[rng.permutation(len(scans))]
        half = len(scans) // 2
        train[d], held[d] = scans[:half], scans[half:]
    return train, held


def _pair_image(first: np.ndarray, second: np.ndarray, *, size: int) -> Image.Image:
    pair = np.concatenate([first, second], axis=1)  # 8 x 16
    canvas = np.zeros((16, 16), dtype=np.float32)
    canvas[4:12, :] = pair
    grey = Image.fromarray(canvas.clip(0, 255).astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
    return grey.convert("RGB")


def write_digit_pairs(
    root: str | Path,
    *,
    num_train: int = 3000,
    num_val: int = 1000,
    num_test: int = 1000,
    ambiguity: float = 0.3,
    size: int = 16,
    seed: int = 0,
) -> Path:
    """Write the image folder and return its root; the same arguments give the same files."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    pools = dict(zip(("train", "held"), _scans_by_digit(rng), strict=True))
    prior = 1.0 / np.arange(1, NUM_CLASSES + 1)
    prior = (prior / prior.sum())[rng.permutation(NUM_CLASSES)]
    for label in range(NUM_CLASSES):  # every class exists, images or not: ids 0..99 are the labels
        (root / "train" / f"{label:02d}").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        pool = pools["train" if split == "train" else "held"]
        labels = rng.choice(NUM_CLASSES, size=count, p=prior)
        for n, label in enumerate(labels):
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
            folder = root / split / f"{int(label):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            _pair_image(first, second, size=size).save(folder / f"{n:06d}.png")
    return root
