"""The class-prior level of average-K accuracy: what a model that ignores the image reaches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prior_avg_k_accuracy(*, train_counts: Sequence[int], eval_counts: Sequence[int], k: float) -> float:
    """Average-K accuracy on a split of a constant score (the training class frequencies): every set
    holds the same K most frequent training classes (a fractional K takes that share of the next)."""
    order = np.argsort(-np.asarray(train_counts, dtype=np.float64), kind="stable")
    shares = np.asarray(eval_counts, dtype=np.float64)[order] / max(1, int(np.sum(eval_counts)))
    whole = int(k)
    return float(shares[:whole].sum() + (k - whole) * (shares[whole] if whole < len(shares) else 0.0))
