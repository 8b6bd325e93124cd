"""`avgk predict`: label sets of image files as JSON lines.

The run's MLflow pyfunc model (logged from the training's rank 0) is avgk.serving.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from avgk.predict import SetPredictor, decode_image

__all__ = ["iter_image_files", "run_predict"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def iter_image_files(paths: Sequence[str]) -> Iterator[Path]:
    """The given files, and every image file under the given folders (recursively, sorted)."""
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")


def run_predict(
    *,
    run: str,
    k: float,
    paths: Sequence[str],
    top_k: bool = False,
    batch_size: int = 64,
    checkpoint: str | None = None,
    out: IO[str] | None = None,
    progress: bool = True,
) -> int:
    """One JSON line per image on `out` (default: sys.stdout at call time); unreadable files give {"path", "error"}.

    Returns how many failed.
    """
    out = out if out is not None else sys.stdout  # not a default argument: that binds the stream at import
    from tqdm import tqdm

    predictor = SetPredictor.from_run(run, checkpoint, batch_size=batch_size)
    if not top_k:
        predictor.threshold(k)  # an uncalibrated K fails before any image is read
    elif float(k) != int(k):
        raise ValueError(f"--top-k needs an integer --k, got {k}")
    files = list(iter_image_files(paths))
    num_failed = 0
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            images, good = [], []
            for path in files[start : start + batch_size]:
                try:
                    images.append(decode_image(path))
                    good.append(path)
                except Exception as err:  # a corrupt or non-image file is reported, not fatal
                    num_failed += 1
                    out.write(json.dumps({"path": str(path), "error": f"{type(err).__name__}: {err}"}) + "\n")
            for path, label_set in zip(good, predictor.predict(images, k=k, top_k=top_k)):
                out.write(json.dumps({"path": str(path), **label_set.to_dict()}) + "\n")
            out.flush()
            bar.update(len(files[start : start + batch_size]))
    return num_failed
