"""ROLE (Cole et al., CVPR 2021; docs/METHOD.md section 4): a classifier and a per-sample table of
label-estimate logits (N x L) trained together, and where that table lives (on the model's
device, in host RAM, or in a memory-mapped file for tables larger than RAM).

Legend: B batch size, L classes, N training samples; z logits, u estimate logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avgk.config import LossConfig
from avgk.method.losses.base import LossOutput
from avgk.method.losses.baselines import (
    Parts,
    SinglePositiveLoss,
    batch_mean,
    check_k,
    check_num_classes,
    check_reduction,
    epr_regulariser,
    logits_and_positives,
    neg_log_p,
)
from avgk.method.losses.two_head import reduce_entries


def _role_parts(
    *, z_BL: torch.Tensor, u_BL: torch.Tensor, pos_BL: torch.Tensor, reduction: str, k: float
) -> Parts:
    """Classifier (logits z) and estimator (table logits u), each trained on the other's detached output.

    "classifier" depends on z only and "estimator" on u only, each weighted one half.
    """
    batch_size = z_BL.shape[0]
    p_BL, q_BL = torch.sigmoid(z_BL), torch.sigmoid(u_BL)

    def side(own_BL: torch.Tensor, own_probs_BL: torch.Tensor, other_probs_BL: torch.Tensor) -> torch.Tensor:
        cross_BL = F.binary_cross_entropy_with_logits(own_BL, other_probs_BL.detach(), reduction="none")
        entries = reduce_entries(terms_BL=pos_BL * neg_log_p(own_BL) + cross_BL, reduction=reduction)
        return 0.5 * (entries + batch_size * epr_regulariser(probs_BL=own_probs_BL, k=k))

    return {"classifier": side(z_BL, p_BL, q_BL), "estimator": side(u_BL, q_BL, p_BL)}


def role_loss(
    *, logits: torch.Tensor, estimate_logits: torch.Tensor, labels: torch.Tensor, reduction: str, k: float
) -> torch.Tensor:
    """ROLE on one batch: classifier logits and the batch's rows of the label-estimate table (both B x L).

    Gradients reach `logits` from the classifier half and `estimate_logits` from the estimator half only.
    """
    z_BL, pos_BL = logits_and_positives(logits=logits, labels=labels)
    assert estimate_logits.shape == z_BL.shape, (tuple(estimate_logits.shape), tuple(z_BL.shape))
    parts = _role_parts(
        z_BL=z_BL,
        u_BL=estimate_logits.float(),
        pos_BL=pos_BL,
        reduction=check_reduction(reduction),
        k=check_k(k, z_BL.shape[1]),
    )
    return batch_mean(parts, len(z_BL))


# ---------------------------------------------------------------- ROLE

ROLE_TABLE_DEVICES = ("model", "cpu", "memmap")
_ROLE_INIT_HALF_WIDTH = math.log(0.6 / 0.4)  # unobserved entries start at logits U(-w, w): p in [0.4, 0.6]
_ROLE_INIT_POSITIVE = math.log(0.995 / 0.005)  # observed positives start at p = 0.995
_ROLE_INIT_CHUNK_ROWS = 1 << 16


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
    table_NL: torch.Tensor  # buffers (register_buffer below)
    seen_N: torch.Tensor

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
    ) -> None:
        super().__init__(reduction=reduction)
        self.k = check_k(k, check_num_classes(num_classes))
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
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> RoleLoss:
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
            assert self.table_path is not None  # checked in __init__
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

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RoleLoss:
        # 'cpu' and 'memmap' tables stay where they are (and float32) whatever `.to()`/`.cuda()` does.
        # nn.Module._apply by name: mypy's untyped_calls_exclude covers torch's unannotated methods
        # called that way, not through super() (no class between RoleLoss and nn.Module defines it)
        if self.table_device == "model":
            moved: RoleLoss = nn.Module._apply(self, fn, recurse)
            return moved
        kept = {name: self._buffers.pop(name) for name in ("table_NL", "seen_N")}
        try:
            moved = nn.Module._apply(self, fn, recurse)
            return moved
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
