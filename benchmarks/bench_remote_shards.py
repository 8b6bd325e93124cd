"""Benchmark P6: a training epoch streaming its shards from s3:// against the same epoch from local shards.

Run: python benchmarks/bench_remote_shards.py [--num-train 6000] [--epochs 2] [--workers 2] [--rounds 2]
         [--keep DIR]
Starts a real S3 server on 127.0.0.1 (SeaweedFS's S3 gateway, tests/helpers/s3.py; the same as
the tests) and points the standard AWS_* variables at it, then writes the demo's synthetic data
set (--num-train training images) twice with `avgk prepare`: to a local folder and to
s3://avgk-bench/data (the same data: same settings and seed). On one local Ray cluster (bound
to 127.0.0.1, started once, after the AWS_* variables are set, as a cluster node gets them), it
trains the demo's model with the product's trainer (pipelines.train.build_trainer ->
TorchTrainer, --workers DDP workers, tracking off, run directories local) from each, in
--rounds rounds of local, s3, s3, local (ABBA: a drift of the machine's speed within a
round hits both sides alike).

Measured per run and epoch, as bench_ray_overhead.py (P4) measures them: the training pass
(samples / samples_per_second, the engine's own timing of train_epoch: reading, decoding,
forward, backward, all-reduce) and the full epoch (train + val + checkpoint + report, the
interval between two epoch reports, stamped on the Train controller), and their difference (val
read and scored from the same shards, checkpoint, report). Reported: the mean of
each over every epoch of every run per side, and the ratio local time / s3 time (1.0: as fast;
the goal is >= 0.9). Both sides read every shard the same way (avgk.runtime.storage.open_input_stream):
a local file, or an object fetched 4 MiB per ranged GET, never copied to disk. The server runs
on the same 2 CPUs as the training, so its own CPU time (serving the objects) is counted
against the s3 side; a real object store runs elsewhere.
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
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray stays on loopback
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # as the avgk CLI
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_prepare import cpu_model  # noqa: E402
from bench_ray_overhead import epoch_figures, run_ray  # noqa: E402

from tests.helpers.s3 import S3Server  # noqa: E402

__test__ = False

BUCKET = "avgk-bench"


def make_config(*, shards: str, runs: Path, name: str, num_train: int, epochs: int, workers: int):
    from avgk.config import load_config

    return load_config(None, [
        f"data.shards={shards}", f"data.synthetic.num_train={num_train}", f"train.epochs={epochs}",
        f"train.num_workers={workers}", "train.log_every=1000000", "tracking.enabled=false",
        f"run.storage={runs}", f"run.name={name}",
    ])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=6000, help="synthetic training images (demo: 12,000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (>= 2: full epochs are report intervals)")
    parser.add_argument("--workers", type=int, default=2, help="DDP workers (train.num_workers)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of local, s3, s3, local")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (a full epoch is the interval between two reports)")

    import ray

    from avgk.data.prepare import prepare
    from pipelines import ray_env

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_remote_shards-"))
    work.mkdir(parents=True, exist_ok=True)
    server = S3Server(work / "s3")
    figures: dict[str, list[dict]] = {"local": [], "s3": []}
    try:
        start = time.perf_counter()
        server.start()
        server_s = time.perf_counter() - start
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        where = {"local": str(work / "shards"), "s3": f"s3://{BUCKET}/data"}
        prepare_s = {}
        for side, shards in where.items():
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                manifest = prepare(make_config(shards=shards, runs=work / "runs", name="prepare",
                                               num_train=args.num_train, epochs=args.epochs, workers=args.workers))
            prepare_s[side] = time.perf_counter() - start
        base = make_config(shards=where["local"], runs=work / "runs", name="base", num_train=args.num_train,
                           epochs=args.epochs, workers=args.workers)
        num_samples = (args.num_train // base.train.batch_size) * base.train.batch_size  # full global batches only
        ray_env.connect(num_cpus=max(os.cpu_count() or 1, args.workers))
        for round_ in range(args.rounds):
            for side in ("local", "s3", "s3", "local"):
                name = f"{side}-{round_}-{len(figures[side])}"
                config = make_config(shards=where[side], runs=work / "runs", name=name, num_train=args.num_train,
                                     epochs=args.epochs, workers=args.workers)
                stamps = work / f"{name}-stamps.txt"
                raw = run_ray(config, stamps)
                figures[side].append(epoch_figures(raw, num_samples))
                last = figures[side][-1]
                print(f"{name}: train passes {', '.join(f'{s:.1f}' for s in last['train_s'])} s, full epochs "
                      f"{', '.join(f'{s:.1f}' for s in last['full_s'])} s", file=sys.stderr)
        ray.shutdown()
    finally:
        server.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    for runs in figures.values():  # what a full epoch adds to its training pass: val, checkpoint, report
        for run in runs:
            run["rest_s"] = [full - train for full, train in zip(run["full_s"], run["train_s"][1:], strict=True)]

    def mean(side: str, key: str) -> float:
        return statistics.mean(s for run in figures[side] for s in run[key])

    command = "python benchmarks/bench_remote_shards.py " + shlex.join(sys.argv[1:])
    print(f"`{command.strip()}` — {date.today().isoformat()}, commit {commit()}, nproc {os.cpu_count()}, "
          f"{cpu_model()}, Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"load average at the end {os.getloadavg()[0]:.1f}.")
    print(f"synthetic shards: {manifest.num_classes} classes, {args.num_train} train images "
          f"{base.data.synthetic.image_size} px in {len(manifest.split('train').shards)} shards; prepare "
          f"local {prepare_s['local']:.1f} s, to s3:// {prepare_s['s3']:.1f} s; S3 server start {server_s:.1f} s. "
          f"small CNN width {base.model.width}, two-head loss, global batch {base.train.batch_size}, "
          f"{args.workers} workers x {base.data.loader_workers} loader worker(s), {args.epochs} epochs per run, "
          f"{args.rounds} round(s) of local, s3, s3, local.")
    print()
    print("| measure | local shards (s) | s3:// shards (s) | local / s3 (>= 0.9 wanted) |")
    print("|---|---:|---:|---:|")
    for label, key in (("training pass (read, decode, step), mean per epoch", "train_s"),
                       ("full epoch (train + val + checkpoint + report), mean", "full_s"),
                       ("full epoch less its training pass (val + checkpoint + report), mean", "rest_s")):
        local, remote = mean("local", key), mean("s3", key)
        print(f"| {label} | {local:.2f} | {remote:.2f} | {local / remote:.3f} |")
    print()
    for side in figures:
        print(f"{side} training passes (s): " + "; ".join(", ".join(f"{s:.2f}" for s in run["train_s"])
                                                          for run in figures[side]))


if __name__ == "__main__":
    main()
