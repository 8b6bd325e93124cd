"""Exact average-K thresholds lambda_K in memory, with the float32 keys and ranks they rest on."""

# Shape legend: N samples, L classes, V values (a flattened N x L block), R ranks.
#
# Every score is converted to float32 before anything else, as the Pl@ntNet-300K reference
# sorts float32 probabilities; a float32 threshold then gives `scores >= threshold` sets identical
# to the reference. Ranks are 1-based and count from the largest value down.

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_float32_2d",
    "calibrate_thresholds",
    "float32_midpoint",
    "float_to_key",
    "key_to_float",
    "kth_largest",
    "rank_for_k",
    "reference_thresholds",
    "round_count",
    "validate_ks",
    "validate_ranks",
]

_INT32_MIN = np.int32(-(2**31))
# Below this many values a full partition is as fast as the sampled bracket.
_SMALL_NUM_VALUES = 1 << 18
_SAMPLE_SIZE = 1 << 16
# Binomial standard deviations of slack around the sampled bracket; a miss only costs a retry.
_BRACKET_SIGMAS = 4.0
# np.sort (vectorised) beats np.partition on candidate sets up to a few million values.
_SORT_MAX_VALUES = 1 << 22


# --------------------------------------------------------------------------- validation


def validate_ks(ks: Iterable[float]) -> list[float]:
    """The Ks as a list of floats; ValueError unless a non-empty sequence of finite numbers > 0."""
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


def as_float32_2d(scores: Any, *, name: str = "scores") -> np.ndarray:
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


def float32_midpoint(upper: float | np.float32, lower: float | np.float32) -> float:
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
    scores_NL = torch.as_tensor(as_float32_2d(scores))
    num_samples, num_classes = scores_NL.shape
    ks_list = validate_ks(ks)
    ms = {k: rank_for_k(num_samples=num_samples, num_classes=num_classes, k=k) for k in ks_list}
    if torch.isnan(scores_NL).any():
        raise ValueError("scores contain NaN; lambda_K is undefined")
    sorted_V = torch.sort(scores_NL.flatten(), descending=True).values
    return {k: float(0.5 * (sorted_V[m - 1] + sorted_V[m])) + 0.0 for k, m in ms.items()}


# --------------------------------------------------------------------------- in memory


def validate_ranks(ranks: Iterable[int], num_values: int) -> list[int]:
    """The distinct 1-based ranks, ascending; ValueError if there are none or one is outside [1, num_values]."""
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
    ranks_R = validate_ranks(ranks, flat_V.size)
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
    # a full sort up to _SORT_MAX_VALUES, a multi-kth partition above
    ordered_C = np.sort(cand_C) if cand_C.size <= _SORT_MAX_VALUES else np.partition(cand_C, sorted(set(positions)))
    return {r: ordered_C[p] for r, p in zip(ranks_R, positions, strict=True)}


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
    scores_NL = as_float32_2d(scores)
    num_samples, num_classes = scores_NL.shape
    ks_list = validate_ks(ks)
    ms = {k: rank_for_k(num_samples=num_samples, num_classes=num_classes, k=k) for k in ks_list}
    needed_ranks = {r for m in ms.values() for r in (m, m + 1)}
    values = _select_descending(scores_NL.reshape(-1), needed_ranks)
    return {k: float32_midpoint(values[m], values[m + 1]) for k, m in ms.items()}
