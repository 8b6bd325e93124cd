"""Single-positive multi-label baselines on one sigmoid head: AN, AN-LS, WAN, EPR, EM, EM+APL (ROLE: avgk.method.losses.role).

docs/METHOD.md section 4. Each image has one observed positive (its label) and L - 1 unobserved
entries. References: Cole et al., "Multi-label learning from single positive labels" (CVPR
2021: AN, AN-LS, WAN, EPR, ROLE) and Zhou et al., "Acknowledging the unknown for multi-label
learning with single positive labels" (ECCV 2022: EM, APL).

Reductions (`loss.reduction`): 'sum' adds each sample's per-class terms; 'mean' divides them
by L, so after the trainer's single division by B the loss is the mean over the B * L entries,
as in both reference implementations. Batch-level regularisers (EPR) are never divided by L.

The pure functions return the batch MEAN (sum / B), comparable with the references (which
use log(p + 1e-5); here every log is a stable log-sigmoid, so values agree to about 1e-5).
The registered modules return SUMS over the batch (LossOutput), the regulariser counted B
times so that the trainer's division by B leaves it once.

Legend: B batch size, L classes, N training samples; z logits, p = sigmoid(z).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from avgk.config import LossConfig
from avgk.method.losses.base import Loss, LossOutput
from avgk.method.losses.two_head import reduce_entries
from avgk.method.thresholds import round_count

Parts = dict[str, torch.Tensor]


# ---------------------------------------------------------------- validation


def check_reduction(reduction: str) -> str:
    """`reduction` if it is 'sum' or 'mean', else ValueError naming loss.reduction."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss.reduction must be 'sum' or 'mean', got {reduction!r}")
    return reduction


def _check_eps(eps: float) -> float:
    if not 0 <= eps < 1:
        raise ValueError(f"loss.eps must be in [0, 1), got {eps}")
    return eps


def _check_nonnegative(name: str, value: float) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"loss.{name} must be a finite number >= 0, got {value}")
    return value


def check_k(k: float, num_classes: int) -> float:
    """`k` if 0 < k < num_classes, else ValueError naming loss.k."""
    if not 0 < k < num_classes:
        raise ValueError(f"loss.k must be in (0, {num_classes}) (the number of classes), got {k}")
    return k


def _check_proportion(proportion: float) -> float:
    if not 0 < proportion <= 1:
        raise ValueError(f"loss.apl_neg_proportion must be in (0, 1], got {proportion}")
    return proportion


def _check_warmup(epochs: int) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"loss.apl_warmup_epochs must be an integer >= 0, got {epochs!r}")
    return epochs


def check_num_classes(num_classes: int) -> int:
    """`num_classes` if it is at least 2 (one positive and one unobserved entry), else ValueError."""
    if num_classes < 2:
        raise ValueError(f"single-positive baselines need at least 2 classes, got num_classes={num_classes}")
    return num_classes


# ---------------------------------------------------------------- per-entry terms


def logits_and_positives(*, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits B x L and the B x L 0/1 matrix of observed positives."""
    assert logits.ndim == 2 and labels.shape == logits.shape[:1], (tuple(logits.shape), tuple(labels.shape))
    z_BL = logits.float()
    pos_BL = F.one_hot(labels.long(), z_BL.shape[1]).to(z_BL.dtype)
    return z_BL, pos_BL


def neg_log_p(z_BL: torch.Tensor) -> torch.Tensor:
    """-log p, stable for any logit."""
    return -F.logsigmoid(z_BL)


def _neg_log_1mp(z_BL: torch.Tensor) -> torch.Tensor:
    """-log(1 - p), stable for any logit."""
    return -F.logsigmoid(-z_BL)


def _binary_entropy(z_BL: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log p - (1 - p) log(1 - p), from the logits."""
    p_BL = torch.sigmoid(z_BL)
    return p_BL * neg_log_p(z_BL) + (1 - p_BL) * _neg_log_1mp(z_BL)


def epr_regulariser(*, probs_BL: torch.Tensor, k: float) -> torch.Tensor:
    """(mean_i sum_j p[i, j] - K)^2 / L^2 (Cole et al.'s expected positive regulariser, L2 form)."""
    return (probs_BL.sum(1).mean() - k) ** 2 / probs_BL.shape[1] ** 2


# ---------------------------------------------------------------- losses as sums of named parts


def _an_parts(*, z_BL: torch.Tensor, pos_BL: torch.Tensor, reduction: str) -> Parts:
    return {
        "pos": reduce_entries(terms_BL=pos_BL * neg_log_p(z_BL), reduction=reduction),
        "neg": reduce_entries(terms_BL=(1 - pos_BL) * _neg_log_1mp(z_BL), reduction=reduction),
    }


def _an_ls_parts(*, z_BL: torch.Tensor, pos_BL: torch.Tensor, reduction: str, eps: float) -> Parts:
    targets_BL = (1 - eps) * pos_BL + eps * (1 - pos_BL)
    bce_BL = F.binary_cross_entropy_with_logits(z_BL, targets_BL, reduction="none")
    return {"bce": reduce_entries(terms_BL=bce_BL, reduction=reduction)}


def _wan_parts(*, z_BL: torch.Tensor, pos_BL: torch.Tensor, reduction: str) -> Parts:
    num_classes = z_BL.shape[1]
    return {
        "pos": reduce_entries(terms_BL=pos_BL * neg_log_p(z_BL), reduction=reduction),
        "neg": reduce_entries(terms_BL=(1 - pos_BL) * _neg_log_1mp(z_BL) / (num_classes - 1), reduction=reduction),
    }


def _epr_parts(*, z_BL: torch.Tensor, pos_BL: torch.Tensor, reduction: str, k: float) -> Parts:
    return {
        "pos": reduce_entries(terms_BL=pos_BL * neg_log_p(z_BL), reduction=reduction),
        "reg": z_BL.shape[0] * epr_regulariser(probs_BL=torch.sigmoid(z_BL), k=k),
    }


def _em_parts(
    *,
    z_BL: torch.Tensor,
    pos_BL: torch.Tensor,
    reduction: str,
    alpha: float,
    apl_neg_BL: torch.Tensor | None = None,
    beta: float = 0.0,
) -> Parts:
    """EM; with `apl_neg_BL`, those entries take beta * -log(1 - p) INSTEAD of the entropy term."""
    neg_BL = torch.zeros_like(pos_BL) if apl_neg_BL is None else apl_neg_BL.to(pos_BL.dtype)
    unknown_BL = 1 - pos_BL - neg_BL
    parts = {
        "pos": reduce_entries(terms_BL=pos_BL * neg_log_p(z_BL), reduction=reduction),
        "entropy": reduce_entries(terms_BL=-alpha * unknown_BL * _binary_entropy(z_BL), reduction=reduction),
    }
    if apl_neg_BL is not None:
        parts["apl"] = reduce_entries(terms_BL=beta * neg_BL * _neg_log_1mp(z_BL), reduction=reduction)
    return parts


def parts_total(parts: Parts) -> torch.Tensor:
    """The sum of the named parts, in their order (what `sum(parts.values())` adds, as a tensor)."""
    first, *rest = parts.values()
    for value in rest:
        first = first + value
    return first


def batch_mean(parts: Parts, batch_size: int) -> torch.Tensor:
    """The sum of the named parts (sums over the batch) divided by the batch size."""
    return parts_total(parts) / batch_size


# ---------------------------------------------------------------- pure functions (batch means)


def an_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Assume negative: -log p on the positive, -log(1 - p) on every other class."""
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    return batch_mean(_an_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=check_reduction(reduction)), len(z_BL))


def an_ls_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    """AN with label smoothing: BCE against targets (1 - eps) t + eps (1 - t)."""
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    parts = _an_ls_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=check_reduction(reduction), eps=_check_eps(eps))
    return batch_mean(parts, len(z_BL))


def wan_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weak assume negative: AN with the negative terms divided by L - 1."""
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    check_num_classes(z_BL.shape[1])
    return batch_mean(_wan_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=check_reduction(reduction)), len(z_BL))


def epr_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str, k: float) -> torch.Tensor:
    """-log p on the positive only, plus (mean_i sum_j p[i, j] - K)^2 / L^2 (not divided by L)."""
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    parts = _epr_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=check_reduction(reduction), k=check_k(k, z_BL.shape[1]))
    return batch_mean(parts, len(z_BL))


def em_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str, alpha: float) -> torch.Tensor:
    """Entropy maximisation: -log p on the positive, -alpha * H(p) on every other entry."""
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    parts = _em_parts(
        z_BL=z_BL, pos_BL=pos_BL, reduction=check_reduction(reduction), alpha=_check_nonnegative("alpha", alpha)
    )
    return batch_mean(parts, len(z_BL))


def apl_negative_mask(*, logits: torch.Tensor, labels: torch.Tensor, proportion: float) -> torch.Tensor:
    """B x L bool: per class, the floor(proportion * U_j + 1/2) lowest-scored of the batch's U_j unobserved entries.

    Chosen on detached scores; ties go to the lower row index, so the mask is deterministic.
    """
    z_BL, pos_BL = logits_and_positives(logits=logits.detach(), labels=labels)
    return _apl_mask(z_BL=z_BL, pos_BL=pos_BL, proportion=_check_proportion(proportion))


def _apl_mask(*, z_BL: torch.Tensor, pos_BL: torch.Tensor, proportion: float) -> torch.Tensor:
    z_BL = z_BL.detach()
    batch_size = z_BL.shape[0]
    counts = torch.tensor(_apl_counts(batch_size, proportion), device=z_BL.device)
    num_unobserved_L = batch_size - pos_BL.sum(0).long()
    num_selected_L = counts[num_unobserved_L]
    # Observed positives sort last, so the first num_selected_L rows of each column are unobserved.
    order_BL = torch.argsort(z_BL.masked_fill(pos_BL.bool(), math.inf), dim=0, stable=True)
    rank_ok_BL = torch.arange(batch_size, device=z_BL.device)[:, None] < num_selected_L[None, :]
    return torch.zeros_like(rank_ok_BL).scatter_(0, order_BL, rank_ok_BL)


@lru_cache(maxsize=64)
def _apl_counts(batch_size: int, proportion: float) -> tuple[int, ...]:
    """Number of negatives chosen out of U unobserved entries, for U = 0..B (the project's rounding rule)."""
    return tuple(round_count(n=n, k=proportion) for n in range(batch_size + 1))


def em_apl_loss(
    *, logits: torch.Tensor, labels: torch.Tensor, reduction: str, alpha: float, beta: float, neg_proportion: float
) -> torch.Tensor:
    """EM with asymmetric pseudo-labels (after warm-up): see `EmAplLoss`."""
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    neg_BL = apl_negative_mask(logits=z_BL, labels=labels, proportion=neg_proportion)
    parts = _em_parts(
        z_BL=z_BL,
        pos_BL=pos_BL,
        reduction=check_reduction(reduction),
        alpha=_check_nonnegative("alpha", alpha),
        apl_neg_BL=neg_BL,
        beta=_check_nonnegative("beta", beta),
    )
    return batch_mean(parts, len(z_BL))


# ---------------------------------------------------------------- registered modules (batch sums)


class SinglePositiveLoss(Loss):
    """A baseline trained on the multi-label head alone; its sigmoid scores are thresholded."""

    heads = ("multilabel",)
    default_score_head = "multilabel"

    def __init__(self, *, reduction: str) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        raise NotImplementedError

    def forward(
        self,
        *,
        logits: dict[str, torch.Tensor],
        labels: torch.Tensor,
        idx: torch.Tensor,
        epoch: int,
        pseudo_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        z_BL, pos_BL = logits_and_positives(logits=logits["multilabel"], labels=labels)
        parts = self.parts(z_BL=z_BL, pos_BL=pos_BL, epoch=epoch)
        return LossOutput(total_sum=parts_total(parts), parts_sum={n: v.detach() for n, v in parts.items()})


class AnLoss(SinglePositiveLoss):
    """Assume negative (Cole et al. 2021)."""

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> AnLoss:
        return cls(reduction=config.reduction)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        return _an_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction)


class AnLsLoss(SinglePositiveLoss):
    """Assume negative with label smoothing `eps` (Cole et al. 2021)."""

    def __init__(self, *, reduction: str, eps: float):
        super().__init__(reduction=reduction)
        self.eps = _check_eps(eps)

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> AnLsLoss:
        return cls(reduction=config.reduction, eps=config.eps)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        return _an_ls_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, eps=self.eps)


class WanLoss(SinglePositiveLoss):
    """Weak assume negative: negatives weighted 1 / (L - 1) (Cole et al. 2021)."""

    def __init__(self, *, reduction: str, num_classes: int):
        super().__init__(reduction=reduction)
        check_num_classes(num_classes)

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> WanLoss:
        return cls(reduction=config.reduction, num_classes=num_classes)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        return _wan_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction)


class EprLoss(SinglePositiveLoss):
    """Positive term plus the expected-positive regulariser towards `k` positives per image (Cole et al. 2021).

    The regulariser is computed on each rank's own batch.
    """

    def __init__(self, *, reduction: str, k: float, num_classes: int):
        super().__init__(reduction=reduction)
        self.k = check_k(k, check_num_classes(num_classes))

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> EprLoss:
        return cls(reduction=config.reduction, k=config.k, num_classes=num_classes)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        return _epr_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, k=self.k)


class EmLoss(SinglePositiveLoss):
    """Entropy maximisation on the unobserved entries, weight `alpha` (Zhou et al. 2022)."""

    def __init__(self, *, reduction: str, alpha: float):
        super().__init__(reduction=reduction)
        self.alpha = _check_nonnegative("alpha", alpha)

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> EmLoss:
        return cls(reduction=config.reduction, alpha=config.alpha)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        return _em_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, alpha=self.alpha)


class EmAplLoss(SinglePositiveLoss):
    """EM, plus asymmetric pseudo-labelling after `warmup_epochs` (Zhou et al. 2022).

    From epoch `warmup_epochs` on (epochs count from 0, as the engine passes them), for each
    class the `neg_proportion` share of the batch's unobserved entries with the lowest p
    (detached; rounded as floor(share * U + 1/2), so a share * U below 1/2 picks none) become
    negatives: beta * -log(1 - p) replaces their entropy term, as in the reference code.

    Differences from Zhou et al.'s code, by design: the selection is made per batch (per rank)
    from the current scores, with no global N x L table and no full pass over the training set
    after each epoch; and the target is a hard 0, because a per-batch soft target equal to the
    current detached p would give no gradient (the reference's soft target is the score frozen
    when the entry was selected, a table this variant does not keep).
    """

    def __init__(self, *, reduction: str, alpha: float, beta: float, warmup_epochs: int, neg_proportion: float):
        super().__init__(reduction=reduction)
        self.alpha = _check_nonnegative("alpha", alpha)
        self.beta = _check_nonnegative("beta", beta)
        self.warmup_epochs = _check_warmup(warmup_epochs)
        self.neg_proportion = _check_proportion(neg_proportion)

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> EmAplLoss:
        return cls(
            reduction=config.reduction,
            alpha=config.alpha,
            beta=config.beta,
            warmup_epochs=config.apl_warmup_epochs,
            neg_proportion=config.apl_neg_proportion,
        )

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        if epoch < self.warmup_epochs:
            neg_BL = torch.zeros_like(pos_BL, dtype=torch.bool)  # "apl" stays in the parts (as 0): same keys every epoch
        else:
            neg_BL = _apl_mask(z_BL=z_BL, pos_BL=pos_BL, proportion=self.neg_proportion)
        return _em_parts(
            z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, alpha=self.alpha, apl_neg_BL=neg_BL, beta=self.beta
        )
