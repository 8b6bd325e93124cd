"""Benchmark of the Ray scoring job's exact reductions: in memory vs sort, and streamed through Ray Data.

Run: python benchmarks/bench_scoring_job.py [--stream-rows 311180] [--block-rows 8192]
Prints markdown tables. Not collected by pytest (a script, and __test__ = False).

Part 1: lambda_K for 5 K on 31,118 x 1,081 random softmax scores (Pl@ntNet-300K's val size):
full sort, in-memory selection, the two streamed passes in one process, the same through
Ray tasks, and one scores.max() pass as the floor.

Part 2: 311,180 x 1,081 (10 x val) through Ray Data as the jobs run it: an actor pool
"scores" blocks (random softmax rows stand in for the model, so the cost measured is the
job's, not a network's), materialises them in the object store, then calibrate_dataset,
metrics_dataset and the global pseudo-label selection run as parallel tasks. It reports
the driver's and the workers' peak memory and the per-value costs that extrapolate to
PlantCLEF (1.4M images x 7,806 classes).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Ray workers import this module by name

from benchmarks.bench_thresholds import NUM_CLASSES, NUM_VAL, best_time, softmax_scores

__test__ = False

KS = [1, 2, 3, 5, 10]
PLANTCLEF_IMAGES, PLANTCLEF_CLASSES = 1_400_000, 7_806
MIB = 2**20


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every 20 ms."""

    def __enter__(self) -> PeakRss:
        self.start = current_rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


class RandomScorer:
    """Stands in for ScoringActor: one block of softmax rows per input seed, with labels and idx."""

    def __init__(self, block_rows: int, num_rows: int) -> None:
        self.block_rows = block_rows
        self.num_rows = num_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (block,) = batch["id"]
        start = int(block) * self.block_rows
        rows = min(self.block_rows, self.num_rows - start)
        rng = np.random.default_rng([11, int(block)])
        scores = softmax_scores(rng, rows, NUM_CLASSES)
        return {
            "idx": np.arange(start, start + rows, dtype=np.int64),
            "label": rng.integers(0, NUM_CLASSES, rows),
            "scores": scores,
            "worker_peak_rss": np.full(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        }


def in_memory_table(repeats: int, seed: int) -> list[str]:
    import ray

    from avgk.method.streamed_thresholds import StreamingThresholds
    from avgk.method.thresholds import calibrate_thresholds, reference_thresholds
    from tests.helpers.reductions import calibrate_dataset

    scores_NL = softmax_scores(np.random.default_rng(seed), NUM_VAL, NUM_CLASSES)
    t_sort, expected = best_time(lambda: reference_thresholds(scores_NL, KS), 2)
    t_max, _ = best_time(lambda: scores_NL.max(), repeats)

    def streamed_in_process():
        calibrator = StreamingThresholds(ks=KS)
        chunks = np.array_split(scores_NL, 8)
        for chunk in chunks:
            calibrator.update(chunk)
        calibrator.load_state(calibrator.state())
        calibrator.next_pass()
        for chunk in chunks:
            calibrator.update(chunk)
        calibrator.load_state(calibrator.state())
        return calibrator.thresholds()

    ds = ray.data.from_numpy(scores_NL).rename_columns({"data": "scores"}).repartition(4).materialize()
    rows = [
        ("full torch.sort (reference_thresholds)", t_sort, expected),
        ("calibrate_thresholds (in memory)", *best_time(lambda: calibrate_thresholds(scores_NL, KS), repeats)),
        ("StreamingThresholds, 2 passes, 8 chunks, 1 process", *best_time(streamed_in_process, repeats)),
        ("calibrate_dataset: Ray tasks over 4 blocks", *best_time(lambda: calibrate_dataset(ds, ks=KS, num_tasks=4), repeats)),
        ("one scores.max() pass", t_max, None),
    ]
    lines = [
        f"in memory: {NUM_VAL:,} x {NUM_CLASSES:,} random softmax float32, K in {{{', '.join(map(str, KS))}}}, best of {repeats}",
        "",
        "| method | best time (ms) | speed-up vs sort | time / max pass | equal to reference |",
        "|---|---:|---:|---:|---|",
    ]
    for name, seconds, result in rows:
        equal = "-" if result is None else ("yes" if result == expected else "NO")
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {t_sort / seconds:.1f}x | {seconds / t_max:.1f}x | {equal} |")
    return lines


def streamed_table(*, stream_rows: int, block_rows: int, num_actors: int) -> list[str]:
    import ray

    from avgk.evaluation.passes import MetricsPass, PseudoLabelPass, ThresholdsPass
    from avgk.method.pseudo_labels import GlobalPseudoLabeler
    from pipelines.reduction import block_groups, run_passes

    num_blocks = -(-stream_rows // block_rows)
    num_values = stream_rows * NUM_CLASSES
    lines = []
    with PeakRss() as driver_scoring:
        start = time.perf_counter()
        scores = (
            ray.data.range(num_blocks, override_num_blocks=num_blocks)
            .map_batches(RandomScorer, compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=1,
                         num_cpus=0.5, fn_constructor_kwargs=dict(block_rows=block_rows, num_rows=stream_rows))
            .materialize()
        )
        t_score = time.perf_counter() - start
    actor_peak = scores.max("worker_peak_rss")
    groups = block_groups(scores, None)
    # Warm-up: the first tasks start worker processes (imports of numpy, torch, avgk); a job pays it once.
    start = time.perf_counter()
    run_passes(scores, MetricsPass(num_classes=NUM_CLASSES, ks=(1.0,), thresholds=((1.0, 0.5),),
                                   train_class_counts=None, freq_bins=(20, 100)), groups=[g[:1] for g in groups])
    t_warmup = time.perf_counter() - start
    tracemalloc.start()
    with PeakRss() as driver_reduce:
        spec = ThresholdsPass(ks=tuple(KS))
        start = time.perf_counter()
        thresholds_run = run_passes(scores, spec, groups=groups, trace_memory=True)
        t_thresholds = time.perf_counter() - start
        thresholds = spec.calibrator(thresholds_run.totals).thresholds()
        metrics_spec = MetricsPass(num_classes=NUM_CLASSES, ks=tuple(KS), thresholds=tuple(thresholds.items()),
                                   train_class_counts=None, freq_bins=(20, 100))
        start = time.perf_counter()
        metrics_run = run_passes(scores, metrics_spec, groups=groups, trace_memory=True)
        t_metrics = time.perf_counter() - start
        start = time.perf_counter()
        labels_run = run_passes(scores, PseudoLabelPass(2.0), groups=groups, trace_memory=True)
        t_labels = time.perf_counter() - start
        selection = GlobalPseudoLabeler.resume(k=2.0, totals=labels_run.totals).selection
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    reports = [r for run in (thresholds_run, metrics_run, labels_run) for rs in run.reports for r in rs]
    task_peak = max(r.peak_rss_bytes for r in reports)
    task_traced = max(r.peak_traced_bytes for r in reports)
    num_tasks = len(groups)

    def per_value_ns(run) -> list[float]:
        """Worker CPU time per value and pass (sum of the tasks' seconds / values)."""
        return [sum(r.seconds for r in rs) / num_values * 1e9 for rs in run.reports]

    threshold_ns = per_value_ns(thresholds_run)
    metrics_ns = per_value_ns(metrics_run)[0]
    label_ns = per_value_ns(labels_run)
    block_mib = block_rows * NUM_CLASSES * 4 / MIB
    lines += [
        f"streamed through Ray Data: {stream_rows:,} x {NUM_CLASSES:,} = {num_values:,} values "
        f"({num_values * 4 / 2**30:.2f} GiB float32, in the object store, never on the driver); "
        f"{num_blocks} blocks of {block_rows:,} rows ({block_mib:.0f} MiB); {num_actors} scoring actors, "
        f"{num_tasks} reduction tasks, {os.cpu_count()} cores",
        "",
        "| stage | wall (s) | worker CPU per value and pass (ns) | notes |",
        "|---|---:|---:|---|",
        f"| score + materialise (random softmax stands in for the model) | {t_score:.1f} | - | Ray Data actor pool |",
        f"| first reduction tasks: worker start-up (imports), once per job | {t_warmup:.1f} | - | |",
        f"| lambda_K, 5 K: 2 passes | {t_thresholds:.1f} | {threshold_ns[0]:.2f} / {threshold_ns[1]:.2f} | "
        f"states: {thresholds_run.totals[0].nbytes / 1024:.0f} KiB + {thresholds_run.totals[1].nbytes / 1024:.0f} KiB |",
        f"| SetMetrics, 5 K: 1 pass | {t_metrics:.1f} | {metrics_ns:.2f} | counts only |",
        f"| global pseudo-labels K_pl=2: {len(labels_run.totals)} passes | {t_labels:.1f} | "
        + " / ".join(f"{v:.2f}" for v in label_ns)
        + f" | M={selection.num_positives:,}, {selection.num_equal} tie(s) at the threshold |",
        "",
        "| memory | peak |",
        "|---|---:|",
        f"| driver RSS while scoring (Ray client, torch, imports) | {driver_scoring.peak / MIB:.0f} MiB "
        f"(start {driver_scoring.start / MIB:.0f}) |",
        f"| driver RSS during the reductions | {driver_reduce.peak / MIB:.0f} MiB (start {driver_reduce.start / MIB:.0f}) |",
        f"| driver Python/numpy heap during the reductions (tracemalloc) | {traced_peak / MIB:.1f} MiB |",
        f"| scoring actor RSS (process peak) | {actor_peak / MIB:.0f} MiB |",
        f"| reduction task RSS (worker process peak; counts the object-store pages it read) | {task_peak / MIB:.0f} MiB |",
        f"| reduction task's own Python/numpy heap (tracemalloc, max over tasks) | {task_traced / MIB:.0f} MiB |",
        f"| scores in the object store | {num_values * 4 / MIB:.0f} MiB |",
    ]

    # ---- PlantCLEF extrapolation: costs scale with values; state sizes do not.
    big_values = PLANTCLEF_IMAGES * PLANTCLEF_CLASSES
    per_pass = {
        "lambda_K pass 1": threshold_ns[0], "lambda_K pass 2": threshold_ns[1], "SetMetrics": metrics_ns,
        **{f"pseudo-labels pass {i + 1}": v for i, v in enumerate(label_ns)},
    }
    lines += [
        "",
        f"PlantCLEF estimate: {PLANTCLEF_IMAGES:,} x {PLANTCLEF_CLASSES:,} = {big_values / 1e9:.2f} G values "
        f"({big_values * 4 / 2**30:.1f} GiB of float32 scores: spilled by the object store), per pass:",
        "",
        "| pass | CPU-seconds | wall on 16 CPUs (s) | wall on 64 CPUs (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, ns in per_pass.items():
        cpu_s = ns * big_values / 1e9
        lines.append(f"| {name} | {cpu_s:.0f} | {cpu_s / 16:.1f} | {cpu_s / 64:.1f} |")
    lines += [
        "",
        f"state per task: 512 KiB (pass 1), 512 KiB per needed bucket (pass 2), SetMetrics "
        f"~{(3 * len(KS) + 1) * PLANTCLEF_CLASSES * 8 / 1024:.0f} KiB at L={PLANTCLEF_CLASSES:,}, "
        f"tie counts {PLANTCLEF_IMAGES * 8 / MIB:.1f} MiB (only when ties straddle the cut-off); "
        f"pseudo-label table ~{(PLANTCLEF_IMAGES * 2 + PLANTCLEF_IMAGES) * 4 / MIB:.0f} MiB at K_pl=2",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-rows", type=int, default=10 * NUM_VAL)
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from pipelines import ray_env
    from pipelines.scoring import quiet_ray_data

    ray_env.connect()
    quiet_ray_data()
    lines = [f"command: `{shlex.join([sys.executable, *sys.argv])}`", ""]
    # The streamed part first, so the driver's peak memory is not the in-memory part's.
    lines += streamed_table(stream_rows=args.stream_rows, block_rows=args.block_rows, num_actors=args.num_actors)
    lines += ["", *in_memory_table(args.repeats, args.seed)]
    print("\n".join(lines))
    ray.shutdown()


if __name__ == "__main__":
    main()
