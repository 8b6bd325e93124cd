"""Average-K and top-K set metrics as count accumulators that merge by addition and divide once."""

# Shape legend: N samples, L classes, S possible set sizes (L + 1: sizes 0..L).
#
# Scores are compared in float32, like the Pl@ntNet-300K reference (a float32 tensor against a
# Python float threshold): thresholds are rounded to float32 once.

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from avgk.method.thresholds import as_float32_2d, validate_ks

__all__ = ["SetMetrics", "average_k_accuracy", "format_k"]


def format_k(k: float) -> str:
    """Key of K in metrics.json: "1" for 1 or 1.0, "1.5" for 1.5."""
    k = float(k)
    return str(int(k)) if k.is_integer() else repr(k)


def _as_labels(labels: Any, *, num_samples: int, num_classes: int) -> np.ndarray:
    labels_N = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels_N.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},) to match the scores, got {labels_N.shape}")
    if num_samples and not np.issubdtype(labels_N.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels_N.dtype}")
    labels_N = labels_N.astype(np.int64, copy=False)
    if num_samples:
        bad = labels_N[(labels_N < 0) | (labels_N >= num_classes)]
        if bad.size:
            raise ValueError(f"labels must be in [0, {num_classes}), got {int(bad[0])}")
    return labels_N


def _true_scores(scores_NL: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
    true_N: np.ndarray = scores_NL[np.arange(labels_N.size), labels_N]
    return true_N


def average_k_accuracy(*, scores: Any, labels: Any, threshold: float) -> float:
    """Fraction of samples whose true-label score is >= threshold (the Pl@ntNet-300K formula).

    scores: N x L numpy array or torch tensor; labels: N integer class ids in [0, L).
    """
    scores_NL = as_float32_2d(scores)
    num_samples, num_classes = scores_NL.shape
    if num_samples == 0:
        raise ValueError("average_k_accuracy needs at least one sample, got N=0")
    labels_N = _as_labels(labels, num_samples=num_samples, num_classes=num_classes)
    in_set_N = _true_scores(scores_NL, labels_N) >= np.float32(threshold)
    return int(np.count_nonzero(in_set_N)) / int(num_samples)


def _ratio(numerator: int, denominator: int) -> float:
    assert denominator > 0
    return int(numerator) / int(denominator)


def _macro(correct_L: np.ndarray, num_samples_L: np.ndarray, present_L: np.ndarray) -> float:
    """Mean of per-class accuracies over the present classes."""
    return float(np.mean(correct_L[present_L] / num_samples_L[present_L]))


class SetMetrics:
    """Average-K and top-K metrics of thresholded sets, accumulated as int64 counts.

    Per sample and K: in-set means score[label] >= lambda_K; the set size is
    #{j: score[j] >= lambda_K}; top-K correct means #{j: score[j] > score[label]} < K (ties
    count for the label; only for integer K, other K have no top-K entries).

    Counts merge across batches (update), partitions (merge) and ranks (sum every state() and
    load_state the total), and compute() / per_class() divide once at the end.

    Oracle (synthetic data, where the true posterior is known): run this same class on the true
    posteriors of the test split with thresholds calibrated on the true posteriors of the
    validation split; its avg_k_accuracy is the Bayes ceiling each model is compared to.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        ks: Iterable[float],
        thresholds: Mapping[float, float],
        train_class_counts: np.ndarray | None = None,
        freq_bins: tuple[int, int] = (20, 100),
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ks = validate_ks(ks)
        missing = [k for k in self.ks if k not in thresholds]
        if missing:
            raise ValueError(f"thresholds has no entry for K={missing}; it has K={sorted(thresholds)}")
        self.thresholds = {k: float(np.float32(thresholds[k])) for k in self.ks}
        self._integer_ks = [k for k in self.ks if k.is_integer()]
        if len(freq_bins) != 2 or not 0 < freq_bins[0] < freq_bins[1]:
            raise ValueError(f"freq_bins must be two increasing positive counts (few < a, many > b), got {freq_bins}")
        self.freq_bins = (int(freq_bins[0]), int(freq_bins[1]))
        self.train_class_counts_L: np.ndarray | None = None
        if train_class_counts is not None:
            counts_L = np.asarray(train_class_counts)
            if counts_L.shape != (self.num_classes,):
                raise ValueError(
                    f"train_class_counts must have shape ({self.num_classes},), got {counts_L.shape}"
                )
            if not np.issubdtype(counts_L.dtype, np.integer) or (counts_L < 0).any():
                raise ValueError("train_class_counts must be non-negative integers")
            self.train_class_counts_L = counts_L.astype(np.int64)
        self._state = self._empty_state()

    # ---- state

    def _empty_state(self) -> dict[str, np.ndarray]:
        L = self.num_classes
        state = {"num_samples_L": np.zeros(L, dtype=np.int64)}
        for k in self.ks:
            state[f"num_in_set_L@{format_k(k)}"] = np.zeros(L, dtype=np.int64)
            state[f"num_sets_by_size_S@{format_k(k)}"] = np.zeros(L + 1, dtype=np.int64)
        for k in self._integer_ks:
            state[f"num_top_k_correct_L@{format_k(k)}"] = np.zeros(L, dtype=np.int64)
        return state

    def update(self, *, scores_NL: Any, labels_N: Any) -> None:
        """Adds a batch: N x L scores (numpy or torch, any device) and N labels in [0, L)."""
        scores = as_float32_2d(scores_NL, name="scores_NL")
        num_samples, num_classes = scores.shape
        if num_classes != self.num_classes:
            raise ValueError(f"scores_NL must have L={self.num_classes} columns, got shape {scores.shape}")
        labels = _as_labels(labels_N, num_samples=num_samples, num_classes=num_classes)
        if num_samples == 0:
            return
        true_N = _true_scores(scores, labels)
        num_greater_N = np.count_nonzero(scores > true_N[:, None], axis=1) if self._integer_ks else None
        self._add(labels_N=labels, true_N=true_N, scores_NT=scores, num_greater_N=num_greater_N)

    def update_top(self, *, top_NT: Any, true_N: Any, num_above_true_N: Any, labels_N: Any) -> None:
        """Adds a batch in top-T form (avgk.evaluation.top_scores.top_rows): each row's T largest scores, its true
        label's score, the number of its scores above that, and its label.

        The counts equal update()'s on the full rows for every K whose threshold is above every
        row's largest score not kept: the caller checks that (avgk.evaluation.top_scores.unproven_rows).
        """
        top_NT = as_float32_2d(top_NT, name="top_NT")
        num_samples = top_NT.shape[0]
        labels = _as_labels(labels_N, num_samples=num_samples, num_classes=self.num_classes)
        true_N = np.asarray(true_N, dtype=np.float32)
        num_above_N = np.asarray(num_above_true_N)
        if true_N.shape != (num_samples,) or num_above_N.shape != (num_samples,):
            raise ValueError(
                f"true_N and num_above_true_N must have shape ({num_samples},), got {true_N.shape} and {num_above_N.shape}"
            )
        if num_samples == 0:
            return
        self._add(labels_N=labels, true_N=true_N, scores_NT=top_NT, num_greater_N=num_above_N)

    def _add(self, *, labels_N: np.ndarray, true_N: np.ndarray, scores_NT: np.ndarray,
             num_greater_N: np.ndarray | None) -> None:
        """Counts of a batch: set sizes from `scores_NT` (full rows, or top-T rows holding every score >= lambda)."""
        L = self.num_classes
        labels = labels_N
        self._state["num_samples_L"] += np.bincount(labels, minlength=L)
        for k in self.ks:
            threshold = np.float32(self.thresholds[k])
            in_set_N = true_N >= threshold
            size_N = np.count_nonzero(scores_NT >= threshold, axis=1)
            self._state[f"num_in_set_L@{format_k(k)}"] += np.bincount(labels[in_set_N], minlength=L)
            self._state[f"num_sets_by_size_S@{format_k(k)}"] += np.bincount(size_N, minlength=L + 1)
        if self._integer_ks:
            assert num_greater_N is not None  # counted whenever there are integer Ks
            for k in self._integer_ks:
                correct_N = num_greater_N < k
                self._state[f"num_top_k_correct_L@{format_k(k)}"] += np.bincount(
                    labels[correct_N], minlength=L
                )

    def state(self) -> dict[str, np.ndarray]:
        """Copy of the int64 counts; sum these across ranks, then load_state the total."""
        return {name: counts.copy() for name, counts in self._state.items()}

    def load_state(self, summed_state: Mapping[str, Any]) -> None:
        """Replaces the counts with a (summed) state of a SetMetrics with the same configuration."""
        expected = self._empty_state()
        if set(summed_state) != set(expected):
            raise ValueError(
                f"state keys differ: missing {sorted(set(expected) - set(summed_state))}, "
                f"unexpected {sorted(set(summed_state) - set(expected))}"
            )
        loaded = {}
        for name, zeros in expected.items():
            counts = np.asarray(summed_state[name])
            if counts.shape != zeros.shape or not np.issubdtype(counts.dtype, np.integer):
                raise ValueError(
                    f"state[{name!r}] must be an integer array of shape {zeros.shape}, "
                    f"got {counts.dtype} of shape {counts.shape}"
                )
            loaded[name] = counts.astype(np.int64)
        self._state = loaded

    def merge(self, other: SetMetrics) -> None:
        """Adds the counts of another SetMetrics built with the same configuration."""
        same = (
            other.num_classes == self.num_classes
            and other.ks == self.ks
            and np.array_equal(list(other.thresholds.values()), list(self.thresholds.values()), equal_nan=True)
            and other.freq_bins == self.freq_bins
        )
        if not same:
            raise ValueError(
                "merge needs the same num_classes, ks, thresholds and freq_bins, got "
                f"L={other.num_classes} ks={other.ks} thresholds={other.thresholds} vs "
                f"L={self.num_classes} ks={self.ks} thresholds={self.thresholds}"
            )
        for name, counts in other._state.items():
            self._state[name] += counts

    # ---- results

    def _accuracies(self, class_mask_L: np.ndarray) -> dict[str, Any]:
        """Micro and macro accuracies restricted to the classes in class_mask_L."""
        num_samples_L = self._state["num_samples_L"]
        num_samples = int(num_samples_L[class_mask_L].sum())
        present_L = class_mask_L & (num_samples_L > 0)
        result: dict[str, Any] = {"num_classes": int(present_L.sum()), "num_samples": num_samples}
        for metric, prefix, ks in (
            ("avg_k_accuracy", "num_in_set_L", self.ks),
            ("top_k_accuracy", "num_top_k_correct_L", self._integer_ks),
        ):
            micro, macro = {}, {}
            if num_samples:
                for k in ks:
                    correct_L = self._state[f"{prefix}@{format_k(k)}"]
                    micro[format_k(k)] = _ratio(correct_L[class_mask_L].sum(), num_samples)
                    macro[format_k(k)] = _macro(correct_L, num_samples_L, present_L)
            result[metric] = micro
            result[f"macro_{metric}"] = macro
        return result

    def compute(self) -> dict[str, Any]:
        """Every metric of docs/METHOD.md section 2 as JSON-ready numbers keyed by format_k(K)."""
        num_samples = int(self._state["num_samples_L"].sum())
        if num_samples == 0:
            raise ValueError("compute() needs at least one sample, got num_samples=0")
        all_L = np.ones(self.num_classes, dtype=bool)
        overall = self._accuracies(all_L)
        sizes_S = np.arange(self.num_classes + 1)
        result: dict[str, Any] = {
            "num_samples": num_samples,
            "avg_k_accuracy": overall["avg_k_accuracy"],
            "macro_avg_k_accuracy": overall["macro_avg_k_accuracy"],
            "avg_set_size": {},
            "top_k_accuracy": overall["top_k_accuracy"],
            "macro_top_k_accuracy": overall["macro_top_k_accuracy"],
            "empty_set_fraction": {},
            "set_size_histogram": {},
        }
        for k in self.ks:
            key = format_k(k)
            sets_S = self._state[f"num_sets_by_size_S@{key}"]
            result["avg_set_size"][key] = _ratio((sizes_S * sets_S).sum(), num_samples)
            result["empty_set_fraction"][key] = _ratio(sets_S[0], num_samples)
            result["set_size_histogram"][key] = {
                str(size): int(sets_S[size]) for size in np.flatnonzero(sets_S)
            }
        if self.train_class_counts_L is not None:
            few, many = self.freq_bins
            counts_L = self.train_class_counts_L
            result["by_frequency"] = {
                "few": self._accuracies(counts_L < few),
                "medium": self._accuracies((counts_L >= few) & (counts_L <= many)),
                "many": self._accuracies(counts_L > many),
            }
        return result

    def per_class(self) -> dict[str, np.ndarray]:
        """Per-class columns (for per_class.parquet); accuracies are NaN for absent classes."""
        num_samples_L = self._state["num_samples_L"]
        columns: dict[str, np.ndarray] = {
            "class_id": np.arange(self.num_classes, dtype=np.int64),
            "num_samples": num_samples_L.copy(),
        }
        if self.train_class_counts_L is not None:
            columns["train_count"] = self.train_class_counts_L.copy()
        present_L = num_samples_L > 0
        for metric, prefix, ks in (
            ("avg_k_accuracy", "num_in_set_L", self.ks),
            ("top_k_accuracy", "num_top_k_correct_L", self._integer_ks),
        ):
            for k in ks:
                correct_L = self._state[f"{prefix}@{format_k(k)}"]
                accuracy_L = np.full(self.num_classes, math.nan)
                np.divide(correct_L, num_samples_L, out=accuracy_L, where=present_L)
                columns[f"{metric}@{format_k(k)}"] = accuracy_L
        return columns
