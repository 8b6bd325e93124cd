"""The eval section: the K values evaluated, the coverage set rules, frequency bins, and how the scoring jobs keep scores."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from avgk.config.base import Section

_DEFAULT_KS: list[float] = [1, 2, 3, 5, 10]
"""eval.ks by default (ints: the config shows and saves them as written)."""

SET_RULES = ("coverage", "aps", "raps", "class_coverage")
"""Set rules with a coverage target, beside average-K (avgk.method.coverage_sets)."""


class SetRuleConfig(Section):
    """One set rule calibrated on val for each of its coverage targets (avgk.method.coverage_sets)."""

    rule: Literal["coverage", "aps", "raps", "class_coverage"]
    coverages: list[float] = Field(default_factory=lambda: [0.9, 0.95, 0.99], min_length=1)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$",
                             description="the rule's name in metrics.json and `avgk predict --rule`; default: rule")
    head: Literal["softmax", "multilabel", "fused"] | None = Field(
        None, description="the head whose scores the sets threshold; default: the run's score head (loss.score_head). "
        "two_head: 'softmax' gives aps and raps the probabilities they assume, beside rules on the multi-label head"
    )
    penalty: float = Field(0.01, ge=0, description="raps: lambda, added per rank of a label beyond k_reg")
    k_reg: int = Field(5, ge=0, description="raps: ranks without penalty")
    min_count: int = Field(
        10, ge=1, description="class_coverage: classes with fewer val samples, or fewer than the target needs "
        "((1 - alpha) / alpha: 19 at 0.95), share one pooled threshold"
    )

    @field_validator("coverages")
    @classmethod
    def _coverages(cls, coverages: list[float]) -> list[float]:
        for c in coverages:
            if not (0 < c < 1):
                raise ValueError(f"every coverage target must lie strictly between 0 and 1, got {c}")
        if len(set(coverages)) != len(coverages):
            raise ValueError(f"coverages has duplicates: {coverages}")
        return sorted(coverages)

    @property
    def key(self) -> str:
        return self.name or self.rule


class EvalConfig(Section):
    """Which K are evaluated, and the class-frequency bins."""

    ks: list[float] = Field(default_factory=lambda: _DEFAULT_KS.copy(), min_length=1)
    set_rules: list[SetRuleConfig] = Field(
        default_factory=lambda: [SetRuleConfig(rule="coverage")],
        description="label sets with a coverage guarantee, calibrated on val beside average-K (avgk.method.coverage_sets); "
        "[] for none",
    )
    freq_bins: tuple[int, int] = Field((20, 100), description="few < a <= medium <= b < many (train counts)")
    batch_size: int = Field(256, ge=1)
    strict: bool = Field(
        True,
        description="an evaluation that reads fewer samples than the manifest lists (truncated shard, broken or "
        "unlabelled sample) fails; false: it scores what it read and records the counts in metrics.json",
    )
    checkpoint: Literal["best", "last"] = Field("best", description="checkpoint evaluated at the end")
    num_actors: int | None = Field(
        None, ge=1, description="scorers of the scoring jobs (evaluate, pseudolabel): GPU actors (default: one, "
        "growing while inputs wait, up to one per GPU), else CPU tasks at once (default: one per CPU)"
    )
    gpu_wait_seconds: float = Field(
        600.0, ge=0, description="scoring jobs on GPU: how long to wait for an autoscaling cluster to bring a GPU up"
    )
    score_rows: Literal["top", "full"] = Field(
        "top",
        description="what the scoring jobs (evaluate, pseudolabel) keep per sample in the object store: 'top': its "
        "top_t largest scores and the few exact numbers the metrics need (avgk.evaluation.top_scores), every result proven "
        "equal to the full rows' at run time, else the job scores again with full rows and says so; 'full': all L scores",
    )
    top_t: int | None = Field(
        None, ge=2, description="scores kept per sample with score_rows=top; None: 8 x the largest K served "
        "(eval.ks for evaluate, loss.pseudo_k for pseudolabel), at least 16; must exceed every such K",
    )

    @field_validator("ks")
    @classmethod
    def _ks(cls, ks: list[float]) -> list[float]:
        for k in ks:
            if not (k > 0 and math.isfinite(k)):
                raise ValueError(f"every K in eval.ks must be > 0, got {k}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"eval.ks has duplicates: {ks}")
        return sorted(ks)

    @field_validator("set_rules")
    @classmethod
    def _set_rules(cls, rules: list[SetRuleConfig]) -> list[SetRuleConfig]:
        names = [rule.key for rule in rules]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"eval.set_rules names must be unique, got {twice} more than once (give each a name)")
        return rules

    @field_validator("freq_bins")
    @classmethod
    def _bins(cls, bins: tuple[int, int]) -> tuple[int, int]:
        if not 0 < bins[0] <= bins[1]:
            raise ValueError(f"eval.freq_bins must satisfy 0 < few <= many, got {bins}")
        return bins
