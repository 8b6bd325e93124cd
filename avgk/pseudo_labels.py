"""Pseudo-label rules of the two-head loss: per batch (online) and global (given a selection threshold).

Legend: B batch size, L classes, N samples.
"""

from __future__ import annotations

import math

import torch

from avgk.thresholds import round_count


def num_pseudo_positives(*, batch_size: int, num_classes: int, k: float) -> int:
    """M = floor(K_pl * B + 1/2), the number of positives in a batch (METHOD.md section 3)."""
    if not k >= 1:
        raise ValueError(f"pseudo-label K_pl must be >= 1 (every true label is a positive), got {k}")
    m = round_count(n=batch_size, k=k)
    if m > batch_size * num_classes:
        raise ValueError(
            f"pseudo-label K_pl={k} asks for {m} positives, more than the {batch_size} x {num_classes} batch entries"
        )
    return m


def force_labels(*, probs_BL: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """A detached copy of the scores with every true label's entry set to +inf."""
    forced_BL = probs_BL.detach().clone()
    forced_BL[torch.arange(forced_BL.shape[0], device=forced_BL.device), labels_B] = math.inf
    return forced_BL


def batch_pseudo_labels(*, probs: torch.Tensor, labels: torch.Tensor, k: float) -> torch.Tensor:
    """B x L 0/1 matrix: the round(k*B) largest entries of the batch, true labels forced in.

    `probs` are the softmax head's probabilities; they are detached here, so no gradient
    flows through the pseudo-labels. Ties at the boundary go to the entry with the lower
    flat (row-major) index, so the result is deterministic.
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be B x L and labels B, got {tuple(probs.shape)} and {tuple(labels.shape)}")
    batch_size, num_classes = probs.shape
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}")
    m = num_pseudo_positives(batch_size=batch_size, num_classes=num_classes, k=k)
    flat = force_labels(probs_BL=probs.float(), labels_B=labels).flatten()
    # A stable descending sort breaks ties by flat index; topk gives no such guarantee.
    order = torch.sort(flat, descending=True, stable=True).indices[:m]
    targets = torch.zeros_like(flat)
    targets[order] = 1.0
    return targets.view(batch_size, num_classes)


def global_pseudo_labels(*, probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """B x L 0/1 matrix of one chunk under the global rule: forced scores >= threshold.

    `threshold` is the round(K_pl * N)-th largest forced score of the whole training set
    (from avgk.thresholds' streaming selection), so all chunks together select that many
    entries, plus any entries tied with the threshold value.
    """
    forced = force_labels(probs_BL=probs.float(), labels_B=labels)
    return (forced >= threshold).to(probs.dtype)
