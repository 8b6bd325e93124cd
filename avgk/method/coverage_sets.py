"""Label sets with a coverage guarantee (split conformal prediction), calibrated on a held-out split.

Where average-K fixes the mean size of the sets, these rules fix how often they hold the true label:
with n calibration samples exchangeable with the test data, the set of a new sample holds its true
label with probability at least 1 - alpha (marginal coverage; per class for `class_thresholds`).

- **coverage** (LAC, "least ambiguous classifier"): {l : p_l >= t}, one global threshold t on a head's
  scores, the m-th largest true-label score of the calibration samples, m = ceil((n + 1)(1 - alpha)).
  With continuous scores the coverage given the calibration set follows Beta(m, n + 1 - m).
- **aps** and **raps** (adaptive prediction sets): a sample's labels in decreasing score, kept while
  the mass up to and including each (plus a RAPS penalty lambda per rank beyond k_reg) is at most q,
  the m-th smallest conformity score of the calibration samples; deterministic (not randomised), so a
  set may be empty when the top score alone exceeds q.
- **class_coverage** (Mondrian): a LAC threshold per class from that class's calibration samples;
  classes with fewer than `min_count`, or too few for the target's quantile (`min_samples`), are
  pooled into one group that shares a threshold.

When m > n the quantile is beyond the data: the sets are the whole label set (`FULL`), and the
caller reports it. Scores are read as float32, as every threshold of avgk is (avgk.method.thresholds).

Shape legend: N samples, L classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

FULL = -math.inf
"""The threshold of a set that holds every label (m > n: too few calibration samples for 1 - alpha)."""

__all__ = ["FULL", "ClassThresholds", "alpha_of", "aps_conformity", "aps_sets", "class_thresholds", "conformal_rank",
           "conformity_quantile", "lac_threshold", "min_samples", "raps_conformity", "true_mass_and_rank", "validate_alpha"]


def validate_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or not 0.0 < alpha < 1.0:
        raise ValueError(f"a coverage target must lie strictly between 0 and 1 (alpha = 1 - coverage), got alpha={alpha}")
    return alpha


def alpha_of(coverage: float) -> float:
    """alpha = 1 - coverage as decimals subtract (1 - 0.9 is 0.1, not the float 0.09999999999999998, which would
    move ceil((n + 1)(1 - alpha)) up by one whenever (n + 1) * 0.9 is a whole number)."""
    return float(1 - Fraction(repr(float(coverage))))


def conformal_rank(*, n: int, alpha: float) -> int:
    """m = ceil((n + 1)(1 - alpha)), with alpha read as the decimal it prints as (so 0.9 * 10 is 9, not 9.000001)."""
    validate_alpha(alpha)
    if n < 0:
        raise ValueError(f"n must be >= 0 calibration samples, got {n}")
    return math.ceil((n + 1) * (1 - Fraction(repr(float(alpha)))))


def min_samples(*, alpha: float) -> int:
    """The fewest calibration samples whose quantile is not beyond the data (m <= n): ceil((1 - alpha) / alpha),
    19 at coverage 0.95, 99 at 0.99; with fewer, the sets are the whole label set."""
    a = Fraction(repr(float(validate_alpha(alpha))))
    return math.ceil((1 - a) / a)


def lac_threshold(*, true_scores_N: npt.ArrayLike, alpha: float) -> float:
    """The score threshold t of LAC sets {l : p_l >= t}: the m-th largest true-label score (FULL when m > n)."""
    scores = np.asarray(true_scores_N, dtype=np.float32).ravel()
    m = conformal_rank(n=scores.size, alpha=alpha)
    if m > scores.size:
        return FULL
    return float(np.partition(scores, scores.size - m)[scores.size - m])


def conformity_quantile(*, conformity_N: npt.ArrayLike, alpha: float) -> float:
    """q: the m-th smallest conformity score (inf when m > n: every set is the full label set)."""
    scores = np.asarray(conformity_N, dtype=np.float64).ravel()
    m = conformal_rank(n=scores.size, alpha=alpha)
    if m > scores.size:
        return math.inf
    return float(np.partition(scores, m - 1)[m - 1])


def _sorted_rows(probs_NL: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Each row's scores in decreasing order (float32, ties by label id) and the label at each position."""
    probs = np.asarray(probs_NL, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"scores must be N x L, got shape {probs.shape}")
    order = np.argsort(-probs, axis=1, kind="stable")
    return np.take_along_axis(probs, order, axis=1), order


def _penalties(num_labels: int, *, penalty: float, k_reg: int) -> np.ndarray:
    """RAPS: lambda for every rank beyond k_reg, cumulated (rank 1 is the top label)."""
    if penalty < 0 or k_reg < 0:
        raise ValueError(f"the RAPS penalty and k_reg must be >= 0, got penalty={penalty} k_reg={k_reg}")
    ranks = np.arange(1, num_labels + 1)
    return penalty * np.maximum(ranks - k_reg, 0).astype(np.float64)


def true_mass_and_rank(*, probs_NL: npt.ArrayLike, labels_N: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the mass of the labels ranked before the true label plus its own (float64 cumulative sum over
    the row's float32 scores in decreasing order, ties by label id) and the true label's 1-based rank."""
    sorted_NL, order = _sorted_rows(probs_NL)
    labels = np.asarray(labels_N, dtype=np.int64).ravel()
    if labels.shape[0] != sorted_NL.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {sorted_NL.shape[0]} score rows")
    cumulative = np.cumsum(sorted_NL.astype(np.float64), axis=1)
    position = np.argmax(order == labels[:, None], axis=1)  # 0-based rank of the true label
    mass: np.ndarray = cumulative[np.arange(labels.shape[0]), position]
    return mass, position + 1


def raps_conformity(*, mass_N: npt.ArrayLike, rank_N: npt.ArrayLike, penalty: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """APS (penalty 0) or RAPS conformity scores from true_mass_and_rank: the mass plus lambda per rank of the
    true label beyond k_reg (the same float64 operations as aps_sets' scores, so q compares exactly)."""
    if penalty < 0 or k_reg < 0:
        raise ValueError(f"the RAPS penalty and k_reg must be >= 0, got penalty={penalty} k_reg={k_reg}")
    rank = np.asarray(rank_N, dtype=np.int64)
    conformity: np.ndarray = np.asarray(mass_N, dtype=np.float64) + penalty * np.maximum(rank - k_reg, 0).astype(np.float64)
    return conformity


def aps_conformity(*, probs_NL: npt.ArrayLike, labels_N: npt.ArrayLike, penalty: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """APS (penalty 0) or RAPS conformity scores: the mass of the labels ranked before the true label plus its
    own (in float64, over float32 scores), plus lambda per rank of the true label beyond k_reg."""
    mass, rank = true_mass_and_rank(probs_NL=probs_NL, labels_N=labels_N)
    return raps_conformity(mass_N=mass, rank_N=rank, penalty=penalty, k_reg=k_reg)


def aps_sets(*, probs_NL: npt.ArrayLike, q: float, penalty: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """N x L membership: label l is in a sample's set when its conformity score (as the true label) is <= q."""
    sorted_NL, order = _sorted_rows(probs_NL)
    scores = np.cumsum(sorted_NL.astype(np.float64), axis=1) + _penalties(sorted_NL.shape[1], penalty=penalty,
                                                                             k_reg=k_reg)
    keep_sorted = scores <= q
    members: np.ndarray = np.zeros_like(keep_sorted)
    np.put_along_axis(members, order, keep_sorted, axis=1)
    return members


@dataclass(frozen=True)
class ClassThresholds:
    """Per-class LAC thresholds, and which classes were pooled for having few calibration samples."""

    thresholds_L: np.ndarray
    """float64 per class: label l is in a set when its score >= thresholds_L[l] (FULL: always)."""
    pooled: tuple[int, ...]
    """Classes with fewer than min_count calibration samples: they share one threshold, from their samples together."""
    counts_L: np.ndarray


def class_thresholds(*, true_scores_N: npt.ArrayLike, labels_N: npt.ArrayLike, num_classes: int, alpha: float,
                     min_count: int) -> ClassThresholds:
    """Mondrian (class-conditional) LAC: class c's threshold from its own calibration samples, so that c's true
    label is covered with probability >= 1 - alpha for every c. Classes with fewer than max(min_count,
    min_samples(alpha)) samples are pooled: one threshold from all their samples (a guarantee for the pool, not
    each class). Without the second bound a class of 10 samples would hold its label in every set at coverage
    0.95. A pool too small itself gives its classes the full set (FULL)."""
    scores = np.asarray(true_scores_N, dtype=np.float32).ravel()
    labels = np.asarray(labels_N, dtype=np.int64).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} true-label scores for {labels.size} labels")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1 calibration sample per class, got {min_count}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    thresholds = np.full(num_classes, FULL)
    enough = max(min_count, min_samples(alpha=alpha))
    pooled = tuple(int(c) for c in np.flatnonzero(counts < enough))
    for c in np.flatnonzero(counts >= enough):
        thresholds[c] = lac_threshold(true_scores_N=scores[labels == c], alpha=alpha)
    if pooled:
        in_pool = np.isin(labels, pooled)
        thresholds[list(pooled)] = lac_threshold(true_scores_N=scores[in_pool], alpha=alpha) if in_pool.any() else FULL
    return ClassThresholds(thresholds_L=thresholds, pooled=pooled, counts_L=counts)
