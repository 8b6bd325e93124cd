"""Set rules with a coverage target (eval.set_rules), calibrated on val: what each row needs, and the sets.

Calibration needs one number or three per val sample, whatever L is: the true label's score
(coverage, class_coverage) and, for aps and raps, the mass up to the true label and its rank
(`calibration_columns`). A scoring job computes them from the full row where it has it (the
scorer, the training ranks) and the passes gather them by sample index, exactly
(avgk.evaluation.coverage_passes). The thresholds are then quantiles of those numbers
(avgk.method.coverage_sets), computed on the driver: `calibrate`.

Evaluation needs, per test row and calibrated target, only its set's size and whether it holds the
true label (`rule_columns`): computed from the full row by whoever has it, so the counts are exact
at any coverage however large the sets grow, and no job keeps more than a few numbers per row.

Each rule thresholds one head's scores (its `head`, else the run's score head). A scoring job keeps
the score head's rows as the column "scores"; a rule on another head reads that head's rows, named
by the head ("softmax"), whose set columns carry the head's name as a prefix (`by_column`, `prefix`).

Legend: N samples, L classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from avgk.config.evaluation import SetRuleConfig
from avgk.config.model import scoreable_heads
from avgk.evaluation.metrics import format_k
from avgk.method import coverage_sets as cs

__all__ = ["CalibratedRule", "by_column", "calibrate", "calibration_columns", "check_heads", "head_note", "head_of",
           "needs_mass", "rule_columns", "rules_from_json", "rules_summary", "rules_to_json", "select"]

CAL_TRUE, CAL_MASS, CAL_RANK = "cal_true", "cal_mass", "cal_rank"
"""The calibration columns of a val row: true label's score (float32), mass (float64) and rank (int32) up to it."""
SIZE, COVERED = "set_size@", "set_covered@"
"""Prefixes of a test row's columns for a calibrated target: its set's size (int32) and whether it holds the label."""


@dataclasses.dataclass(frozen=True)
class CalibratedRule:
    """One rule at one coverage target, as calibrated on val; `members` gives its sets."""

    name: str
    rule: str
    coverage: float
    n: int
    """Calibration samples (val samples; for class_coverage, all of them)."""
    m: int
    """The conformal rank ceil((n + 1) * coverage); m > n: the sets are the whole label set."""
    threshold: float | None = None
    """coverage: {l : score_l >= threshold} (-inf: every label)."""
    q: float | None = None
    """aps, raps: labels kept while the sorted mass (+ penalty) is <= q (inf: every label)."""
    thresholds_L: tuple[float, ...] | None = None
    """class_coverage: label l is in the set when score_l >= thresholds_L[l]."""
    pooled: tuple[int, ...] = ()
    """class_coverage: classes with fewer than min_count val samples, sharing one threshold."""
    penalty: float = 0.0
    k_reg: int = 0
    head: str | None = None
    """The head whose scores the sets threshold ("posterior": the true posteriors'); None: the run's score head
    (thresholds.json written before rules had a head)."""

    @property
    def key(self) -> str:
        return f"{self.name}@{format_k(self.coverage)}"

    @property
    def full_label_set(self) -> bool:
        """Whether the target needs more calibration samples than there are: every set is the label set."""
        return self.m > self.n

    def members(self, scores_NL: np.ndarray) -> np.ndarray:
        """N x L bool: the rule's sets for float32 score rows."""
        scores = np.asarray(scores_NL, dtype=np.float32)
        if self.rule == "coverage":
            assert self.threshold is not None
            above: np.ndarray = scores >= np.float32(self.threshold)
            return above
        if self.rule == "class_coverage":
            assert self.thresholds_L is not None
            if scores.shape[1] != len(self.thresholds_L):
                raise ValueError(f"{self.key} has {len(self.thresholds_L)} class thresholds, the scores "
                                 f"{scores.shape[1]} columns")
            return scores >= np.asarray(self.thresholds_L, dtype=np.float32)[None, :]
        assert self.q is not None
        return cs.aps_sets(probs_NL=scores, q=self.q, penalty=self.penalty, k_reg=self.k_reg)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        for name in ("threshold", "q"):  # JSON has no infinities
            if doc[name] is not None and not math.isfinite(doc[name]):
                doc[name] = None if doc[name] < 0 else "inf"
        if self.thresholds_L is not None:
            doc["thresholds_L"] = [t if math.isfinite(t) else None for t in self.thresholds_L]
        doc["pooled"] = list(self.pooled)
        doc["full_label_set"] = self.full_label_set
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CalibratedRule:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in fields}
        if values["rule"] == "coverage":
            values["threshold"] = cs.FULL if values.get("threshold") is None else float(values["threshold"])
        if values["rule"] in ("aps", "raps"):
            values["q"] = float(values["q"])  # "inf" reads as inf
        if values.get("thresholds_L") is not None:
            values["thresholds_L"] = tuple(cs.FULL if t is None else float(t) for t in values["thresholds_L"])
        values["pooled"] = tuple(values.get("pooled", ()))
        return cls(**values)


def needs_mass(rules: Sequence[SetRuleConfig]) -> bool:
    return any(rule.rule in ("aps", "raps") for rule in rules)


def head_note(rules: Sequence[SetRuleConfig], *, score_head: str) -> str:
    """A console line when aps or raps run on scores that are not probabilities ('' otherwise)."""
    names = [rule.key for rule in rules if rule.rule in ("aps", "raps") and (rule.head or score_head) != "softmax"]
    if not names:
        return ""
    heads = sorted({rule.head or score_head for rule in rules if rule.key in names})
    return (f"note: eval.set_rules {', '.join(names)} build sets from cumulative probability mass, but the "
            f"{' and '.join(heads)} head's scores do not sum to 1: their sets hold their coverage but grow large "
            "(docs/RESULTS.md, \"Coverage targets\"); give them head: softmax, or use coverage and class_coverage, "
            "which suit any score")


def by_column(rules: Sequence[SetRuleConfig], *, score_head: str) -> dict[str, list[SetRuleConfig]]:
    """The rules grouped by the score column their sets come from: "scores" (the run's score head) or another
    head's name, in the order of the config's first rule on each."""
    groups: dict[str, list[SetRuleConfig]] = {}
    for rule in rules:
        column = "scores" if rule.head in (None, score_head) else str(rule.head)
        groups.setdefault(column, []).append(rule)
    return groups


def head_of(column: str, *, score_head: str) -> str:
    """The head whose scores a set column holds (by_column's inverse; "posterior" stays itself)."""
    return score_head if column == "scores" else column


def check_heads(rules: Sequence[SetRuleConfig], *, heads: Sequence[str], loss: str) -> None:
    """A one-line error for a rule whose head the model does not have (fused needs both heads)."""
    available = scoreable_heads(heads)
    for rule in rules:
        if rule.head is not None and rule.head not in available:
            raise ValueError(f"eval.set_rules {rule.key!r} has head={rule.head!r}, but loss {loss!r} trains only "
                             f"{sorted(heads)}")


def prefix(column: str) -> str:
    """Names of the set columns of a score column: "" for the model's "scores", "posterior_" for the oracle's."""
    return "" if column == "scores" else f"{column}_"


def calibration_columns(scores_NL: np.ndarray, *, labels_N: np.ndarray, with_mass: bool,
                        column: str = "scores") -> dict[str, np.ndarray]:
    """A val batch's calibration columns from its full rows of `column`."""
    scores = np.asarray(scores_NL, dtype=np.float32)
    labels = np.asarray(labels_N, dtype=np.int64)
    at = prefix(column)
    columns = {at + CAL_TRUE: scores[np.arange(labels.size), labels]}
    if with_mass:
        mass, rank = cs.true_mass_and_rank(probs_NL=scores, labels_N=labels)
        columns[at + CAL_MASS] = mass
        columns[at + CAL_RANK] = rank.astype(np.int32)
    return columns


def rule_columns(scores_NL: np.ndarray, *, labels_N: np.ndarray, rules: Sequence[CalibratedRule],
                 column: str = "scores") -> dict[str, np.ndarray]:
    """A test batch's set size and coverage for every calibrated target, from its full rows of `column`."""
    labels = np.asarray(labels_N, dtype=np.int64)
    rows = np.arange(labels.size)
    at = prefix(column)
    columns: dict[str, np.ndarray] = {}
    for rule in rules:
        members = rule.members(scores_NL)
        columns[at + SIZE + rule.key] = np.count_nonzero(members, axis=1).astype(np.int32)
        columns[at + COVERED + rule.key] = members[rows, labels]
    return columns


def calibrate(
    rules: Sequence[SetRuleConfig], *, true_N: np.ndarray, labels_N: np.ndarray, num_classes: int,
    mass_N: np.ndarray | None = None, rank_N: np.ndarray | None = None, head: str | None = None,
) -> list[CalibratedRule]:
    """Every rule at every target, from the val samples' calibration columns (of `head`'s scores)."""
    n = int(np.asarray(true_N).size)
    calibrated = []
    for rule in rules:
        for coverage in rule.coverages:
            alpha = cs.alpha_of(coverage)
            common: dict[str, Any] = dict(name=rule.key, rule=rule.rule, coverage=float(coverage), n=n,
                          m=cs.conformal_rank(n=n, alpha=alpha), head=head)
            if rule.rule == "coverage":
                calibrated.append(CalibratedRule(**common, threshold=cs.lac_threshold(true_scores_N=true_N, alpha=alpha)))
            elif rule.rule == "class_coverage":
                found = cs.class_thresholds(true_scores_N=true_N, labels_N=labels_N, num_classes=num_classes,
                                            alpha=alpha, min_count=rule.min_count)
                calibrated.append(CalibratedRule(**common, thresholds_L=tuple(float(t) for t in found.thresholds_L),
                                                 pooled=found.pooled))
            else:
                if mass_N is None or rank_N is None:
                    raise ValueError(f"rule {rule.key!r} ({rule.rule}) needs the val samples' mass and rank")
                penalty, k_reg = (rule.penalty, rule.k_reg) if rule.rule == "raps" else (0.0, 0)
                conformity = cs.raps_conformity(mass_N=mass_N, rank_N=rank_N, penalty=penalty, k_reg=k_reg)
                calibrated.append(CalibratedRule(**common, q=cs.conformity_quantile(conformity_N=conformity, alpha=alpha),
                                                 penalty=penalty, k_reg=k_reg))
    return calibrated


def rules_to_json(rules: Sequence[CalibratedRule]) -> dict[str, dict[str, Any]]:
    """{name: {coverage key: calibration}}, as thresholds.json keeps them."""
    doc: dict[str, dict[str, Any]] = {}
    for rule in rules:
        doc.setdefault(rule.name, {})[format_k(rule.coverage)] = rule.to_json()
    return doc


def rules_summary(rules: Sequence[CalibratedRule]) -> dict[str, dict[str, Any]]:
    """rules_to_json without the per-class thresholds (metrics.json's val section; thresholds.json has them)."""
    doc = rules_to_json(rules)
    for targets in doc.values():
        for entry in targets.values():
            entry.pop("thresholds_L", None)
            entry["pooled"] = len(entry["pooled"])
    return doc


def rules_from_json(doc: Mapping[str, Mapping[str, Any]]) -> list[CalibratedRule]:
    return [CalibratedRule.from_json(entry) for targets in doc.values() for entry in targets.values()]


def select(rules: Sequence[CalibratedRule], *, name: str, coverage: float) -> CalibratedRule:
    """The calibrated rule `name` at `coverage`; a one-line error naming those calibrated."""
    for rule in rules:
        if rule.name == name and math.isclose(rule.coverage, coverage, rel_tol=0, abs_tol=1e-12):
            return rule
    calibrated = ", ".join(f"{r.name} at {format_k(r.coverage)}" for r in rules) or "none"
    raise ValueError(f"no set rule {name!r} calibrated at coverage {format_k(coverage)}: calibrated are {calibrated}")
