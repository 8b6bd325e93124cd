"""The set rules' passes (avgk.evaluation.passes protocol): calibration gathered by sample index, counts summed.

- `CalibrationPass` (val, one pass): each stream places its rows' calibration columns at their
  sample index in arrays of the split's length; summed over streams, every value sits at its
  index once, so the driver holds the exact per-sample numbers (a few bytes per val sample, never
  L) and calibrates with plain quantiles. Sums of one value and zeros are exact in int64, so the
  float bits travel as integers.
- `CoverageMetricsPass` (test, one pass): `CoverageCounts` of each row's set size and coverage.

Batches hold either full "scores" rows (the columns are computed here) or the columns the scorer
computed from them (avgk.evaluation.set_rules): the same functions, so both give the same numbers.

Legend: N samples, L classes, S possible set sizes (0..L).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from avgk.config.evaluation import SetRuleConfig
from avgk.evaluation import set_rules
from avgk.evaluation.set_rules import CalibratedRule

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class CalibrationPass:
    """The val samples' calibration columns, gathered by sample index (idx in 0..num_samples-1)."""

    rules: tuple[SetRuleConfig, ...]
    num_samples: int
    num_classes: int
    column: str = "scores"
    """"scores", another head's column (avgk.evaluation.set_rules.by_column), or "posterior": the true
    posteriors' (synthetic data), for the Bayes-optimal sets."""
    head: str | None = None
    """The head the column holds, recorded in each calibrated rule."""

    @property
    def with_mass(self) -> bool:
        return set_rules.needs_mass(self.rules)

    def done(self, totals: list[Any]) -> bool:
        return len(totals) == 1

    def run(self, totals: list[Any], batches: Iterable[Batch]) -> dict[str, np.ndarray]:
        n = self.num_samples
        state = {"seen_N": np.zeros(n, np.int64), "label_N": np.zeros(n, np.int64), "true_N": np.zeros(n, np.int64)}
        if self.with_mass:
            state.update(mass_N=np.zeros(n, np.int64), rank_N=np.zeros(n, np.int64))
        for batch in batches:
            idx = np.asarray(batch["idx"], dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"sample indices must lie in [0, {n}) for the split's {n} samples, got {idx.min()}..{idx.max()}")
            at = set_rules.prefix(self.column)
            columns = batch if at + set_rules.CAL_TRUE in batch else set_rules.calibration_columns(
                batch[self.column], labels_N=batch["label"], with_mass=self.with_mass, column=self.column)
            np.add.at(state["seen_N"], idx, 1)
            state["label_N"][idx] = batch["label"]
            state["true_N"][idx] = np.asarray(columns[at + set_rules.CAL_TRUE], dtype=np.float32).view(np.uint32)
            if self.with_mass:
                state["mass_N"][idx] = np.asarray(columns[at + set_rules.CAL_MASS], dtype=np.float64).view(np.int64)
                state["rank_N"][idx] = columns[at + set_rules.CAL_RANK]
        return state

    def calibrate(self, totals: list[Any]) -> list[CalibratedRule]:
        state = totals[0]
        seen = np.asarray(state["seen_N"])
        if (seen > 1).any():
            raise ValueError(f"sample index {int(np.argmax(seen > 1))} was read {int(seen.max())} times: calibration "
                             "needs each val sample once")
        present = seen == 1
        true = np.asarray(state["true_N"])[present].astype(np.uint32).view(np.float32)
        mass = rank = None
        if self.with_mass:
            mass = np.asarray(state["mass_N"])[present].view(np.float64)
            rank = np.asarray(state["rank_N"])[present]
        return set_rules.calibrate(self.rules, true_N=true, labels_N=np.asarray(state["label_N"])[present],
                                   num_classes=self.num_classes, mass_N=mass, rank_N=rank, head=self.head)


class CoverageCounts:
    """Per calibrated target: covered samples and set sizes per class, sets and covered sets per size (int64)."""

    def __init__(self, *, rules: Sequence[CalibratedRule], num_classes: int, train_class_counts: np.ndarray | None,
                 freq_bins: tuple[int, int]) -> None:
        self.rules = list(rules)
        self.num_classes = int(num_classes)
        self.train_class_counts = None if train_class_counts is None else np.asarray(train_class_counts, np.int64)
        self.freq_bins = freq_bins
        self._state = self._empty()

    def _empty(self) -> dict[str, np.ndarray]:
        L = self.num_classes
        state = {"num_samples_L": np.zeros(L, np.int64)}
        for rule in self.rules:
            for name, size in (("covered_L", L), ("size_sum_L", L), ("sets_S", L + 1), ("covered_S", L + 1)):
                state[f"{name}@{rule.key}"] = np.zeros(size, np.int64)
        return state

    def update(self, *, labels_N: np.ndarray, columns: Mapping[str, np.ndarray], column: str = "scores") -> None:
        labels = np.asarray(labels_N, dtype=np.int64)
        L = self.num_classes
        at = set_rules.prefix(column)
        self._state["num_samples_L"] += np.bincount(labels, minlength=L)
        for rule in self.rules:
            size = np.asarray(columns[at + set_rules.SIZE + rule.key], dtype=np.int64)
            covered = np.asarray(columns[at + set_rules.COVERED + rule.key], dtype=bool)
            self._state[f"covered_L@{rule.key}"] += np.bincount(labels[covered], minlength=L)
            self._state[f"size_sum_L@{rule.key}"] += np.bincount(labels, weights=size, minlength=L).astype(np.int64)
            self._state[f"sets_S@{rule.key}"] += np.bincount(size, minlength=L + 1)
            self._state[f"covered_S@{rule.key}"] += np.bincount(size[covered], minlength=L + 1)

    def state(self) -> dict[str, np.ndarray]:
        return {name: counts.copy() for name, counts in self._state.items()}

    def load_state(self, summed: Mapping[str, Any]) -> None:
        if set(summed) != set(self._state):
            raise ValueError(f"coverage state keys differ: got {sorted(summed)}, expected {sorted(self._state)}")
        self._state = {name: np.asarray(summed[name], dtype=np.int64) for name in self._state}

    def _group(self, rule: CalibratedRule, mask_L: np.ndarray) -> dict[str, Any]:
        samples_L = self._state["num_samples_L"]
        num = int(samples_L[mask_L].sum())
        covered = int(self._state[f"covered_L@{rule.key}"][mask_L].sum())
        sizes = int(self._state[f"size_sum_L@{rule.key}"][mask_L].sum())
        return {"num_classes": int((mask_L & (samples_L > 0)).sum()), "num_samples": num,
                "coverage": covered / num if num else None, "avg_set_size": sizes / num if num else None}

    def compute(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{rule name: {coverage key: metrics}}: marginal, per-class summary, by frequency, sizes, coverage by size."""
        samples_L = self._state["num_samples_L"]
        total = int(samples_L.sum())
        if total == 0:
            raise ValueError("coverage metrics need at least one test sample, got 0")
        present = samples_L > 0
        doc: dict[str, dict[str, dict[str, Any]]] = {}
        for rule in self.rules:
            covered_L = self._state[f"covered_L@{rule.key}"]
            sets_S, covered_S = self._state[f"sets_S@{rule.key}"], self._state[f"covered_S@{rule.key}"]
            class_coverage = covered_L[present] / samples_L[present]
            sizes = np.flatnonzero(sets_S)
            entry: dict[str, Any] = {
                "target": rule.coverage,
                "head": rule.head,
                "coverage": int(covered_L.sum()) / total,
                "macro_coverage": float(class_coverage.mean()),
                "worst_class_coverage": float(class_coverage.min()),
                "classes_below_target": int((class_coverage < rule.coverage).sum()),
                "num_classes": int(present.sum()),
                "avg_set_size": float((np.arange(sets_S.size) * sets_S).sum() / total),
                "empty_set_fraction": int(sets_S[0]) / total,
                "full_set_fraction": int(sets_S[-1]) / total,
                "set_size_histogram": {str(s): int(sets_S[s]) for s in sizes},
                "coverage_by_set_size": {str(s): int(covered_S[s]) / int(sets_S[s]) for s in sizes},
                "calibration": {"n": rule.n, "m": rule.m, "full_label_set": rule.full_label_set,
                                "pooled_classes": len(rule.pooled)},
            }
            if self.train_class_counts is not None:
                few, many = self.freq_bins
                counts = self.train_class_counts
                entry["by_frequency"] = {
                    "few": self._group(rule, counts < few),
                    "medium": self._group(rule, (counts >= few) & (counts <= many)),
                    "many": self._group(rule, counts > many),
                }
            doc.setdefault(rule.name, {})[rule.key.rpartition("@")[2]] = entry
        return doc

    def per_class(self) -> dict[str, np.ndarray]:
        """coverage@<key> and avg_set_size@<key> per class (NaN for classes without test samples)."""
        samples_L = self._state["num_samples_L"]
        present = samples_L > 0
        columns = {}
        for rule in self.rules:
            for name, counts in (("coverage", self._state[f"covered_L@{rule.key}"]),
                                 ("avg_set_size", self._state[f"size_sum_L@{rule.key}"])):
                values = np.full(self.num_classes, np.nan)
                np.divide(counts, samples_L, out=values, where=present)
                columns[f"{name}@{rule.key}"] = values
        return columns


@dataclasses.dataclass(frozen=True)
class CoverageMetricsPass:
    """CoverageCounts of the test rows for every calibrated target, in one pass."""

    rules: tuple[CalibratedRule, ...]
    num_classes: int
    train_class_counts: tuple[int, ...] | None
    freq_bins: tuple[int, int]
    column: str = "scores"

    def counts(self, totals: list[Any] | None = None) -> CoverageCounts:
        counts = CoverageCounts(rules=self.rules, num_classes=self.num_classes, freq_bins=self.freq_bins,
                                train_class_counts=None if self.train_class_counts is None
                                else np.asarray(self.train_class_counts, np.int64))
        if totals:
            counts.load_state(totals[0])
        return counts

    def done(self, totals: list[Any]) -> bool:
        return len(totals) == 1

    def run(self, totals: list[Any], batches: Iterable[Batch]) -> dict[str, np.ndarray]:
        counts = self.counts()
        at = set_rules.prefix(self.column)
        for batch in batches:
            missing = [rule.key for rule in self.rules if at + set_rules.SIZE + rule.key not in batch]
            if missing and self.column not in batch:
                raise ValueError(f"test rows hold neither full {self.column} nor the set sizes of {missing}: score "
                                 "the split with these rules")
            columns = batch if not missing else set_rules.rule_columns(
                batch[self.column], labels_N=batch["label"], rules=self.rules, column=self.column)
            counts.update(labels_N=batch["label"], columns=columns, column=self.column)
        return counts.state()
