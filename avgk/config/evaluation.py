"""The eval section: the K values evaluated, frequency bins, and how the scoring jobs keep scores."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from avgk.config.base import Section

_DEFAULT_KS: list[float] = [1, 2, 3, 5, 10]
"""eval.ks by default (ints: the config shows and saves them as written)."""


class EvalConfig(Section):
    """Which K are evaluated, and the class-frequency bins."""

    ks: list[float] = Field(default_factory=lambda: _DEFAULT_KS.copy(), min_length=1)
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

    @field_validator("freq_bins")
    @classmethod
    def _bins(cls, bins: tuple[int, int]) -> tuple[int, int]:
        if not 0 < bins[0] <= bins[1]:
            raise ValueError(f"eval.freq_bins must satisfy 0 < few <= many, got {bins}")
        return bins
