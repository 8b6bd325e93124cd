"""Exact average-K thresholds lambda_K, in memory and streamed in two passes with summable state."""

# Shape legend: N samples, L classes, V values (a flattened N x L block), B bins/buckets, R ranks.
#
# Every score is converted to float32 before anything else, as the Pl@ntNet-300K reference
# sorts float32 probabilities; a float32 threshold then gives `scores >= threshold` sets identical
# to the reference. Ranks are 1-based and count from the largest value down.

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = [
    "RankedValue",
    "StreamingSelector",
    "StreamingThresholds",
    "calibrate_thresholds",
    "calibrate_thresholds_streamed",
    "float_to_key",
    "key_to_float",
    "kth_largest",
    "rank_for_k",
    "reference_thresholds",
]

_INT32_MIN = np.int32(-(2**31))
# Below this many values a full partition is as fast as the sampled bracket.
_SMALL_NUM_VALUES = 1 << 18
_SAMPLE_SIZE = 1 << 16
# Binomial standard deviations of slack around the sampled bracket; a miss only costs a retry.
_BRACKET_SIGMAS = 4.0
# np.sort (vectorised) beats np.partition on candidate sets up to a few million values.
_SORT_MAX_VALUES = 1 << 22
_HIGH_BITS = 16
_NUM_BUCKETS = 1 << _HIGH_BITS
_LOW_MASK = np.uint32(_NUM_BUCKETS - 1)
# Streamed chunks are processed in blocks of this many values to bound temporary memory.
_BLOCK_VALUES = 1 << 20
# Number of leading int64 entries of a streaming state before the histograms: rows, values.
_HEADER = 2


# --------------------------------------------------------------------------- validation


def _validate_ks(ks: Iterable[float]) -> list[float]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise ValueError(f"ks must be a sequence of positive numbers, got {ks!r}")
    ks_list = [float(k) for k in ks]
    if not ks_list:
        raise ValueError("ks must hold at least one K, got an empty sequence")
    for k in ks_list:
        if not math.isfinite(k) or k <= 0:
            raise ValueError(f"every K must be a finite number > 0, got {k}")
    return ks_list


def round_count(*, n: int, k: float) -> int:
    """floor(n * k + 1/2), with k read as the decimal it prints as (0.3 * 5 -> 2, not float's 1).

    The one rounding rule for "K on average over n samples": lambda_K's rank and the
    pseudo-label counts (per batch and global) all use it.
    """
    return math.floor(Fraction(repr(float(k))) * n + Fraction(1, 2))


def rank_for_k(*, num_samples: int, num_classes: int, k: float) -> int:
    """Rank m = floor(N * K + 1/2) of the upper value in lambda_K = (s_(m) + s_(m+1)) / 2.

    N * K is computed exactly with K read as the decimal it prints as (K=0.3, N=5 gives m=2,
    where float arithmetic would give 1). Raises ValueError unless 1 <= m < N * L, the range
    where both s_(m) and s_(m+1) exist.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    k = float(k)
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"K must be a finite number > 0, got {k}")
    m = round_count(n=num_samples, k=k)
    num_values = num_samples * num_classes
    if not 1 <= m < num_values:
        raise ValueError(
            f"K={k} gives rank m=floor(N*K + 1/2)={m} with N={num_samples}, L={num_classes}; "
            f"need 1 <= m < N*L={num_values}"
        )
    return m


# --------------------------------------------------------------------------- conversions


def _as_float32_2d(scores: Any, *, name: str = "scores") -> np.ndarray:
    """N x L float32 numpy view (or copy) of a numpy array or a torch tensor on any device."""
    if isinstance(scores, torch.Tensor):
        array = scores.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        array = np.asarray(scores, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D N x L array, got shape {tuple(array.shape)}")
    return array


def float_to_key(values_float32: Any) -> np.ndarray:
    """Order-preserving uint32 keys: a < b as float32 iff key(a) < key(b) (with -0.0 < +0.0).

    Positives get their sign bit set, negatives have all bits flipped. NaNs land above +inf
    (positive NaN) or below -inf (negative NaN).
    """
    bits = np.ascontiguousarray(values_float32, dtype=np.float32).view(np.int32)
    # Arithmetic shift gives all ones for negatives, zeros for positives.
    mask = bits >> 31
    mask |= _INT32_MIN
    np.bitwise_xor(mask, bits, out=mask)
    return mask.view(np.uint32)


def key_to_float(keys: Any) -> np.ndarray:
    """Inverse of float_to_key: float32 values of uint32 keys."""
    bits = np.ascontiguousarray(keys, dtype=np.uint32).view(np.int32)
    # Top bit set means the value was positive: flip the sign bit only; else flip every bit.
    mask = ~(bits >> 31)
    mask |= _INT32_MIN
    np.bitwise_xor(mask, bits, out=mask)
    return mask.view(np.float32)


def _midpoint(upper: float, lower: float) -> float:
    """0.5 * (upper + lower) computed by torch in float32, exactly as the reference does.

    Signed zeros tie in torch.sort, so which zero the reference picks is arbitrary; +0.0 is
    returned for a zero midpoint, which compares the same way.
    """
    pair = torch.tensor([upper, lower], dtype=torch.float32)
    return float(0.5 * (pair[0] + pair[1])) + 0.0


# --------------------------------------------------------------------------- reference


def reference_thresholds(scores: Any, ks: Iterable[float]) -> dict[float, float]:
    """lambda_K for each K by a full descending torch.sort, as the Pl@ntNet-300K code does.

    Ground truth for tests and benchmarks; use calibrate_thresholds in practice.
    """
    scores_NL = torch.as_tensor(_as_float32_2d(scores))
    num_samples, num_classes = scores_NL.shape
    ks_list = _validate_ks(ks)
    ms = {k: rank_for_k(num_samples=num_samples, num_classes=num_classes, k=k) for k in ks_list}
    if torch.isnan(scores_NL).any():
        raise ValueError("scores contain NaN; lambda_K is undefined")
    sorted_V = torch.sort(scores_NL.flatten(), descending=True).values
    return {k: float(0.5 * (sorted_V[m - 1] + sorted_V[m])) + 0.0 for k, m in ms.items()}


# --------------------------------------------------------------------------- in memory


def _validate_ranks(ranks: Iterable[int], num_values: int) -> list[int]:
    ranks_R = sorted({int(r) for r in ranks})
    if not ranks_R:
        raise ValueError("ranks must hold at least one rank, got none")
    if ranks_R[0] < 1 or ranks_R[-1] > num_values:
        bad = ranks_R[0] if ranks_R[0] < 1 else ranks_R[-1]
        raise ValueError(f"every rank must be in [1, {num_values}] (the number of values), got {bad}")
    return ranks_R


def _sampled_bracket(
    flat_V: np.ndarray, rank_min: int, rank_max: int
) -> tuple[np.float32 | None, np.float32 | None]:
    """(lo, hi) such that probably #{v > hi} < rank_min and #{v >= lo} >= rank_max; None = unbounded."""
    num_values = flat_V.size
    # A fixed seed keeps runs reproducible; the result is exact whatever the sample.
    rng = np.random.default_rng(0)
    sample_desc = np.sort(flat_V[rng.integers(0, num_values, size=_SAMPLE_SIZE)])[::-1]

    def slack(rank: int) -> float:
        p = rank / num_values
        return _BRACKET_SIGMAS * math.sqrt(_SAMPLE_SIZE * p * (1.0 - p)) + 2.0

    hi_index = math.floor(rank_min / num_values * _SAMPLE_SIZE - slack(rank_min))
    lo_index = math.ceil(rank_max / num_values * _SAMPLE_SIZE + slack(rank_max))
    lo = sample_desc[lo_index] if lo_index < _SAMPLE_SIZE else None
    # An upper bound costs two extra passes; it pays only when it skips a large share of values.
    hi = sample_desc[hi_index] if hi_index > _SAMPLE_SIZE // 8 else None
    return lo, hi


def _candidates(
    flat_V: np.ndarray, lo: np.float32 | None, hi: np.float32 | None
) -> tuple[int, np.ndarray]:
    """(#{v > hi}, values in [lo, hi] plus every NaN) in a few vectorised passes, no sort."""
    if lo is None and hi is None:
        return 0, flat_V
    # Written as "not below lo and not above hi" so that NaNs are kept and detected later.
    keep_V = np.zeros(flat_V.shape, dtype=bool) if lo is None else np.less(flat_V, lo)
    num_above = 0
    if hi is not None:
        above_V = np.greater(flat_V, hi)
        num_above = int(np.count_nonzero(above_V))
        keep_V |= above_V
    np.logical_not(keep_V, out=keep_V)
    if np.count_nonzero(keep_V) <= flat_V.size // 8:
        # Gathering by index beats boolean compression when few values are kept.
        return num_above, flat_V[np.flatnonzero(keep_V)]
    return num_above, flat_V[keep_V]


def _select_descending(flat_V: np.ndarray, ranks: Iterable[int]) -> dict[int, np.float32]:
    """Exact float32 values at 1-based descending ranks of flat_V; raises on NaN."""
    ranks_R = _validate_ranks(ranks, flat_V.size)
    lo = hi = None
    if flat_V.size > _SMALL_NUM_VALUES:
        lo, hi = _sampled_bracket(flat_V, ranks_R[0], ranks_R[-1])
    while True:
        num_above, cand_C = _candidates(flat_V, lo, hi)
        if np.isnan(cand_C).any():
            raise ValueError("scores contain NaN; lambda_K is undefined")
        # Values above hi are never collected, so the bracket holds rank r iff this passes.
        if num_above >= ranks_R[0]:
            hi = None
        elif num_above + cand_C.size < ranks_R[-1]:
            lo = None
        else:
            break
    positions = [cand_C.size - (r - num_above) for r in ranks_R]
    if cand_C.size <= _SORT_MAX_VALUES:
        ordered_C = np.sort(cand_C)
    else:
        ordered_C = np.partition(cand_C, sorted(set(positions)))
    return {r: ordered_C[p] for r, p in zip(ranks_R, positions)}


def kth_largest(*, values: Any, ranks: Iterable[int]) -> dict[int, float]:
    """Exact r-th largest value (1-based, duplicates counted) of all values for each rank r.

    values: numpy array or torch tensor of any shape, converted to float32; NaN raises.
    """
    if isinstance(values, torch.Tensor):
        flat_V = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
    else:
        flat_V = np.asarray(values, dtype=np.float32).reshape(-1)
    return {r: float(v) for r, v in _select_descending(flat_V, ranks).items()}


def calibrate_thresholds(scores: Any, ks: Iterable[float]) -> dict[float, float]:
    """lambda_K for each K, equal bit for bit to reference_thresholds, without a full sort.

    scores: N x L numpy array or torch tensor (any device; copied to CPU), converted to float32.
    Returns {float(K): lambda_K}; each lambda_K is a float32 value held in a Python float.

    A random sample brackets the needed ranks, one vectorised pass counts the values above the
    bracket and collects those inside it, and only the small candidate set is sorted; a bracket
    that misses is widened, down to the whole array, so the result is always exact.
    """
    scores_NL = _as_float32_2d(scores)
    num_samples, num_classes = scores_NL.shape
    ks_list = _validate_ks(ks)
    ms = {k: rank_for_k(num_samples=num_samples, num_classes=num_classes, k=k) for k in ks_list}
    needed_ranks = {r for m in ms.values() for r in (m, m + 1)}
    values = _select_descending(scores_NL.reshape(-1), needed_ranks)
    return {k: _midpoint(values[m], values[m + 1]) for k, m in ms.items()}


# --------------------------------------------------------------------------- streamed


@dataclasses.dataclass(frozen=True)
class RankedValue:
    """The value at a 1-based descending rank, with its tie counts (ties = same float32 bits)."""

    rank: int
    value: float
    num_greater: int
    """Number of values strictly above `value` (by key; -0.0 sorts below +0.0)."""
    num_equal: int
    """Number of values with exactly the bits of `value`; num_greater < rank <= num_greater + num_equal."""


class StreamingSelector:
    """Exact values at 1-based descending ranks of a streamed N x L matrix, with summable state.

    Two passes over the same chunks. Memory is one chunk plus 65,536-bin int64 histograms;
    the partial state of every process is a flat int64 array merged by elementwise addition,
    so it can be all-reduced (DDP) or summed by a driver (Ray). Usage, on every process:

        sel = StreamingSelector(ranks_fn=lambda num_rows, num_cols: [round(2 * num_rows)])
        for chunk in my_chunks: sel.update(chunk)      # pass 1: top 16 bits of each key
        total = sum(s.state() for s in all_selectors)  # or all_reduce(SUM) of state()
        sel.load_state(total); sel.next_pass()         # same total on every process
        for chunk in my_chunks: sel.update(chunk)      # pass 2: low 16 bits, needed buckets only
        total = sum(s.state() for s in all_selectors)
        sel.load_state(total)
        sel.values_at_ranks()                          # {rank: RankedValue}

    ranks_fn(num_rows, num_cols) is called once, after pass 1, with the global N and L.
    Chunks are n_i x L (numpy or torch, any device), converted to float32; NaN raises.
    """

    def __init__(self, *, ranks_fn: Callable[[int, int], Iterable[int]]) -> None:
        self._ranks_fn = ranks_fn
        self._phase = "pass1"
        self._local_num_cols: int | None = None
        self._local_state = np.zeros(_HEADER + _NUM_BUCKETS, dtype=np.int64)
        self._num_rows = 0
        self._num_cols = 0
        self._bucket_counts_B = np.zeros(0, dtype=np.int64)
        self._ranks_R: list[int] = []
        self._rank_bucket: dict[int, int] = {}
        self._above_bucket: dict[int, int] = {}
        self._buckets: list[int] = []
        self._bucket_slot = np.zeros(0, dtype=np.int64)
        self._in_needed_bucket = np.zeros(0, dtype=bool)
        self._results: dict[int, RankedValue] = {}

    # ---- properties

    @property
    def num_rows(self) -> int:
        """Global N, known after the pass-1 load_state."""
        self._require({"pass1_loaded", "pass2", "done"}, "num_rows")
        return self._num_rows

    @property
    def num_cols(self) -> int:
        """Global L, known after the pass-1 load_state."""
        self._require({"pass1_loaded", "pass2", "done"}, "num_cols")
        return self._num_cols

    # ---- protocol

    def _require(self, phases: set[str], action: str) -> None:
        if self._phase not in phases:
            order = "update* -> load_state -> next_pass -> update* -> load_state -> results"
            raise RuntimeError(f"{action} is not allowed in phase {self._phase!r}; the order is {order}")

    def update(self, chunk: Any) -> None:
        """Adds an n_i x L chunk to the local state of the current pass."""
        self._require({"pass1", "pass2"}, "update")
        chunk_NL = _as_float32_2d(chunk, name="chunk")
        num_rows, num_cols = chunk_NL.shape
        if self._local_num_cols is None:
            if num_cols < 1:
                raise ValueError(f"chunk must have at least one column, got shape {chunk_NL.shape}")
            self._local_num_cols = num_cols
        elif num_cols != self._local_num_cols:
            raise ValueError(
                f"every chunk must have L={self._local_num_cols} columns, got a chunk of shape {chunk_NL.shape}"
            )
        if num_rows == 0:
            return
        if np.isnan(chunk_NL.max()):
            raise ValueError("chunk contains NaN; ranks are undefined")
        flat_V = chunk_NL.reshape(-1)
        self._local_state[0] += num_rows
        self._local_state[1] += flat_V.size
        hist = self._local_state[_HEADER:]
        for start in range(0, flat_V.size, _BLOCK_VALUES):
            keys_V = float_to_key(flat_V[start : start + _BLOCK_VALUES])
            if self._phase == "pass1":
                hist += np.bincount(keys_V >> _HIGH_BITS, minlength=_NUM_BUCKETS)
            else:
                keys_V = keys_V[self._in_needed_bucket[keys_V >> _HIGH_BITS]]
                bins_V = self._bucket_slot[keys_V >> _HIGH_BITS] * _NUM_BUCKETS + (keys_V & _LOW_MASK)
                hist += np.bincount(bins_V, minlength=hist.size)

    def state(self) -> np.ndarray:
        """Local state of the latest pass: flat int64 [num_rows, num_values, histograms...]."""
        return self._local_state.copy()

    def _load_totals(self, total: Any) -> np.ndarray:
        total = np.asarray(total)
        expected = self._local_state.shape
        if total.shape != expected or not np.issubdtype(total.dtype, np.integer):
            raise ValueError(
                f"load_state needs an integer array of shape {expected} (summed state() of this pass), "
                f"got {total.dtype} array of shape {total.shape}"
            )
        return total.astype(np.int64)

    def load_state(self, total: Any) -> None:
        """Loads the sum of every process's state() for the current pass (the same on all)."""
        self._require({"pass1", "pass2"}, "load_state")
        total = self._load_totals(total)
        if self._phase == "pass1":
            self._load_pass1(total)
        else:
            self._load_pass2(total)

    def _load_pass1(self, total: np.ndarray) -> None:
        num_rows, num_values = int(total[0]), int(total[1])
        hist_B = total[_HEADER:]
        if num_rows < 1:
            raise ValueError(f"no rows were seen in pass 1 across all processes (num_rows={num_rows})")
        if num_values % num_rows or int(hist_B.sum()) != num_values:
            raise ValueError(
                f"inconsistent pass-1 totals: {num_values} values over {num_rows} rows, "
                f"histogram holds {int(hist_B.sum())}"
            )
        num_cols = num_values // num_rows
        if self._local_num_cols is not None and self._local_num_cols != num_cols:
            raise ValueError(
                f"this process saw L={self._local_num_cols} columns but the totals imply L={num_cols}: "
                "all processes must stream chunks with the same L"
            )
        ranks_R = _validate_ranks(self._ranks_fn(num_rows, num_cols), num_values)
        # Descending cumulative counts: cum_desc[i] = number of keys in the top i+1 buckets.
        hist_desc = hist_B[::-1]
        cum_desc = np.cumsum(hist_desc)
        idx_R = np.searchsorted(cum_desc, ranks_R, side="left")
        self._rank_bucket = {r: _NUM_BUCKETS - 1 - int(i) for r, i in zip(ranks_R, idx_R)}
        self._above_bucket = {
            _NUM_BUCKETS - 1 - int(i): int(cum_desc[i] - hist_desc[i]) for i in idx_R
        }
        self._buckets = sorted(self._above_bucket)
        self._bucket_counts_B = hist_B[self._buckets].copy()
        self._num_rows, self._num_cols, self._ranks_R = num_rows, num_cols, ranks_R
        self._phase = "pass1_loaded"

    def next_pass(self) -> None:
        """Starts pass 2; only the buckets holding the requested ranks are histogrammed."""
        self._require({"pass1_loaded"}, "next_pass")
        self._bucket_slot = np.full(_NUM_BUCKETS, -1, dtype=np.int64)
        self._bucket_slot[self._buckets] = np.arange(len(self._buckets))
        self._in_needed_bucket = self._bucket_slot >= 0
        self._local_state = np.zeros(_HEADER + len(self._buckets) * _NUM_BUCKETS, dtype=np.int64)
        self._phase = "pass2"

    def _load_pass2(self, total: np.ndarray) -> None:
        num_rows, num_values = int(total[0]), int(total[1])
        low_hists = total[_HEADER:].reshape(len(self._buckets), _NUM_BUCKETS)
        if num_rows != self._num_rows or num_values != self._num_rows * self._num_cols:
            raise ValueError(
                f"pass 2 saw {num_rows} rows / {num_values} values, pass 1 saw {self._num_rows} rows / "
                f"{self._num_rows * self._num_cols} values: both passes must stream the same chunks"
            )
        if not np.array_equal(low_hists.sum(axis=1), self._bucket_counts_B):
            raise ValueError("pass 2 values differ from pass 1: both passes must stream the same chunks")
        results = {}
        for rank in self._ranks_R:
            bucket = self._rank_bucket[rank]
            num_above_bucket = self._above_bucket[bucket]
            low_desc = low_hists[self._buckets.index(bucket)][::-1]
            cum_desc = np.cumsum(low_desc)
            i = int(np.searchsorted(cum_desc, rank - num_above_bucket, side="left"))
            key = (bucket << _HIGH_BITS) | (_NUM_BUCKETS - 1 - i)
            results[rank] = RankedValue(
                rank=rank,
                value=float(key_to_float(np.array([key], dtype=np.uint32))[0]),
                num_greater=num_above_bucket + int(cum_desc[i] - low_desc[i]),
                num_equal=int(low_desc[i]),
            )
        self._results = results
        self._phase = "done"

    def values_at_ranks(self) -> dict[int, RankedValue]:
        """{rank: RankedValue} for every rank returned by ranks_fn, after the pass-2 load_state."""
        self._require({"done"}, "values_at_ranks")
        return dict(self._results)


class StreamingThresholds(StreamingSelector):
    """lambda_K for each K over streamed chunks, equal bit for bit to reference_thresholds.

    Two passes over the same chunks; every process runs, with the same summed totals:

        cal = StreamingThresholds(ks=[1, 2, 5])
        for chunk in my_chunks: cal.update(chunk)            # pass 1 (chunk: n_i x L numpy or torch)
        total = sum(c.state() for c in all_calibrators)      # 1-D int64; DDP: all_reduce(SUM); Ray: driver sums
        cal.load_state(total); cal.next_pass()
        for chunk in my_chunks: cal.update(chunk)            # pass 2
        total = sum(c.state() for c in all_calibrators)
        cal.load_state(total)
        cal.thresholds()                                     # {float(K): lambda_K}

    Memory: one chunk plus 65,536-bin histograms (one for pass 1, one per needed bucket in pass 2).
    """

    def __init__(self, *, ks: Iterable[float]) -> None:
        self._ks = _validate_ks(ks)
        self._ms: dict[float, int] = {}
        super().__init__(ranks_fn=self._ranks_for_ks)

    def _ranks_for_ks(self, num_rows: int, num_cols: int) -> list[int]:
        self._ms = {k: rank_for_k(num_samples=num_rows, num_classes=num_cols, k=k) for k in self._ks}
        return [r for m in self._ms.values() for r in (m, m + 1)]

    def thresholds(self) -> dict[float, float]:
        """{float(K): lambda_K}, after the pass-2 load_state."""
        self._require({"done"}, "thresholds")
        values = self.values_at_ranks()
        return {k: _midpoint(values[m].value, values[m + 1].value) for k, m in self._ms.items()}


def calibrate_thresholds_streamed(
    chunks_factory: Callable[[], Iterable[Any]], ks: Iterable[float]
) -> dict[float, float]:
    """lambda_K for each K in one process from chunks_factory(), called once per pass (twice).

    Each call must yield the same n_i x L chunks in any order; memory is one chunk plus histograms.
    """
    calibrator = StreamingThresholds(ks=ks)
    for chunk in chunks_factory():
        calibrator.update(chunk)
    calibrator.load_state(calibrator.state())
    calibrator.next_pass()
    for chunk in chunks_factory():
        calibrator.update(chunk)
    calibrator.load_state(calibrator.state())
    return calibrator.thresholds()
