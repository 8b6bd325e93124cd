"""Benchmark of issue #34 item 2: coverage sets evaluated exactly from top-T rows, against full score rows.

Run: python benchmarks/bench_coverage_sets.py [--rows 300000] [--classes 7806] [--coverages 0.9 0.95 0.99]
         [--object-store-gib 4] [--block-rows 2048] [--check-rows 4000]

The evaluate job's reductions with eval.set_rules = [coverage at 0.9, 0.95, 0.99] beside average-K
(K in {1, 2, 3, 5, 10}), two ways, one at a time, on the same seeded softmax rows:

  full rows  (what a job had to keep for coverage sets larger than its top-T rows: eval.score_rows=full)
             the rows scored once, all L scores kept; lambda_K, SetMetrics, the set rules' calibration
             (gathered by sample index) and their counts all computed in the passes from the full rows;
  top-T      (the job since issue 34) the rows' top-80 form plus, for val, the true label's score
             (`SetColumns.calibrating`); calibration by gathering; then test scored again with the
             calibrated rules, each row's set size and coverage computed by the scorer from its full row.

The same rows stand in for val and test, generated and kept twice in both ways, as a job scores both
splits. Labels are drawn from each row's softmax (Gumbel-max), so the sets
have the sizes of a calibrated model's. Measured: the object store's peak and spill (the raylet's
counters every 0.1 s), wall, and the metrics documents equal between the ways. --check-rows: both
ways on that many rows against a plain NumPy reference (the whole matrix in memory,
avgk.method.coverage_sets on it, sets counted row by row). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Ray workers import this module by name

from benchmarks.bench_top_scores import (
    JobRun,
    StoreSampler,
    fmt_bytes,
    machine_line,
    measured,
    scored,
    softmax_block,
    start_local_ray,
)

__test__ = False

KS = [1.0, 2.0, 3.0, 5.0, 10.0]
TOP_T = 80


def evaluate(run: JobRun, *, rules: list, num_rows: int, num_classes: int, block_rows: int, seed: int) -> None:
    from avgk.evaluation import passes
    from pipelines.reduction import ray_runner
    from pipelines.scoring import SetColumns

    start = time.perf_counter()
    shape = dict(num_rows=num_rows, num_classes=num_classes, block_rows=block_rows, seed=seed, drawn=True,
                 with_classes=False)
    top = run.top_t is not None
    calibration = SetColumns.calibrating({"scores": rules}) if top else None
    splits = {"val": scored(**shape, top_t=run.top_t, set_columns=calibration)}
    run.materialised = splits["val"].size_bytes()

    def score_test(calibrated: dict) -> None:
        columns = SetColumns.counting({"scores": calibrated["scores"]}) if top else None
        splits["test"] = scored(**shape, top_t=run.top_t, set_columns=columns)
        run.materialised += splits["test"].size_bytes()

    counts = np.zeros(num_classes, dtype=np.int64)
    evaluation = passes.evaluate(
        ray_runner(splits), ks=KS, num_classes=num_classes, train_class_counts=counts, freq_bins=(20, 100),
        score_head="softmax", with_posterior=False, top=top, set_rules=rules, num_val_samples=num_rows,
        on_calibrated=score_test)
    splits.clear()
    run.result = evaluation.metrics
    run.wall = time.perf_counter() - start


def numpy_reference(rules: list, *, num_rows: int, num_classes: int, block_rows: int, seed: int) -> dict[str, Any]:
    """Coverage and mean set size of every target, from the whole matrix in memory, sets counted row by row."""
    from avgk.evaluation.set_rules import calibrate
    from avgk.method import coverage_sets as cs

    blocks = [softmax_block(b, min(block_rows, num_rows - b * block_rows), num_classes, seed, drawn=True)
              for b in range(-(-num_rows // block_rows))]
    probs = np.concatenate([b[0] for b in blocks])
    labels = np.concatenate([b[1] for b in blocks])
    true = probs[np.arange(num_rows), labels]
    out: dict[str, Any] = {}
    for rule in calibrate(rules, true_N=true, labels_N=labels, num_classes=num_classes):
        threshold = cs.lac_threshold(true_scores_N=true, alpha=1 - rule.coverage)
        sizes = np.array([int(np.sum(row >= np.float32(threshold))) for row in probs])
        covered = true >= np.float32(threshold)
        out[rule.key] = {"coverage": float(covered.mean()), "avg_set_size": float(sizes.mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--classes", type=int, default=7_806)
    parser.add_argument("--coverages", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--object-store-gib", type=float, default=4.0)
    parser.add_argument("--block-rows", type=int, default=2048)
    parser.add_argument("--check-rows", type=int, default=4000, help="rows of the NumPy reference check (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from avgk.config.evaluation import SetRuleConfig

    rules = [SetRuleConfig(rule="coverage", coverages=args.coverages)]
    commit, started = start_local_ray(object_store_gib=args.object_store_gib)
    sampler = StoreSampler()
    check = []
    try:
        if args.check_rows:
            shape = dict(num_rows=args.check_rows, num_classes=args.classes, block_rows=1000, seed=args.seed + 1)
            reference = numpy_reference(rules, **shape)
            for top_t in (None, TOP_T):
                run = JobRun("check", "full rows" if top_t is None else f"top-{top_t}", top_t)
                evaluate(run, rules=rules, **shape)
                got = {f"coverage@{c}": {"coverage": e["coverage"], "avg_set_size": e["avg_set_size"]}
                       for c, e in run.result["test"]["set_rules"]["coverage"].items()}
                check.append((run.way, got == reference))
            print(f"# check on {args.check_rows} rows: {check}; reference {reference}", flush=True)
        shape = dict(num_rows=args.rows, num_classes=args.classes, block_rows=args.block_rows, seed=args.seed)
        runs = []
        for top_t in (None, TOP_T):
            run = JobRun("evaluate", "full rows" if top_t is None else f"top-{top_t} rows + set columns", top_t)
            measured(sampler, run, lambda run=run: evaluate(run, rules=rules, **shape))
            print(f"# {run.way}: {run.wall:.1f} s, peak {fmt_bytes(run.peak_used)}, spilled {fmt_bytes(run.spilled)}",
                  flush=True)
            runs.append(run)
    finally:
        ray.shutdown()

    full, top = runs
    print(f"\ncommand: `{shlex.join(['python', *sys.argv])}`")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC; commit {commit}; machine: {machine_line()}; object store capped at "
          f"{args.object_store_gib:g} GiB\n")
    print("| way | materialised | object store, peak | spilled / restored | wall (s) |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run.way} | {fmt_bytes(run.materialised)} | {fmt_bytes(run.peak_used)} | "
              f"{fmt_bytes(run.spilled)} / {fmt_bytes(run.restored)} | {run.wall:.1f} |")
    ratio = f"{full.peak_used / top.peak_used:.1f}x" if top.peak_used else "- (no sample of the store held data)"
    print(f"\npeak full / top: {ratio}; wall top / full: {top.wall / full.wall:.2f}; "
          f"metrics documents equal: {full.result == top.result}")
    print("\n| target | coverage | mean set size | sets larger than T=80 | empty sets |")
    print("|---:|---:|---:|---:|---:|")
    for target, entry in top.result["test"]["set_rules"]["coverage"].items():
        histogram = entry["set_size_histogram"]
        larger = sum(count for size, count in histogram.items() if int(size) > TOP_T) / args.rows
        print(f"| {target} | {entry['coverage']:.4f} | {entry['avg_set_size']:.1f} | {100 * larger:.1f}% | "
              f"{100 * entry['empty_set_fraction']:.1f}% |")
    if check:
        print(f"\nNumPy reference on {args.check_rows} rows: " + ", ".join(f"{way}: {'equal' if ok else 'DIFFERENT'}"
                                                                      for way, ok in check))


if __name__ == "__main__":
    main()
