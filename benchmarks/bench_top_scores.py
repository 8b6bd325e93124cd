"""Benchmark of issue #18 item 2: the scoring jobs on top-T score rows against today's full rows.

Run: python benchmarks/bench_top_scores.py [--sizes val plantclef] [--plantclef-rows 300000]
         [--object-store-gib 4] [--block-rows-val 8192] [--block-rows-plantclef 2048] [--rounds 1]

Each size runs the two scoring jobs twice on the same data, today's way (full rows: eval.score_rows=full)
and the new way (top-T rows, the default), one at a time (at the val size --rounds pairs, the
order alternating):

  evaluate     score -> materialise -> lambda_K for K in {1, 2, 3, 5, 10} (2 passes) -> SetMetrics at
               those lambda_K (1 pass; over the same rows, standing in for the test split);
               top-T: T = default_top_t(10) = 80 values per row, no class ids;
  pseudolabel  score (softmax) -> materialise -> global selection K_pl = 2 (2-3 passes) -> the
               parquet table written by parallel tasks; top-T: T = default_top_t(2) = 16 values
               and their class ids per row.

The model is replaced by an actor pool that generates random softmax rows chunk by chunk (the
same seeded rows in both ways; the N x L matrix never exists outside one chunk), then keeps
them as the jobs do (pipelines.scoring.score_columns), so what is measured is the job around the
model. Sizes: "val" = Pl@ntNet-300K val, 31,118 x 1,081; "plantclef" = --plantclef-rows x 7,806.

Measured per job:
  object store, peak   the raylet's object_store_bytes_used (what `ray memory --stats-only` prints),
                       sampled every 0.1 s from the job's start to its end; the store is capped at
                       --object-store-gib, beyond which Ray spills to disk;
  spilled / restored   bytes the raylet wrote to and read back from disk during the job;
  materialised         the score dataset's size (Ray Data's size_bytes of its blocks: the whole
                       footprint, in memory or spilled);
  wall                 the job's wall time, and its reductions alone (after materialising);
  equal                thresholds (float32 bits), the whole metrics document, the selection and the
                       table (offsets and labels) of the new way against today's.
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Ray workers import this module by name

__test__ = False

KS = [1.0, 2.0, 3.0, 5.0, 10.0]
K_PL = 2.0
SIZES = {"val": (31_118, 1_081), "plantclef": (300_000, 7_806)}
MIB, GIB = 2**20, 2**30


# ---------------------------------------------------------------- the object store, measured


class StoreSampler:
    """Peak object-store bytes in use, and bytes spilled/restored, from the raylet every `period` s."""

    def __init__(self, period: float = 0.1) -> None:
        import ray

        from pipelines import ray_private

        # This benchmark's own cluster: other local clusters may be running on the machine.
        self.stats = ray_private.object_store_stats_reader(ray.get_runtime_context().gcs_address)
        self.period = period

    def __enter__(self) -> StoreSampler:
        first = self.stats()
        self.start_used = first.object_store_bytes_used
        self.start_spilled, self.start_restored = first.spilled_bytes_total, first.restored_bytes_total
        self.peak_used = first.object_store_bytes_used
        self.capacity = first.object_store_bytes_avail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_used = max(self.peak_used, self.stats().object_store_bytes_used)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        last = self.stats()
        self.peak_used = max(self.peak_used, last.object_store_bytes_used)
        self.spilled = last.spilled_bytes_total - self.start_spilled
        self.restored = last.restored_bytes_total - self.start_restored


def wait_for_empty_store(sampler: StoreSampler, timeout: float = 120.0) -> int:
    """Bytes still in use after the previous job's objects were released (waits for them to go)."""
    import gc

    gc.collect()
    deadline = time.monotonic() + timeout
    used = sampler.stats().object_store_bytes_used
    while used > 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.5)
        used = sampler.stats().object_store_bytes_used
    return used


# ---------------------------------------------------------------- the stand-in model


def softmax_block(block: int, rows: int, num_classes: int, seed: int,
                  drawn: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Seeded softmax rows and labels: uniform, or (`drawn`) drawn from each row (Gumbel-max: the argmax of
    the logits plus Gumbel noise), which gives the sets of a calibrated model."""
    rng = np.random.default_rng([seed, block])
    logits = rng.standard_normal((rows, num_classes), dtype=np.float32) * 3.0
    if drawn:
        gumbel = -np.log(-np.log(rng.random((rows, num_classes), dtype=np.float32) + 1e-30))
        labels = np.argmax(logits + gumbel, axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    if not drawn:
        labels = rng.integers(0, num_classes, rows)
    return logits, labels.astype(np.int64)


class GeneratedScorer:
    """Stands in for ScoringActor: one block of seeded softmax rows per input id, kept as the jobs keep them
    (with `set_columns`, a pipelines.scoring.SetColumns, the set rules' columns too)."""

    def __init__(self, *, block_rows: int, num_rows: int, num_classes: int, top_t: int | None,
                 with_classes: bool, seed: int, drawn: bool = False, set_columns: Any = None) -> None:
        self.block_rows, self.num_rows, self.num_classes = block_rows, num_rows, num_classes
        self.top_t, self.with_classes, self.seed = top_t, with_classes, seed
        self.drawn, self.set_columns = drawn, set_columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.scoring import score_columns

        (block,) = batch["id"]
        start = int(block) * self.block_rows
        rows = min(self.block_rows, self.num_rows - start)
        scores, labels = softmax_block(int(block), rows, self.num_classes, self.seed, self.drawn)
        out = {"idx": np.arange(start, start + rows, dtype=np.int64), "label": labels}
        out.update(score_columns(scores, labels_N=out["label"], column="scores", top_t=self.top_t,
                                 with_classes=self.with_classes))
        if self.set_columns is not None:
            out.update(self.set_columns.of(scores, labels_N=labels))
        return out


def scored(*, num_rows: int, num_classes: int, block_rows: int, top_t: int | None, with_classes: bool, seed: int,
           drawn: bool = False, set_columns: Any = None):
    import ray

    num_blocks = -(-num_rows // block_rows)
    return (
        ray.data.range(num_blocks, override_num_blocks=num_blocks)
        .map_batches(GeneratedScorer, compute=ray.data.ActorPoolStrategy(size=2), batch_size=1, num_cpus=0.5,
                     fn_constructor_kwargs=dict(block_rows=block_rows, num_rows=num_rows, num_classes=num_classes,
                                                top_t=top_t, with_classes=with_classes, seed=seed, drawn=drawn,
                                                set_columns=set_columns))
        .materialize()
    )


# ---------------------------------------------------------------- the two jobs


@dataclass
class JobRun:
    job: str
    way: str
    top_t: int | None
    wall: float = 0.0
    reductions: float = 0.0
    materialised: int = 0
    peak_used: int = 0
    spilled: int = 0
    restored: int = 0
    result: Any = None
    notes: list[str] = field(default_factory=list)


def evaluate_job(run: JobRun, *, num_rows: int, num_classes: int, block_rows: int, seed: int) -> None:
    from avgk.evaluation import passes
    from avgk.evaluation.top_scores import exact_or_full
    from pipelines.reduction import ray_runner

    start = time.perf_counter()
    ds = scored(num_rows=num_rows, num_classes=num_classes, block_rows=block_rows, top_t=run.top_t,
                with_classes=False, seed=seed)
    run.materialised = ds.size_bytes()
    reductions = time.perf_counter()
    top = run.top_t is not None

    def on(rows, top: bool):
        runner = ray_runner({"val": rows, "test": rows})
        thresholds = passes.calibrate(runner, "val", ks=KS, top=top, num_classes=num_classes)
        metrics = passes.count_metrics(runner, "test", num_classes=num_classes, ks=KS, thresholds=thresholds,
                                       train_class_counts=None, freq_bins=(20, 100), top=top)
        return thresholds, metrics.compute()

    def full():
        return on(scored(num_rows=num_rows, num_classes=num_classes, block_rows=block_rows, top_t=None,
                         with_classes=False, seed=seed), False)

    # ds as a default: the lambda is gone after this line, and `del ds` then frees the dataset
    run.result = exact_or_full(lambda ds=ds: on(ds, top), full, log=run.notes.append, what="evaluate") if top else on(ds, False)
    del ds
    run.reductions = time.perf_counter() - reductions
    run.wall = time.perf_counter() - start


def pseudolabel_job(run: JobRun, *, num_rows: int, num_classes: int, block_rows: int, seed: int, out_dir: str) -> None:
    from avgk.evaluation.top_scores import exact_or_full
    from avgk.method.pseudo_label_table import read_pseudo_label_table
    from avgk.training.pseudo_refresh import describe_selection
    from pipelines.pseudolabel import select_dataset, write_table_dataset
    from pipelines.reduction import block_groups

    start = time.perf_counter()
    top = run.top_t is not None

    def label(top_t: int | None):
        ds = scored(num_rows=num_rows, num_classes=num_classes, block_rows=block_rows, top_t=top_t,
                    with_classes=True, seed=seed)
        if not run.materialised:
            run.materialised = ds.size_bytes()
        run.reductions = time.perf_counter()
        groups = block_groups(ds, None)
        selection = select_dataset(ds, k=K_PL, groups=groups, top=top_t is not None, num_classes=num_classes)
        metadata = describe_selection(selection, source="bench", checkpoint="none", created=0.0)
        uri = write_table_dataset(ds, selection, run_dir=out_dir, metadata=metadata, groups=groups,
                                  top=top_t is not None)
        return selection, read_pseudo_label_table(uri)

    if top:
        run.result = exact_or_full(lambda: label(run.top_t), lambda: label(None), log=run.notes.append, what="pseudolabel")
    else:
        run.result = label(None)
    run.reductions = time.perf_counter() - run.reductions
    run.wall = time.perf_counter() - start


def measured(sampler: StoreSampler, run: JobRun, body) -> JobRun:
    left = wait_for_empty_store(sampler)
    if left > 64 * MIB:
        run.notes.append(f"{left / MIB:.0f} MiB still in the store at the start")
    with sampler as store:
        body()
    run.peak_used, run.spilled, run.restored = store.peak_used - store.start_used, store.spilled, store.restored
    return run


def equal_results(job: str, old: Any, new: Any) -> str:
    if job == "evaluate":
        (old_thresholds, old_doc), (new_thresholds, new_doc) = old, new
        bits = all(np.float32(old_thresholds[k]).view(np.uint32) == np.float32(new_thresholds[k]).view(np.uint32)
                   for k in old_thresholds) and list(old_thresholds) == list(new_thresholds)
        return "yes" if bits and old_doc == new_doc else f"NO (thresholds {bits}, metrics {old_doc == new_doc})"
    (old_sel, old_table), (new_sel, new_table) = old, new
    same = (old_sel == new_sel and np.array_equal(old_table.offsets_N1, new_table.offsets_N1)
            and np.array_equal(old_table.labels_M, new_table.labels_M))
    return "yes" if same else "NO"


# ---------------------------------------------------------------- report


def machine_line() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        total = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    return f"{os.cpu_count()} CPUs ({cpu}), {total / GIB:.0f} GiB RAM, {platform.python_version()}"


def fmt_bytes(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.1f} MiB"


def start_local_ray(*, object_store_gib: float) -> tuple[str, datetime]:
    """A local Ray on 127.0.0.1 with the object store capped, its workers importing this checkout, quiet Ray
    Data; returns the checkout's commit and the start time (UTC) for the benchmark's header."""
    import ray

    from pipelines.scoring import quiet_ray_data

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    started = datetime.now(timezone.utc)
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=int(object_store_gib * GIB),
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}})
    quiet_ray_data()
    return commit, started


def main() -> None:
    from avgk.evaluation.top_scores import default_top_t

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--plantclef-rows", type=int, default=SIZES["plantclef"][0])
    parser.add_argument("--object-store-gib", type=float, default=4.0)
    parser.add_argument("--block-rows-val", type=int, default=8192)
    parser.add_argument("--block-rows-plantclef", type=int, default=2048)
    parser.add_argument("--jobs", nargs="+", choices=["evaluate", "pseudolabel"], default=["evaluate", "pseudolabel"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="old/new pairs per job at the val size (order alternates)")
    args = parser.parse_args()
    sizes = {"val": SIZES["val"], "plantclef": (args.plantclef_rows, SIZES["plantclef"][1])}

    import ray

    commit, started = start_local_ray(object_store_gib=args.object_store_gib)
    sampler = StoreSampler()
    out = tempfile.mkdtemp(prefix="bench-top-scores-")
    # Warm-up: worker processes and imports, paid once, before anything is timed.
    evaluate_job(JobRun("evaluate", "warm-up", None), num_rows=2_000, num_classes=100, block_rows=1_000, seed=99)
    pseudolabel_job(JobRun("pseudolabel", "warm-up", 16), num_rows=2_000, num_classes=100, block_rows=1_000, seed=99,
                    out_dir=f"{out}/warm")
    runs: list[tuple[str, JobRun, JobRun, str]] = []
    try:
        for size in args.sizes:
            num_rows, num_classes = sizes[size]
            block_rows = args.block_rows_val if size == "val" else args.block_rows_plantclef
            for job, round_ in [(job, r) for r in range(args.rounds if size == "val" else 1) for job in args.jobs]:
                top_t = default_top_t(max_k=max(KS) if job == "evaluate" else K_PL)
                pair = []
                ways = [("today: full rows", None), (f"new: top-{top_t} rows", top_t)]
                # Alternate which way runs first: a shared machine's speed drifts.
                for way, t in (ways if round_ % 2 == 0 else ways[::-1]):
                    run = JobRun(job, way, t)
                    shape = {"num_rows": num_rows, "num_classes": num_classes, "block_rows": block_rows, "seed": args.seed}
                    if job == "evaluate":
                        body = lambda run=run, shape=shape: evaluate_job(run, **shape)  # noqa: E731
                    else:
                        out_dir = f"{out}/{size}-{'full' if t is None else 'top'}"
                        body = lambda run=run, shape=shape, out_dir=out_dir: pseudolabel_job(  # noqa: E731
                            run, **shape, out_dir=out_dir)
                    pair.append(measured(sampler, run, body))
                    print(f"# {size} {job} {way}: {run.wall:.1f} s, peak {fmt_bytes(run.peak_used)}, "
                          f"spilled {fmt_bytes(run.spilled)}, materialised {fmt_bytes(run.materialised)}"
                          + (f"; {run.notes}" if run.notes else ""), flush=True)
                old_run, new_run = sorted(pair, key=lambda r: r.top_t is not None)
                runs.append((size, old_run, new_run, equal_results(job, old_run.result, new_run.result)))
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)

    command = shlex.join(["python", *sys.argv])
    print(f"\ncommand: `{command}`")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC; commit {commit}; machine: {machine_line()}; "
          f"object store capped at {args.object_store_gib:g} GiB (spills to disk beyond)\n")
    print("| size | job | way | materialised | object store, peak | spilled / restored | wall (s) | reductions (s) "
          "| memory: today / new | wall: new / today | equal to today |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, old, new, equal in runs:
        num_rows, num_classes = sizes[size]
        label = f"{num_rows:,} x {num_classes:,}"
        for run in (old, new):
            ratio = (f"{old.peak_used / max(new.peak_used, 1):.1f}x peak, "
                     f"{old.materialised / max(new.materialised, 1):.1f}x materialised") if run is new else ""
            speed = f"{new.wall / old.wall:.2f}" if run is new else ""
            print(f"| {label} | {run.job} | {run.way} | {fmt_bytes(run.materialised)} | {fmt_bytes(run.peak_used)} | "
                  f"{fmt_bytes(run.spilled)} / {fmt_bytes(run.restored)} | {run.wall:.1f} | {run.reductions:.1f} | "
                  f"{ratio} | {speed} | {equal if run is new else '-'} |")
    for size in args.sizes:
        for job in args.jobs:
            pairs = [(old, new) for s, old, new, _ in runs if s == size and old.job == job]
            if len(pairs) > 1:
                ratios = sorted(new.wall / old.wall for old, new in pairs)
                print(f"\n{size} {job}: wall new / today over {len(pairs)} rounds: median {np.median(ratios):.2f} "
                      f"(each: {', '.join(f'{r:.2f}' for r in ratios)})")
    notes = [f"{size} {run.job} {run.way}: {note}" for size, old, new, _ in runs for run in (old, new) for note in run.notes]
    if notes:
        print("\nnotes:\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
