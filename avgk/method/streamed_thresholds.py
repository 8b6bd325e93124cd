"""Exact values at given ranks, and lambda_K, over a streamed N x L matrix: two passes with summable state."""

# Shape legend: N samples, L classes, V values (a flattened N x L block), B bins/buckets, R ranks.
#
# Scores are float32 and ranks 1-based from the largest value down, as in avgk.method.thresholds, whose
# float32 keys, rank rule and midpoint the selection uses; results equal reference_thresholds bit for bit.

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from avgk.method.thresholds import (
    as_float32_2d,
    float32_midpoint,
    float_to_key,
    key_to_float,
    rank_for_k,
    validate_ks,
    validate_ranks,
)

__all__ = [
    "RankedValue",
    "StreamingSelector",
    "StreamingThresholds",
    "calibrate_thresholds_streamed",
]

_HIGH_BITS = 16
_NUM_BUCKETS = 1 << _HIGH_BITS
_LOW_MASK = np.uint32(_NUM_BUCKETS - 1)
# Streamed chunks are processed in blocks of this many values to bound temporary memory.
_BLOCK_VALUES = 1 << 20
# Number of leading int64 entries of a streaming state before the histograms: rows, values.
_HEADER = 2


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
        self._local_state: npt.NDArray[np.int64] = np.zeros(_HEADER + _NUM_BUCKETS, dtype=np.int64)
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
        chunk_NL = as_float32_2d(chunk, name="chunk")
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
        state: npt.NDArray[np.int64] = self._local_state.copy()
        return state

    def _load_totals(self, total: Any) -> np.ndarray:
        total = np.asarray(total)
        expected = self._local_state.shape
        if total.shape != expected or not np.issubdtype(total.dtype, np.integer):
            raise ValueError(
                f"load_state needs an integer array of shape {expected} (summed state() of this pass), "
                f"got {total.dtype} array of shape {total.shape}"
            )
        total_int64: npt.NDArray[np.int64] = total.astype(np.int64)
        return total_int64

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
        ranks_R = validate_ranks(self._ranks_fn(num_rows, num_cols), num_values)
        # Descending cumulative counts: cum_desc[i] = number of keys in the top i+1 buckets.
        hist_desc = hist_B[::-1]
        cum_desc = np.cumsum(hist_desc)
        idx_R = np.searchsorted(cum_desc, ranks_R, side="left")
        self._rank_bucket = {r: _NUM_BUCKETS - 1 - int(i) for r, i in zip(ranks_R, idx_R, strict=True)}
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
        self._ks = validate_ks(ks)
        self._ms: dict[float, int] = {}
        super().__init__(ranks_fn=self._ranks_for_ks)

    def _ranks_for_ks(self, num_rows: int, num_cols: int) -> list[int]:
        self._ms = {k: rank_for_k(num_samples=num_rows, num_classes=num_cols, k=k) for k in self._ks}
        return [r for m in self._ms.values() for r in (m, m + 1)]

    def thresholds(self) -> dict[float, float]:
        """{float(K): lambda_K}, after the pass-2 load_state."""
        self._require({"done"}, "thresholds")
        values = self.values_at_ranks()
        return {k: float32_midpoint(values[m].value, values[m + 1].value) for k, m in self._ms.items()}


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
