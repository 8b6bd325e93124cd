"""Benchmark of `avgk predict --out` (the Ray Data job) against a plain in-process loop, on the same JPEGs.

Run: python benchmarks/bench_predict_job.py [--images 5000] [--size 128] [--repeats 2]
Prints a markdown table. Not collected by pytest (a script, and __test__ = False).

A smoke-config model (configs/smoke.yaml: small CNN, 16 px input) is trained once in process; --images
JPEGs of --size px are drawn from its synthetic generator's distribution (random RGB noise over class
prototypes is not needed: the cost measured is reading, decoding, the transform and the model). Then:

- plain loop: SetPredictor.predict over the files in batches of 64, in this process (torch's default
  threads), the first batch apart (model warm-up), as the steady-state rate;
- the job with 1 and with 2 model actors on a local Ray cluster started beforehand, each into a fresh
  --out: its steady-state rate is the images after its first output batch over the time they took
  (cluster start-up, actor start and model loading apart); the object store's peak use is sampled
  every 0.1 s from ray.available_resources().
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Ray workers import this module by name

__test__ = False
ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def train_model(folder: Path) -> str:
    from avgk.config import load_config
    from avgk.data.prepare import prepare
    from avgk.training import checkpoints, engine

    config = load_config(ROOT / "configs" / "smoke.yaml", [f"data.shards={folder / 'shards'}", f"run.storage={folder}",
                                                          "run.name=model", "tracking.enabled=false", "train.epochs=1"])
    prepare(config, progress=False)
    engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
    return str(config.run_dir)


def write_jpegs(folder: Path, *, count: int, size: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for n in range(count):
        small = np.clip(base.astype(int) + rng.integers(-60, 60, (8, 8, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        path = folder / f"{n:06d}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def plain_loop(run: str, paths: list[str], *, batch_size: int = 64) -> float:
    """Steady-state images/s of SetPredictor over the files, the first batch apart."""
    from avgk.inference.predict import SetPredictor

    predictor = SetPredictor.from_run(run, batch_size=batch_size)
    predictor.predict(paths[:batch_size], k=2)  # warm-up: the first batch is the model's start
    start = time.perf_counter()
    for at in range(batch_size, len(paths), batch_size):
        predictor.predict(paths[at:at + batch_size], k=2)
    return (len(paths) - batch_size) / (time.perf_counter() - start)


def job(run: str, folder: Path, out: Path, *, actors: int) -> tuple[float, float, float]:
    """(steady-state images/s, whole job's seconds, object store peak MiB) of one job."""
    import ray

    from pipelines.predict_job import run_predict_job

    total = ray.cluster_resources().get("object_store_memory", 0.0)
    lowest = [total]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            lowest[0] = min(lowest[0], ray.available_resources().get("object_store_memory", total))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run_predict_job(run=run, k=2, inputs=[str(folder)], out=str(out), num_actors=actors, progress=False,
                                  log=lambda _: None)
    finally:
        stop.set()
        sampler.join()
    return summary.steady_images / summary.steady_seconds, summary.seconds, (total - lowest[0]) / MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=128, help="JPEG side in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best is reported")
    args = parser.parse_args()
    from pipelines import job as job_start

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = Path(tmp)
        run = train_model(folder)
        images = folder / "jpegs"
        paths = write_jpegs(images, count=args.images, size=args.size)
        rows = {"plain": [plain_loop(run, paths) for _ in range(args.repeats)]}
        job_start.join_cluster()
        for actors in (1, 2):
            results = [job(run, images, folder / f"out-{actors}-{r}", actors=actors) for r in range(args.repeats)]
            rows[f"job, {actors} actor(s)"] = results  # type: ignore[assignment]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        plain = max(rows["plain"])  # type: ignore[type-var]
        print(f"{args.images} JPEGs of {args.size} px, smoke model (16 px input), k=2; {os.cpu_count()} CPUs, "
              f"{platform.machine()}; commit {commit}; best of {args.repeats}\n")
        print("| loop | steady images/s | vs plain loop | whole run s | object store peak MiB |")
        print("|---|---:|---:|---:|---:|")
        print(f"| plain loop (SetPredictor, in process) | {plain:.0f} | 1.00 | | |")
        for name, results in rows.items():
            if name == "plain":
                continue
            rate, seconds, peak = max(results)  # type: ignore[type-var]
            print(f"| {name} | {rate:.0f} | {rate / plain:.2f} | {seconds:.1f} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
