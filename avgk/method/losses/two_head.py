"""The paper's two-head loss and the softmax cross-entropy baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from avgk.config import LossConfig
from avgk.method.losses.base import Loss, LossOutput
from avgk.method.pseudo_labels import batch_pseudo_labels, num_pseudo_positives


def selection_scale(class_counts: Sequence[int] | None, *, tau: float, num_classes: int) -> torch.Tensor | None:
    """pi_j^-tau for the prior-corrected pseudo-label rule (None when tau = 0: the paper's rule).

    pi_j is class j's share of the training split; a class with no training image counts as one
    image, so its factor stays finite. Only ranks matter to the selection, so the scale is
    divided by its largest entry (values in (0, 1], no overflow at any tau).
    """
    if tau == 0:
        return None
    if class_counts is None:
        raise ValueError(f"loss.pseudo_prior_tau={tau} needs the training class counts (from the shard manifest)")
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    if counts.shape != (num_classes,) or bool((counts < 0).any()):
        raise ValueError(f"class_counts must be {num_classes} counts >= 0, got shape {tuple(counts.shape)}")
    log_scale = -tau * torch.log(counts.clamp(min=1.0) / counts.clamp(min=1.0).sum())
    return torch.exp(log_scale - log_scale.max()).float()


def reduce_entries(*, terms_BL: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over the batch of each sample's per-class terms, summed ('sum') or averaged ('mean') over L."""
    if reduction == "sum":
        return terms_BL.sum()
    if reduction == "mean":
        return terms_BL.sum() / terms_BL.shape[1]
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class CrossEntropyLoss(Loss):
    """Softmax + cross-entropy; average-K by thresholding the softmax."""

    heads = ("softmax",)
    default_score_head = "softmax"

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> CrossEntropyLoss:
        return cls(label_smoothing=config.label_smoothing)

    def forward(
        self,
        *,
        logits: dict[str, torch.Tensor],
        labels: torch.Tensor,
        idx: torch.Tensor,
        epoch: int,
        pseudo_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        # labels: class ids (B), or class probabilities (B x L) from mixup / cutmix.
        ce = F.cross_entropy(logits["softmax"].float(), labels, reduction="sum", label_smoothing=self.label_smoothing)
        return LossOutput(total_sum=ce, parts_sum={"ce": ce.detach()})


class TwoHeadLoss(Loss):
    """L = CE(z_s, y) + mu * BCE(z_m, pseudo-labels from the detached softmax) (docs/METHOD.md section 3)."""

    heads = ("softmax", "multilabel")
    default_score_head = "multilabel"
    selection_scale_L: torch.Tensor | None  # a buffer (register_buffer below)

    def __init__(
        self,
        *,
        pseudo_k: float,
        ml_weight: float,
        ml_reduction: str,
        warmup_epochs: int,
        num_classes: int,
        prior_tau: float = 0.0,
        class_counts: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        # Validate K_pl once against L here, not at the first batch of a long job.
        num_pseudo_positives(batch_size=1, num_classes=num_classes, k=pseudo_k)
        self.pseudo_k = pseudo_k
        self.ml_weight = ml_weight
        self.ml_reduction = ml_reduction
        self.warmup_epochs = warmup_epochs
        self.prior_tau = prior_tau
        # pi_j^-tau, the factor that turns p(j|x) into the selection score p(j|x) / pi_j^tau.
        # Not saved with the state: it is a function of the manifest and the config.
        self.register_buffer("selection_scale_L", selection_scale(class_counts, tau=prior_tau, num_classes=num_classes),
                             persistent=False)

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> TwoHeadLoss:
        return cls(
            pseudo_k=config.effective_pseudo_k,
            ml_weight=config.ml_weight,
            ml_reduction=config.ml_reduction,
            warmup_epochs=config.pseudo_warmup_epochs,
            num_classes=num_classes,
            prior_tau=config.pseudo_prior_tau,
            class_counts=class_counts,
            label_smoothing=config.label_smoothing,
        )

    def forward(
        self,
        *,
        logits: dict[str, torch.Tensor],
        labels: torch.Tensor,
        idx: torch.Tensor,
        epoch: int,
        pseudo_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        z_s, z_m = logits["softmax"].float(), logits["multilabel"].float()
        ce = F.cross_entropy(z_s, labels, reduction="sum", label_smoothing=self.label_smoothing)
        if pseudo_targets is None:
            selection = torch.softmax(z_s, dim=1)
            if self.selection_scale_L is not None:
                selection = selection * self.selection_scale_L
            pseudo_targets = batch_pseudo_labels(probs=selection, labels=labels, k=self.pseudo_k)
        bce_BL = F.binary_cross_entropy_with_logits(z_m, pseudo_targets.to(z_m.dtype), reduction="none")
        bce = reduce_entries(terms_BL=bce_BL, reduction=self.ml_reduction)
        # During warm-up the term is kept with weight 0 so DDP still sees every parameter used.
        weight = 0.0 if epoch < self.warmup_epochs else self.ml_weight
        total = ce + weight * bce
        return LossOutput(total_sum=total, parts_sum={"ce": ce.detach(), "bce": bce.detach()})
