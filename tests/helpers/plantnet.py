"""A tiny Pl@ntNet-300K release on disk (images/<split>/<species id>/*.jpg, the species-name file), for tests
that run the plantnet300k source end to end: each species has its own colour, so a small model can learn it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SPECIES = ["1355868", "1355920", "1363227", "1392475", "1356022", "1364099"]
NAMES_FILE = "plantnet300K_species_id_2_name.json"


def make_release(root: Path, *, per_split: dict[str, int] | None = None, size: tuple[int, int] = (40, 32)) -> int:
    """Writes the release under `root`; returns the number of images."""
    per_split = per_split or {"train": 10, "val": 4, "test": 4}
    rng = np.random.default_rng(0)
    count = 0
    for c, species in enumerate(SPECIES):
        colour = np.array([(c * 40) % 256, (c * 90 + 60) % 256, (255 - c * 35) % 256], dtype=np.float32)
        for split, n in per_split.items():
            folder = root / "images" / split / species
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}{i:03d}.jpg", format="JPEG")
                count += 1
    (root / NAMES_FILE).write_text(json.dumps({s: f"species {s}" for s in SPECIES}))
    return count
