"""Benchmark of `avgk prepare` (imagefolder): conversion throughput with and without resizing, 1 and 2 workers.

Run: python benchmarks/bench_prepare.py [--num-images 1500] [--repeats 2] [--keep DIR]
Generates --num-images random-texture 500 x 375 JPEGs (quality 90, 10 classes, one
folder, split 0.8/0.1/0.1), then times `avgk prepare` through the CLI entry point (in
process, so Python/torch start-up is not counted) into a fresh shards folder per run, best
of --repeats, and once more as an idempotent re-run. Prints a markdown table.
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

__test__ = False

WIDTH, HEIGHT = 500, 375
NUM_CLASSES = 10


def texture(rng: np.random.Generator) -> Image.Image:
    """Smooth colour blobs plus fine grain: JPEG sizes close to photos (~60-90 kB at q90), unlike pure noise."""
    coarse = rng.integers(0, 256, (HEIGHT // 25, WIDTH // 25, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-24, 25, (HEIGHT, WIDTH, 3), dtype=np.int16)
    return Image.fromarray(np.clip(image + grain, 0, 255).astype(np.uint8))


def make_images(root: Path, num_images: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(num_images):
        path = root / f"class_{i % NUM_CLASSES}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        texture(rng).save(path, format="JPEG", quality=90)
        total += path.stat().st_size
    return total


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_prepare(config: Path, shards: Path, overrides: list[str]) -> float:
    from pipelines.cli import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the "shards ready" line; the table goes to stdout
        code = main(["prepare", str(config), f"data.shards={shards}", *overrides])
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"avgk prepare failed with exit code {code}")
    return elapsed


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.tar")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"  # bars would only add noise to the timings
    import avgk.data.prepare  # noqa: F401 - torch and webdataset imports stay out of the first timing

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = work / "images"
        if not images.is_dir():
            start = time.perf_counter()
            input_mb = make_images(images, args.num_images) / 1e6
            print(f"generated {args.num_images} JPEGs ({input_mb:.0f} MB) in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
        input_mb = sum(p.stat().st_size for p in images.rglob("*.jpg")) / 1e6
        config = work / "bench.yaml"
        config.write_text(
            f"data:\n  source: imagefolder\n  root: {images}\n  resize: 256\n  crop: 224\n  shard_maxcount: 500\n"
        )
        rows = []
        for resize in (256, 0):
            for workers in (1, 2):
                overrides = [f"data.resize_shorter={resize}", f"data.prepare_workers={workers}"]
                times = []
                for _ in range(args.repeats):
                    shards = work / f"shards-r{resize}-w{workers}"
                    shutil.rmtree(shards, ignore_errors=True)
                    times.append(run_prepare(config, shards, overrides))
                best = min(times)
                reuse = run_prepare(config, shards, overrides)  # same inputs and settings: nothing rewritten
                rows.append((resize, workers, best, args.num_images / best, folder_mb(shards), reuse))
                shutil.rmtree(shards, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    command = "python benchmarks/bench_prepare.py " + shlex.join(sys.argv[1:])
    print(f"`{command.strip()}` — {date.today().isoformat()}, nproc {os.cpu_count()}, {cpu_model()}, "
          f"Python {platform.python_version()}, Pillow {Image.__version__}.")
    print(f"{args.num_images} random-texture {WIDTH} x {HEIGHT} JPEGs (q90, {input_mb:.0f} MB), imagefolder, "
          f"best of {args.repeats}; re-run = the same command again (idempotent reuse).")
    print()
    print("| resize_shorter | workers | time (s) | images/s | shards (MB) | re-run (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for resize, workers, best, rate, size, reuse in rows:
        label = f"{resize}" if resize else "0 (keep bytes)"
        print(f"| {label} | {workers} | {best:.2f} | {rate:.0f} | {size:.1f} | {reuse:.2f} |")


if __name__ == "__main__":
    main()
