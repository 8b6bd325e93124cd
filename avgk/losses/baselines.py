"""Single-positive multi-label baselines on one sigmoid head: AN, AN-LS, WAN, EPR, ROLE, EM, EM+APL.

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
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avgk.config import LossConfig
from avgk.losses.base import Loss, LossOutput, register_loss
from avgk.losses.two_head import reduce_entries
from avgk.thresholds import round_count

Parts = dict[str, torch.Tensor]


# ---------------------------------------------------------------- validation


def _check_reduction(reduction: str) -> str:
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


def _check_k(k: float, num_classes: int) -> float:
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


def _check_num_classes(num_classes: int) -> int:
    if num_classes < 2:
        raise ValueError(f"single-positive baselines need at least 2 classes, got num_classes={num_classes}")
    return num_classes


# ---------------------------------------------------------------- per-entry terms


def _positives(*, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits B x L and the B x L 0/1 matrix of observed positives."""
    assert logits.ndim == 2 and labels.shape == logits.shape[:1], (tuple(logits.shape), tuple(labels.shape))
    z_BL = logits.float()
    pos_BL = F.one_hot(labels.long(), z_BL.shape[1]).to(z_BL.dtype)
    return z_BL, pos_BL


def _neg_log_p(z_BL: torch.Tensor) -> torch.Tensor:
    """-log p, stable for any logit."""
    return -F.logsigmoid(z_BL)


def _neg_log_1mp(z_BL: torch.Tensor) -> torch.Tensor:
    """-log(1 - p), stable for any logit."""
    return -F.logsigmoid(-z_BL)


def _binary_entropy(z_BL: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log p - (1 - p) log(1 - p), from the logits."""
    p_BL = torch.sigmoid(z_BL)
    return p_BL * _neg_log_p(z_BL) + (1 - p_BL) * _neg_log_1mp(z_BL)


def _epr_regulariser(*, probs_BL: torch.Tensor, k: float) -> torch.Tensor:
    """(mean_i sum_j p[i, j] - K)^2 / L^2 (Cole et al.'s expected positive regulariser, L2 form)."""
    return (probs_BL.sum(1).mean() - k) ** 2 / probs_BL.shape[1] ** 2


# ---------------------------------------------------------------- losses as sums of named parts


def _an_parts(*, z_BL, pos_BL, reduction) -> Parts:
    return {
        "pos": reduce_entries(terms_BL=pos_BL * _neg_log_p(z_BL), reduction=reduction),
        "neg": reduce_entries(terms_BL=(1 - pos_BL) * _neg_log_1mp(z_BL), reduction=reduction),
    }


def _an_ls_parts(*, z_BL, pos_BL, reduction, eps) -> Parts:
    targets_BL = (1 - eps) * pos_BL + eps * (1 - pos_BL)
    bce_BL = F.binary_cross_entropy_with_logits(z_BL, targets_BL, reduction="none")
    return {"bce": reduce_entries(terms_BL=bce_BL, reduction=reduction)}


def _wan_parts(*, z_BL, pos_BL, reduction) -> Parts:
    num_classes = z_BL.shape[1]
    return {
        "pos": reduce_entries(terms_BL=pos_BL * _neg_log_p(z_BL), reduction=reduction),
        "neg": reduce_entries(terms_BL=(1 - pos_BL) * _neg_log_1mp(z_BL) / (num_classes - 1), reduction=reduction),
    }


def _epr_parts(*, z_BL, pos_BL, reduction, k) -> Parts:
    return {
        "pos": reduce_entries(terms_BL=pos_BL * _neg_log_p(z_BL), reduction=reduction),
        "reg": z_BL.shape[0] * _epr_regulariser(probs_BL=torch.sigmoid(z_BL), k=k),
    }


def _em_parts(*, z_BL, pos_BL, reduction, alpha, apl_neg_BL=None, beta=0.0) -> Parts:
    """EM; with `apl_neg_BL`, those entries take beta * -log(1 - p) INSTEAD of the entropy term."""
    neg_BL = torch.zeros_like(pos_BL) if apl_neg_BL is None else apl_neg_BL.to(pos_BL.dtype)
    unknown_BL = 1 - pos_BL - neg_BL
    parts = {
        "pos": reduce_entries(terms_BL=pos_BL * _neg_log_p(z_BL), reduction=reduction),
        "entropy": reduce_entries(terms_BL=-alpha * unknown_BL * _binary_entropy(z_BL), reduction=reduction),
    }
    if apl_neg_BL is not None:
        parts["apl"] = reduce_entries(terms_BL=beta * neg_BL * _neg_log_1mp(z_BL), reduction=reduction)
    return parts


def _role_parts(*, z_BL, u_BL, pos_BL, reduction, k) -> Parts:
    """Classifier (logits z) and estimator (table logits u), each trained on the other's detached output.

    "classifier" depends on z only and "estimator" on u only, each weighted one half.
    """
    batch_size = z_BL.shape[0]
    p_BL, q_BL = torch.sigmoid(z_BL), torch.sigmoid(u_BL)

    def side(own_BL, own_probs_BL, other_probs_BL):
        cross_BL = F.binary_cross_entropy_with_logits(own_BL, other_probs_BL.detach(), reduction="none")
        entries = reduce_entries(terms_BL=pos_BL * _neg_log_p(own_BL) + cross_BL, reduction=reduction)
        return 0.5 * (entries + batch_size * _epr_regulariser(probs_BL=own_probs_BL, k=k))

    return {"classifier": side(z_BL, p_BL, q_BL), "estimator": side(u_BL, q_BL, p_BL)}


def _batch_mean(parts: Parts, batch_size: int) -> torch.Tensor:
    return sum(parts.values()) / batch_size


# ---------------------------------------------------------------- pure functions (batch means)


def an_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Assume negative: -log p on the positive, -log(1 - p) on every other class."""
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    return _batch_mean(_an_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=_check_reduction(reduction)), len(z_BL))


def an_ls_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    """AN with label smoothing: BCE against targets (1 - eps) t + eps (1 - t)."""
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    parts = _an_ls_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=_check_reduction(reduction), eps=_check_eps(eps))
    return _batch_mean(parts, len(z_BL))


def wan_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weak assume negative: AN with the negative terms divided by L - 1."""
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    _check_num_classes(z_BL.shape[1])
    return _batch_mean(_wan_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=_check_reduction(reduction)), len(z_BL))


def epr_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str, k: float) -> torch.Tensor:
    """-log p on the positive only, plus (mean_i sum_j p[i, j] - K)^2 / L^2 (not divided by L)."""
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    parts = _epr_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=_check_reduction(reduction), k=_check_k(k, z_BL.shape[1]))
    return _batch_mean(parts, len(z_BL))


def em_loss(*, logits: torch.Tensor, labels: torch.Tensor, reduction: str, alpha: float) -> torch.Tensor:
    """Entropy maximisation: -log p on the positive, -alpha * H(p) on every other entry."""
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    parts = _em_parts(
        z_BL=z_BL, pos_BL=pos_BL, reduction=_check_reduction(reduction), alpha=_check_nonnegative("alpha", alpha)
    )
    return _batch_mean(parts, len(z_BL))


def apl_negative_mask(*, logits: torch.Tensor, labels: torch.Tensor, proportion: float) -> torch.Tensor:
    """B x L bool: per class, the floor(proportion * U_j + 1/2) lowest-scored of the batch's U_j unobserved entries.

    Chosen on detached scores; ties go to the lower row index, so the mask is deterministic.
    """
    z_BL, pos_BL = _positives(logits=logits.detach(), labels=labels)
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
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    neg_BL = apl_negative_mask(logits=z_BL, labels=labels, proportion=neg_proportion)
    parts = _em_parts(
        z_BL=z_BL,
        pos_BL=pos_BL,
        reduction=_check_reduction(reduction),
        alpha=_check_nonnegative("alpha", alpha),
        apl_neg_BL=neg_BL,
        beta=_check_nonnegative("beta", beta),
    )
    return _batch_mean(parts, len(z_BL))


def role_loss(
    *, logits: torch.Tensor, estimate_logits: torch.Tensor, labels: torch.Tensor, reduction: str, k: float
) -> torch.Tensor:
    """ROLE on one batch: classifier logits and the batch's rows of the label-estimate table (both B x L).

    Gradients reach `logits` from the classifier half and `estimate_logits` from the estimator half only.
    """
    z_BL, pos_BL = _positives(logits=logits, labels=labels)
    assert estimate_logits.shape == z_BL.shape, (tuple(estimate_logits.shape), tuple(z_BL.shape))
    parts = _role_parts(
        z_BL=z_BL,
        u_BL=estimate_logits.float(),
        pos_BL=pos_BL,
        reduction=_check_reduction(reduction),
        k=_check_k(k, z_BL.shape[1]),
    )
    return _batch_mean(parts, len(z_BL))


# ---------------------------------------------------------------- registered modules (batch sums)


class SinglePositiveLoss(Loss):
    """A baseline trained on the multi-label head alone; its sigmoid scores are thresholded."""

    heads = ("multilabel",)
    default_score_head = "multilabel"

    def __init__(self, *, reduction: str):
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def parts(self, *, z_BL: torch.Tensor, pos_BL: torch.Tensor, epoch: int) -> Parts:
        raise NotImplementedError

    def forward(self, *, logits, labels, idx, epoch, pseudo_targets=None) -> LossOutput:
        z_BL, pos_BL = _positives(logits=logits["multilabel"], labels=labels)
        parts = self.parts(z_BL=z_BL, pos_BL=pos_BL, epoch=epoch)
        return LossOutput(total_sum=sum(parts.values()), parts_sum={n: v.detach() for n, v in parts.items()})


@register_loss("an")
class AnLoss(SinglePositiveLoss):
    """Assume negative (Cole et al. 2021)."""

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "AnLoss":
        return cls(reduction=config.reduction)

    def parts(self, *, z_BL, pos_BL, epoch):
        return _an_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction)


@register_loss("an_ls")
class AnLsLoss(SinglePositiveLoss):
    """Assume negative with label smoothing `eps` (Cole et al. 2021)."""

    def __init__(self, *, reduction: str, eps: float):
        super().__init__(reduction=reduction)
        self.eps = _check_eps(eps)

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "AnLsLoss":
        return cls(reduction=config.reduction, eps=config.eps)

    def parts(self, *, z_BL, pos_BL, epoch):
        return _an_ls_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, eps=self.eps)


@register_loss("wan")
class WanLoss(SinglePositiveLoss):
    """Weak assume negative: negatives weighted 1 / (L - 1) (Cole et al. 2021)."""

    def __init__(self, *, reduction: str, num_classes: int):
        super().__init__(reduction=reduction)
        _check_num_classes(num_classes)

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "WanLoss":
        return cls(reduction=config.reduction, num_classes=num_classes)

    def parts(self, *, z_BL, pos_BL, epoch):
        return _wan_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction)


@register_loss("epr")
class EprLoss(SinglePositiveLoss):
    """Positive term plus the expected-positive regulariser towards `k` positives per image (Cole et al. 2021).

    The regulariser is computed on each rank's own batch.
    """

    def __init__(self, *, reduction: str, k: float, num_classes: int):
        super().__init__(reduction=reduction)
        self.k = _check_k(k, _check_num_classes(num_classes))

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "EprLoss":
        return cls(reduction=config.reduction, k=config.k, num_classes=num_classes)

    def parts(self, *, z_BL, pos_BL, epoch):
        return _epr_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, k=self.k)


@register_loss("em")
class EmLoss(SinglePositiveLoss):
    """Entropy maximisation on the unobserved entries, weight `alpha` (Zhou et al. 2022)."""

    def __init__(self, *, reduction: str, alpha: float):
        super().__init__(reduction=reduction)
        self.alpha = _check_nonnegative("alpha", alpha)

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "EmLoss":
        return cls(reduction=config.reduction, alpha=config.alpha)

    def parts(self, *, z_BL, pos_BL, epoch):
        return _em_parts(z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, alpha=self.alpha)


@register_loss("em_apl")
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
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "EmAplLoss":
        return cls(
            reduction=config.reduction,
            alpha=config.alpha,
            beta=config.beta,
            warmup_epochs=config.apl_warmup_epochs,
            neg_proportion=config.apl_neg_proportion,
        )

    def parts(self, *, z_BL, pos_BL, epoch):
        if epoch < self.warmup_epochs:
            neg_BL = torch.zeros_like(pos_BL, dtype=torch.bool)  # "apl" stays in the parts (as 0): same keys every epoch
        else:
            neg_BL = _apl_mask(z_BL=z_BL, pos_BL=pos_BL, proportion=self.neg_proportion)
        return _em_parts(
            z_BL=z_BL, pos_BL=pos_BL, reduction=self.reduction, alpha=self.alpha, apl_neg_BL=neg_BL, beta=self.beta
        )


# ---------------------------------------------------------------- ROLE

ROLE_TABLE_DEVICES = ("model", "cpu", "memmap")
_ROLE_INIT_HALF_WIDTH = math.log(0.6 / 0.4)  # unobserved entries start at logits U(-w, w): p in [0.4, 0.6]
_ROLE_INIT_POSITIVE = math.log(0.995 / 0.005)  # observed positives start at p = 0.995
_ROLE_INIT_CHUNK_ROWS = 1 << 16


@register_loss("role")
class RoleLoss(SinglePositiveLoss):
    """Regularised online label estimation (Cole et al. 2021) with an N x L table of label-estimate logits.

    The table `table_NL` (float32, rows indexed by the shard `idx`) is a registered buffer, so it
    is saved and restored with `loss.state_dict()`; `seen_N` marks rows already visited. Memory:
    4 * N * L bytes, 4.32 GB (4.03 GiB) per million samples at L = 1,081 (Pl@ntNet-300K's
    243,916 x 1,081 table: 1.05 GB), plus N bytes for `seen_N`. Checkpoints hold it too.

    Where it lives (`table_device`): 'model' follows the module (`loss.to(device)`), 'cpu' stays
    in host RAM whatever `.to()` is called, 'memmap' is a CPU tensor over an np.memmap file at
    `table_path` (one file per rank: the ranks must not share it), rewritten at construction.

    Initialisation as in the reference code: logits uniform in [-logit(0.6), logit(0.6)], drawn
    from a generator seeded with `torch.initial_seed()` (so the global RNG stream, and hence the
    model's initial weights, are the same as for other losses); the observed positive is set to
    logit(0.995) the first time a row is seen (labels are not known before), which equals the
    reference's up-front initialisation because nothing touches a row before its first visit.

    Update: inside `forward`, in training mode with grad enabled, the batch's rows take one
    plain SGD step of size `lr` on the gradient of the estimator's part of `total_sum` (the
    per-sample loss, not divided by B; multiplied by L under reduction='mean' so that `lr`
    means the same under both reductions). Only the batch's rows are read and written, no
    optimizer state is kept, and the model's optimizer never sees the table. (The reference
    code runs Adam on the dense table; Adam would move every row at every step.) If an `idx`
    repeats within a batch, one of its updates wins.
    """

    stateful = True

    def __init__(
        self,
        *,
        reduction: str,
        k: float,
        lr: float,
        num_classes: int,
        num_train: int,
        table_device: str = "model",
        table_path: str | None = None,
    ):
        super().__init__(reduction=reduction)
        self.k = _check_k(k, _check_num_classes(num_classes))
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"loss.role_lr must be a finite number > 0, got {lr}")
        if num_train < 1:
            raise ValueError(f"role needs num_train >= 1 training samples, got {num_train}")
        if table_device not in ROLE_TABLE_DEVICES:
            raise ValueError(f"loss.role_table_device must be one of {', '.join(ROLE_TABLE_DEVICES)}, got {table_device!r}")
        if (table_device == "memmap") != (table_path is not None):
            raise ValueError(
                "loss.role_table_path must be set exactly when loss.role_table_device is 'memmap', got "
                f"role_table_device={table_device!r} role_table_path={table_path!r}"
            )
        self.lr = lr
        self.num_classes = num_classes
        self.num_train = num_train
        self.table_device = table_device
        self.table_path = table_path
        self.register_buffer("table_NL", self._initial_table(), persistent=True)
        self.register_buffer("seen_N", torch.zeros(num_train, dtype=torch.bool), persistent=True)

    @classmethod
    def from_config(cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts=None) -> "RoleLoss":
        return cls(
            reduction=config.reduction,
            k=config.k,
            lr=config.role_lr,
            num_classes=num_classes,
            num_train=num_train,
            table_device=config.role_table_device,
            table_path=config.role_table_path,
        )

    def _initial_table(self) -> torch.Tensor:
        shape = (self.num_train, self.num_classes)
        if self.table_device == "memmap":
            path = Path(self.table_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._memmap = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
            table_NL = torch.from_numpy(self._memmap)
        else:
            table_NL = torch.empty(shape, dtype=torch.float32)
        generator = torch.Generator().manual_seed(torch.initial_seed())
        for start in range(0, self.num_train, _ROLE_INIT_CHUNK_ROWS):
            rows = min(_ROLE_INIT_CHUNK_ROWS, self.num_train - start)
            uniform = torch.rand(rows, self.num_classes, generator=generator)
            table_NL[start : start + rows] = _ROLE_INIT_HALF_WIDTH * (2 * uniform - 1)
        return table_NL

    def _apply(self, fn, recurse=True):
        # 'cpu' and 'memmap' tables stay where they are (and float32) whatever `.to()`/`.cuda()` does.
        if self.table_device == "model":
            return super()._apply(fn, recurse)
        kept = {name: self._buffers.pop(name) for name in ("table_NL", "seen_N")}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    def checked_idx(self, idx: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`idx` as int64 on the table's device, after checking it holds B sample ids in [0, N)."""
        if idx.shape != (batch_size,) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(
                f"role needs idx as {batch_size} integer sample ids, got shape {tuple(idx.shape)} dtype {idx.dtype}"
            )
        idx_B = idx.to(self.table_NL.device, torch.int64)
        low, high = int(idx_B.min()), int(idx_B.max())
        if low < 0 or high >= self.num_train:
            raise ValueError(
                f"role needs every idx in [0, num_train={self.num_train}) (a stable id per training sample), "
                f"got min {low} max {high}"
            )
        return idx_B

    def read_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """A copy of the table's rows `idx` (B x L float32, on the table's device): what a rank sends to the others."""
        return self.table_NL[idx.to(self.table_NL.device, torch.int64)].clone()

    @torch.no_grad()
    def write_rows(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite rows `idx` with `rows` and mark them seen: how a rank takes the other ranks' updates."""
        idx_B = self.checked_idx(idx, idx.shape[0])
        self.table_NL[idx_B] = rows.to(self.table_NL.device, torch.float32)
        self.seen_N[idx_B] = True

    def forward(self, *, logits, labels, idx, epoch, pseudo_targets=None) -> LossOutput:
        z_BL, pos_BL = _positives(logits=logits["multilabel"], labels=labels)
        batch_size, num_classes = z_BL.shape
        assert num_classes == self.num_classes, (num_classes, self.num_classes)
        idx_B = self.checked_idx(idx, batch_size)
        with torch.no_grad():
            new_B = ~self.seen_N[idx_B]
            if new_B.any():
                labels_B = labels.to(idx_B.device, torch.int64)
                self.table_NL[idx_B[new_B], labels_B[new_B]] = _ROLE_INIT_POSITIVE
                self.seen_N[idx_B[new_B]] = True
        u_BL = self.table_NL[idx_B].to(z_BL.device)
        step = self.training and torch.is_grad_enabled()
        u_BL.requires_grad_(step)
        parts = _role_parts(z_BL=z_BL, u_BL=u_BL, pos_BL=pos_BL, reduction=self.reduction, k=self.k)
        if step:
            scale = num_classes if self.reduction == "mean" else 1
            (grad_BL,) = torch.autograd.grad(parts["estimator"] * scale, u_BL)
            with torch.no_grad():
                self.table_NL[idx_B] = (u_BL - self.lr * grad_BL).to(self.table_NL.device)
        estimator = parts["estimator"].detach()
        return LossOutput(
            total_sum=parts["classifier"] + estimator,
            parts_sum={"classifier": parts["classifier"].detach(), "estimator": estimator},
        )
