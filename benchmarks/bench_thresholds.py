"""Benchmark of exact lambda_K calibration against a full sort, in memory and streamed.

Run: python benchmarks/bench_thresholds.py [--repeats 5] [--stream-rows 311180]
Prints a markdown table. Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import torch

from avgk.evaluation.metrics import SetMetrics
from avgk.method.streamed_thresholds import StreamingThresholds, calibrate_thresholds_streamed
from avgk.method.thresholds import calibrate_thresholds, rank_for_k, reference_thresholds

__test__ = False

KS = [1, 2, 3, 5, 10]
NUM_CLASSES = 1081  # Pl@ntNet-300K
NUM_VAL = 31_118


def softmax_scores(rng: np.random.Generator, num_samples: int, num_classes: int) -> np.ndarray:
    logits_NL = rng.standard_normal((num_samples, num_classes), dtype=np.float32) * 3.0
    logits_NL -= logits_NL.max(axis=1, keepdims=True)
    np.exp(logits_NL, out=logits_NL)
    logits_NL /= logits_NL.sum(axis=1, keepdims=True)
    return logits_NL


def partition_thresholds(scores_NL: np.ndarray, ks: list[float]) -> dict[float, float]:
    """The np.partition baseline: one multi-kth partition of a copy of all values."""
    num_samples, num_classes = scores_NL.shape
    flat_V = scores_NL.reshape(-1)
    ms = {float(k): rank_for_k(num_samples=num_samples, num_classes=num_classes, k=k) for k in ks}
    positions = sorted({flat_V.size - r for m in ms.values() for r in (m, m + 1)})
    parted_V = np.partition(flat_V, positions)
    pair = lambda m: torch.tensor([parted_V[flat_V.size - m], parted_V[flat_V.size - m - 1]])  # noqa: E731
    return {k: float(0.5 * (pair(m)[0] + pair(m)[1])) + 0.0 for k, m in ms.items()}


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def stream_chunks(seed: int, num_rows: int, chunk_rows: int) -> Iterator[np.ndarray]:
    """The same chunks on every call: chunk i comes from its own seeded generator."""
    for index, start in enumerate(range(0, num_rows, chunk_rows)):
        rng = np.random.default_rng([seed, index])
        yield softmax_scores(rng, min(chunk_rows, num_rows - start), NUM_CLASSES)


def run_benchmark(*, repeats: int, stream_rows: int, chunk_rows: int, seed: int) -> str:
    lines = [f"command: `{shlex.join([sys.executable, *sys.argv])}`", ""]
    scores_NL = softmax_scores(np.random.default_rng(seed), NUM_VAL, NUM_CLASSES)
    scores_tensor = torch.from_numpy(scores_NL)
    ks_text = ", ".join(str(k) for k in KS)
    lines.append(
        f"in memory: {NUM_VAL:,} x {NUM_CLASSES:,} softmax float32, K in {{{ks_text}}}, "
        f"best of {repeats}, torch threads {torch.get_num_threads()}"
    )
    lines.append("")
    t_sort, expected = best_time(lambda: reference_thresholds(scores_tensor, KS), max(2, repeats // 2))
    t_max, _ = best_time(lambda: scores_NL.max(), repeats)
    rows = [("full torch.sort (reference)", t_sort, expected)]
    rows.append(("np.partition, multi-kth", *best_time(lambda: partition_thresholds(scores_NL, KS), repeats)))
    rows.append(("calibrate_thresholds (numpy in)", *best_time(lambda: calibrate_thresholds(scores_NL, KS), repeats)))
    rows.append(("calibrate_thresholds (torch in)", *best_time(lambda: calibrate_thresholds(scores_tensor, KS), repeats)))
    chunks = np.array_split(scores_NL, 8)
    rows.append(
        ("calibrate_thresholds_streamed, 8 chunks",
         *best_time(lambda: calibrate_thresholds_streamed(lambda: chunks, KS), repeats))
    )
    rows.append(("one scores.max() pass", t_max, None))
    lines.append("| method | best time (ms) | speed-up vs sort | time / max pass | equal to reference |")
    lines.append("|---|---:|---:|---:|---|")
    for name, seconds, result in rows:
        equal = "-" if result is None else ("yes" if result == expected else "NO")
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {t_sort / seconds:.1f}x | {seconds / t_max:.1f}x | {equal} |")

    thresholds = calibrate_thresholds(scores_NL, KS)
    labels_N = np.random.default_rng(seed + 1).integers(0, NUM_CLASSES, NUM_VAL)

    def evaluate() -> dict:
        metrics = SetMetrics(num_classes=NUM_CLASSES, ks=KS, thresholds=thresholds)
        metrics.update(scores_NL=scores_NL, labels_N=labels_N)
        return metrics.compute()

    t_eval, _ = best_time(evaluate, repeats)
    lines += ["", f"SetMetrics update + compute on the same matrix (5 ks): {t_eval * 1e3:.0f} ms", ""]

    # ---- streamed: never materialised, chunks regenerated for each pass
    num_values = stream_rows * NUM_CLASSES
    start = time.perf_counter()
    for _ in stream_chunks(seed, stream_rows, chunk_rows):
        pass
    t_generate = time.perf_counter() - start
    tracemalloc.start()
    start = time.perf_counter()
    calibrator = StreamingThresholds(ks=KS)
    for chunk in stream_chunks(seed, stream_rows, chunk_rows):
        calibrator.update(chunk)
    calibrator.load_state(calibrator.state())
    calibrator.next_pass()
    for chunk in stream_chunks(seed, stream_rows, chunk_rows):
        calibrator.update(chunk)
    calibrator.load_state(calibrator.state())
    streamed = calibrator.thresholds()
    t_stream = time.perf_counter() - start
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Independent check with plain comparisons in a third pass: s_(r) is the value v with
    # #{> v} < r <= #{>= v}, for both ranks of every K.
    ranked = calibrator.values_at_ranks()
    values_R = np.array([ranked[r].value for r in sorted(ranked)], dtype=np.float32)
    greater_R = np.zeros(values_R.size, dtype=np.int64)
    greater_equal_R = np.zeros(values_R.size, dtype=np.int64)
    for chunk in stream_chunks(seed, stream_rows, chunk_rows):
        flat_V = chunk.reshape(-1)
        for i, value in enumerate(values_R):
            greater_R[i] += np.count_nonzero(flat_V > value)
            greater_equal_R[i] += np.count_nonzero(flat_V >= value)
    ranks_R = np.array(sorted(ranked))
    exact = bool(np.all((greater_R < ranks_R) & (ranks_R <= greater_equal_R)))

    chunk_mib = chunk_rows * NUM_CLASSES * 4 / 2**20
    lines.append(
        f"streamed: {stream_rows:,} x {NUM_CLASSES:,} = {num_values:,} values ({num_values * 4 / 2**30:.2f} GiB "
        f"as float32, never held), chunks of {chunk_rows:,} rows ({chunk_mib:.0f} MiB)"
    )
    lines.append("")
    lines.append("| streamed measure | value |")
    lines.append("|---|---:|")
    lines.append(f"| two passes incl. chunk generation | {t_stream:.2f} s |")
    lines.append(f"| chunk generation alone, one pass | {t_generate:.2f} s |")
    lines.append(f"| calibration work (total - 2 x generation) | {t_stream - 2 * t_generate:.2f} s |")
    throughput = 2 * num_values / max(t_stream - 2 * t_generate, 1e-9)
    lines.append(f"| calibration throughput | {throughput / 1e6:.0f} M values/s/pass |")
    lines.append(f"| peak traced memory (tracemalloc: Python + numpy heap), incl. one chunk | {peak_bytes / 2**20:.0f} MiB |")
    lines.append(f"| ranks verified by a third counting pass | {'yes' if exact else 'NO'} |")
    lines.append("")
    lines.append("thresholds (streamed): " + ", ".join(f"K={k:g}: {v:.6g}" for k, v in streamed.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-rows", type=int, default=10 * NUM_VAL)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(run_benchmark(repeats=args.repeats, stream_rows=args.stream_rows, chunk_rows=args.chunk_rows, seed=args.seed))


if __name__ == "__main__":
    main()
