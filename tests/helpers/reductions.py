"""Thresholds and metrics of one score dataset through the Ray reduction driver (tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import ray.data

from avgk.evaluation import passes
from avgk.evaluation.metrics import SetMetrics
from pipelines.reduction import ray_runner


def calibrate_dataset(
    ds: ray.data.Dataset, *, ks: Iterable[float], column: str = "scores", num_tasks: int | None = None,
    log: Callable[[str], None] | None = None, top: bool = False, num_classes: int | None = None,
) -> dict[float, float]:
    """Exact lambda_K for every K over the rows' `column` (float32 L-vectors), equal to reference_thresholds.

    avgk.evaluation.passes.calibrate driven by Ray: two passes of StreamingThresholds in `num_tasks` parallel
    tasks (default: one per cluster CPU, at most one per block), each returning a 65,536-bin int64
    histogram (a few in pass 2, sent as their nonzero entries) that the driver sums. A lazy
    dataset is executed once and its blocks kept in the object store for both passes; pass a
    materialised one to share it with other reductions (the model then runs once per split). `top`: the rows are top-T rows of
    `num_classes` scores (raises NotExact when they cannot prove a lambda_K).
    """
    return passes.calibrate(ray_runner({"rows": ds}, num_tasks=num_tasks, log=log), "rows", ks=ks, column=column,
                            top=top, num_classes=num_classes)


def metrics_dataset(
    ds: ray.data.Dataset,
    *,
    num_classes: int,
    ks: Iterable[float],
    thresholds: dict[float, float],
    train_class_counts: np.ndarray | None = None,
    freq_bins: tuple[int, int] = (20, 100),
    column: str = "scores",
    num_tasks: int | None = None,
    log: Callable[[str], None] | None = None,
    top: bool = False,
) -> SetMetrics:
    """SetMetrics of the rows' `column` against their `label`: avgk.evaluation.passes.count_metrics driven by Ray tasks."""
    return passes.count_metrics(
        ray_runner({"rows": ds}, num_tasks=num_tasks, log=log), "rows", num_classes=num_classes, ks=ks,
        thresholds=thresholds, train_class_counts=train_class_counts, freq_bins=freq_bins, column=column, top=top,
    )
