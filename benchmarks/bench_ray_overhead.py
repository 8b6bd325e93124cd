"""Benchmark P4: Ray Train overhead, one TorchTrainer worker against the same avgk.training.engine loop without Ray.

Run: python benchmarks/bench_ray_overhead.py [--num-train 12000] [--epochs 2] [--threads 1] [--keep DIR]
Writes synthetic shards with `avgk prepare` (the demo's data set, --num-train training images),
then trains the demo's model (small CNN, two-head loss, batch 128, tracking off) three times,
in the order plain, Ray, plain:

  plain   avgk.training.engine.fit in this process (LocalReporter), torch.set_num_threads(--threads);
  Ray     pipelines.train.build_trainer -> TorchTrainer.fit, the product's own trainer and
          train_loop_per_worker, 1 worker with train.cpus_per_worker=--threads (Ray sets the
          worker's OMP_NUM_THREADS, hence torch's thread count, from it), on a local cluster
          started by pipelines.ray_env.connect (bound to 127.0.0.1) just before the Ray run
          and shut down after it, so no Ray process runs during the plain runs.

Measured: Ray cluster start-up and shutdown; per run the whole fit() call; per epoch the training
pass as the loop itself times it (samples / samples_per_second, the engine's perf_counter
around train_epoch); and the full epoch (training + validation + checkpoint + report) as the
interval between two consecutive epoch reports: stamped by the reporter after the checkpoint
copy (plain), by a ray.train.UserCallback on the Train controller (Ray). Ratios: Ray over
the mean of the two plain runs, which bracket it in time. A sampler thread reads /proc every
second, so the CPU time each process of the tree (this one, the loader workers, the Ray
services and actors) used between the first and the last epoch report of each run is shown,
with the CPU time the rest of the machine used meanwhile.
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray stays on loopback
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # as the avgk CLI
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import cpu_model
from proc_stats import children_of, command_name, machine_busy_seconds, process_table

__test__ = False


PLAIN_LOOP = "benchmark process (plain training runs here)"


def process_snapshot(root: int) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start time) -> (short name, CPU seconds so far) for `root` and all its descendants."""
    table = process_table()
    children = children_of(table)
    out, stack = {}, [(root, "")]
    while stack:
        pid, parent_name = stack.pop()
        if pid not in table:
            continue
        _, started, cpu, argv = table[pid]
        name = PLAIN_LOOP if pid == root else command_name(argv)
        if name == parent_name or (pid != root and argv == table.get(root, (0, 0, 0, None))[3]):
            name = f"{parent_name}: forked child (loader worker)"  # a fork keeps its parent's command line
        out[(pid, started)] = (name, cpu)
        stack.extend((child, name) for child in children.get(pid, []))
    return out


class CpuSampler(threading.Thread):
    """Snapshots the CPU time of every process in this benchmark's tree, and of the machine, every second."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.snapshots: list[tuple[float, float, dict]] = []  # (time.time(), machine busy, tree snapshot)

    def run(self) -> None:
        while not self.stop.is_set():
            self.snapshots.append((time.time(), machine_busy_seconds(), process_snapshot(os.getpid())))
            self.stop.wait(self.interval)

    def usage_between(self, start: float, end: float) -> tuple[float, float, dict[str, float]]:
        """(seconds, machine busy CPU-s, CPU-s per process name) between the snapshots closest to start and end."""
        first = min(self.snapshots, key=lambda s: abs(s[0] - start))
        last = min(self.snapshots, key=lambda s: abs(s[0] - end))
        by_name: dict[str, float] = {}
        for key, (name, cpu) in last[2].items():
            before = first[2].get(key, (name, 0.0))[1]
            by_name[name] = by_name.get(name, 0.0) + cpu - before
        return last[0] - first[0], last[1] - first[1], by_name


def make_config(*, work: Path, name: str, num_train: int, epochs: int, threads: int):
    from avgk.config import load_config

    return load_config(
        None,
        [
            f"data.shards={work / 'shards'}",
            f"data.synthetic.num_train={num_train}",
            f"train.epochs={epochs}",
            f"train.cpus_per_worker={threads}",
            "train.log_every=1000000",
            "tracking.enabled=false",
            f"run.storage={work / 'runs'}",
            f"run.name={name}",
        ],
    )


def run_plain(config, threads: int) -> dict:
    """engine.fit without Ray; epoch stamps taken once the reporter has stored the epoch's checkpoint."""
    from avgk.training import checkpoints, engine

    class StampingReporter(checkpoints.LocalReporter):
        def __init__(self, run_dir: str):
            super().__init__(run_dir)
            self.stamps: list[float] = []

        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            self.stamps.append(time.time())

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reporter = StampingReporter(config.run_dir)
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            result = engine.fit(config, reporter=reporter, device=torch.device("cpu"), log=lambda _: None)
        end = time.time()
    finally:
        torch.set_num_threads(previous)
    return {"start": start, "end": end, "stamps": reporter.stamps, "history": result.history}


def make_stamp_callback(path: str):
    from ray.train import UserCallback

    class StampReports(UserCallback):
        """Runs on the Train controller: appends the wall time of every epoch report to a file."""

        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(f"{time.time()}\n")

    return StampReports()


def run_ray(config, stamps_file: Path) -> dict:
    from avgk.records.runs import with_absolute_paths
    from pipelines.train import build_trainer

    config = with_absolute_paths(config)
    trainer = build_trainer(config, mlflow_run_id=None, tracking_uri=None,
                            callbacks=[make_stamp_callback(str(stamps_file))])
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.fit()
    end = time.time()
    stamps = [float(x) for x in stamps_file.read_text().split()]
    history = result.metrics_dataframe.to_dict("records")
    return {"start": start, "end": end, "stamps": stamps, "history": history}


def epoch_figures(run: dict, num_samples: int) -> dict:
    train_s = [num_samples / h["samples_per_second"] for h in run["history"]]
    full_s = [b - a for a, b in itertools.pairwise(run["stamps"])]
    return {
        "train_s": train_s,
        "full_s": full_s,
        "first_report_s": run["stamps"][0] - run["start"],
        "after_last_report_s": run["end"] - run["stamps"][-1],
        "fit_s": run["end"] - run["start"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=12000, help="synthetic training images (demo: 12,000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (>= 2: full epochs are report intervals)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training process: train.cpus_per_worker for Ray, set_num_threads plain")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (a full epoch is the interval between two reports)")

    from avgk.data.prepare import prepare
    from pipelines import ray_env

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_ray_overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = make_config(work=work, name="prepare", num_train=args.num_train, epochs=args.epochs,
                           threads=args.threads)
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            manifest = prepare(base)
        prepare_s = time.perf_counter() - start
        num_samples = (args.num_train // base.train.batch_size) * base.train.batch_size  # full batches only

        import ray

        sampler = CpuSampler()
        sampler.start()
        runs, raw = {}, {}
        cluster_s = shutdown_s = 0.0
        for label in ("plain-1", "ray", "plain-2"):
            config = make_config(work=work, name=label, num_train=args.num_train, epochs=args.epochs,
                                 threads=args.threads)
            if label == "ray":
                # The cluster exists only around the Ray run: the plain runs share the machine with no Ray process.
                start = time.perf_counter()
                ray_env.connect(num_cpus=max(os.cpu_count() or 1, args.threads))
                cluster_s = time.perf_counter() - start
                raw[label] = run_ray(config, work / "ray-stamps.txt")
                start = time.perf_counter()
                ray.shutdown()
                shutdown_s = time.perf_counter() - start
            else:
                raw[label] = run_plain(config, args.threads)
            runs[label] = epoch_figures(raw[label], num_samples)
            print(f"{label}: fit {runs[label]['fit_s']:.1f} s, train passes "
                  f"{', '.join(f'{s:.1f}' for s in runs[label]['train_s'])} s", file=sys.stderr)
        sampler.stop.set()
        sampler.join()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    usage = {label: sampler.usage_between(raw[label]["stamps"][0], raw[label]["stamps"][-1]) for label in runs}
    for label, (_, _, by_name) in usage.items():
        epochs = len(raw[label]["stamps"]) - 1
        loop = "ray::RayTrainWorker" if label == "ray" else PLAIN_LOOP  # the process running engine.fit
        loop_cpu = by_name.get(loop, 0.0) + by_name.get(f"{loop}: forked child (loader worker)", 0.0)
        runs[label]["tree_cpu_per_epoch"] = sum(by_name.values()) / epochs
        runs[label]["loop_cpu_per_epoch"] = loop_cpu / epochs
        runs[label]["rest_cpu_per_epoch"] = (sum(by_name.values()) - loop_cpu) / epochs
    ray_run = runs["ray"]
    rows = [
        ("training pass, first epoch (s)", lambda r: r["train_s"][0]),
        (f"training pass, epochs 2-{args.epochs} mean (s)", lambda r: statistics.mean(r["train_s"][1:])),
        ("training pass, mean of all epochs (s)", lambda r: statistics.mean(r["train_s"])),
        ("full epoch (train + val + checkpoint + report), report-to-report mean (s)",
         lambda r: statistics.mean(r["full_s"])),
        ("CPU time per full epoch: the training process and its loader worker (CPU-s)",
         lambda r: r["loop_cpu_per_epoch"]),
        ("CPU time per full epoch: every other process of the benchmark (Ray: driver, services, actors) (CPU-s)",
         lambda r: r["rest_cpu_per_epoch"]),
        ("CPU time per full epoch: all the benchmark's processes (CPU-s)", lambda r: r["tree_cpu_per_epoch"]),
        ("fit() call to first epoch report (s)", lambda r: r["first_report_s"]),
        ("last epoch report to fit() return: final test evaluation, teardown (s)", lambda r: r["after_last_report_s"]),
        ("whole fit() call (s)", lambda r: r["fit_s"]),
    ]
    command = "python benchmarks/bench_ray_overhead.py " + shlex.join(sys.argv[1:])
    print(f"`{command.strip()}` — {date.today().isoformat()}, nproc {os.cpu_count()}, {cpu_model()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"load average at the end {os.getloadavg()[0]:.1f}.")
    print(f"synthetic shards: {manifest.num_classes} classes, {args.num_train} train / "
          f"{manifest.splits['val'].num_samples} val / {manifest.splits['test'].num_samples} test images "
          f"{base.data.synthetic.image_size} px (prepare {prepare_s:.1f} s); small CNN width {base.model.width}, "
          f"two-head loss, batch {base.train.batch_size}, {args.epochs} epochs per run, {args.threads} torch "
          f"thread(s), {base.data.loader_workers} loader worker(s); runs in the order plain, Ray, plain.")
    print(f"Ray cluster start-up (pipelines.ray_env.connect, local, 127.0.0.1): {cluster_s:.1f} s; "
          f"ray.shutdown(): {shutdown_s:.1f} s (the cluster runs only around the Ray run)")
    print()
    print("| measure | plain run 1 | Ray Train, 1 worker | plain run 2 | Ray / mean(plain) |")
    print("|---|---:|---:|---:|---:|")
    for name, pick in rows:
        a, r, b = pick(runs["plain-1"]), pick(ray_run), pick(runs["plain-2"])
        versus = f"{r / ((a + b) / 2):.3f}" if (a + b) / 2 > 0.1 * r else "-"  # no ratio to (almost) nothing
        print(f"| {name} | {a:.2f} | {r:.2f} | {b:.2f} | {versus} |")
    print()
    print("CPU time used from the first to the last epoch report of each run, by process (CPU-seconds per "
          "wall second; 'other work' is the rest of the machine's busy time, outside this benchmark):")
    print()
    names = sorted({n for _, _, by_name in usage.values() for n, v in by_name.items() if v > 0.05},
                   key=lambda n: -max(u[2].get(n, 0.0) / max(u[0], 1e-9) for u in usage.values()))
    print("| process | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{u[2].get(n, 0.0) / max(u[0], 1e-9):.2f}" for u in usage.values()) + " |")
    print("| all of this benchmark's processes | " + " | ".join(
        f"{sum(u[2].values()) / max(u[0], 1e-9):.2f}" for u in usage.values()) + " |")
    print("| other work on the machine | " + " | ".join(
        f"{max(0.0, u[1] - sum(u[2].values())) / max(u[0], 1e-9):.2f}" for u in usage.values()) + " |")
    print()
    print("per-epoch training passes (s): " + "; ".join(
        f"{label} {', '.join(f'{s:.2f}' for s in runs[label]['train_s'])}" for label in runs))
    print("report-to-report full epochs (s): " + "; ".join(
        f"{label} {', '.join(f'{s:.2f}' for s in runs[label]['full_s'])}" for label in runs))
    print(json.dumps({"cluster_s": cluster_s, "runs": runs}), file=sys.stderr)


if __name__ == "__main__":
    main()
