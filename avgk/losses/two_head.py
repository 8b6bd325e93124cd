"""The paper's two-head loss and the softmax cross-entropy baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avgk.config import LossConfig
from avgk.losses.base import Loss, LossOutput, register_loss
from avgk.pseudo_labels import batch_pseudo_labels, num_pseudo_positives


def reduce_entries(*, terms_BL: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over the batch of each sample's per-class terms, summed ('sum') or averaged ('mean') over L."""
    if reduction == "sum":
        return terms_BL.sum()
    if reduction == "mean":
        return terms_BL.sum() / terms_BL.shape[1]
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


@register_loss("ce")
class CrossEntropyLoss(Loss):
    """Softmax + cross-entropy; average-K by thresholding the softmax."""

    heads = ("softmax",)
    default_score_head = "softmax"

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int) -> "CrossEntropyLoss":
        return cls()

    def forward(self, *, logits, labels, idx, epoch, pseudo_targets=None) -> LossOutput:
        ce = F.cross_entropy(logits["softmax"].float(), labels, reduction="sum")
        return LossOutput(total_sum=ce, parts_sum={"ce": ce.detach()})


@register_loss("two_head")
class TwoHeadLoss(Loss):
    """L = CE(z_s, y) + mu * BCE(z_m, pseudo-labels from the detached softmax) (METHOD.md section 3)."""

    heads = ("softmax", "multilabel")
    default_score_head = "multilabel"

    def __init__(self, *, pseudo_k: float, ml_weight: float, ml_reduction: str, warmup_epochs: int, num_classes: int):
        super().__init__()
        # Validate K_pl once against L here, not at the first batch of a long job.
        num_pseudo_positives(batch_size=1, num_classes=num_classes, k=pseudo_k)
        self.pseudo_k = pseudo_k
        self.ml_weight = ml_weight
        self.ml_reduction = ml_reduction
        self.warmup_epochs = warmup_epochs

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int) -> "TwoHeadLoss":
        return cls(
            pseudo_k=config.effective_pseudo_k,
            ml_weight=config.ml_weight,
            ml_reduction=config.ml_reduction,
            warmup_epochs=config.pseudo_warmup_epochs,
            num_classes=num_classes,
        )

    def forward(self, *, logits, labels, idx, epoch, pseudo_targets=None) -> LossOutput:
        z_s, z_m = logits["softmax"].float(), logits["multilabel"].float()
        ce = F.cross_entropy(z_s, labels, reduction="sum")
        if pseudo_targets is None:
            pseudo_targets = batch_pseudo_labels(probs=torch.softmax(z_s, dim=1), labels=labels, k=self.pseudo_k)
        bce_BL = F.binary_cross_entropy_with_logits(z_m, pseudo_targets.to(z_m.dtype), reduction="none")
        bce = reduce_entries(terms_BL=bce_BL, reduction=self.ml_reduction)
        # During warm-up the term is kept with weight 0 so DDP still sees every parameter used.
        weight = 0.0 if epoch < self.warmup_epochs else self.ml_weight
        total = ce + weight * bce
        return LossOutput(total_sum=total, parts_sum={"ce": ce.detach(), "bce": bce.detach()})
