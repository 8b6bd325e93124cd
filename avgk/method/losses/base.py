"""The loss interface, and building the loss a config names (the names: avgk.config.registry.LOSSES)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from avgk.config import LOSSES, LossConfig
from avgk.config.model import scoreable_heads


@dataclass
class LossOutput:
    """Sums over the batch (never means): the trainer divides once by the sample count."""

    total_sum: torch.Tensor
    parts_sum: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(nn.Module):
    """A training objective over the model's head logits.

    `heads` names the heads the model must build; `default_score_head` is the head whose
    scores are thresholded for average-K unless `loss.score_head` says otherwise.
    `stateful` losses hold per-sample tables (indexed by the shard `idx`) and are saved
    with the checkpoint.
    """

    heads: ClassVar[tuple[str, ...]] = ("softmax", "multilabel")
    default_score_head: ClassVar[str] = "multilabel"
    stateful: ClassVar[bool] = False

    def forward(
        self,
        *,
        logits: dict[str, torch.Tensor],
        labels: torch.Tensor,
        idx: torch.Tensor,
        epoch: int,
        pseudo_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        raise NotImplementedError

    def read_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """A `stateful` loss's rows `idx` of its per-sample table: what a rank sends to the others."""
        raise NotImplementedError

    def write_rows(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """A `stateful` loss takes the other ranks' rows `idx` of its per-sample table."""
        raise NotImplementedError

    @classmethod
    def from_config(
        cls, config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
    ) -> Loss:
        """The loss for `config`, its knobs validated against L (num_classes) and N (num_train)."""
        raise NotImplementedError


def loss_class(name: str) -> type[Loss]:
    """The loss class registered as `name` (avgk.config.registry.LOSSES); ValueError naming the known ones."""
    cls: type[Loss] = LOSSES.get(name)
    return cls


def build_loss(
    config: LossConfig, *, num_classes: int, num_train: int, class_counts: Sequence[int] | None = None
) -> Loss:
    """The loss named by `config.name`, its knobs validated against L and N.

    `class_counts` are the training split's per-class counts (the manifest's), for losses that
    use the class prior; a loss that needs them and gets none raises.
    """
    return loss_class(config.name).from_config(
        config, num_classes=num_classes, num_train=num_train, class_counts=class_counts
    )


def score_head_for(config: LossConfig) -> str:
    """The scores thresholded for average-K: the configured ones, else the loss's default head."""
    cls = loss_class(config.name)
    head = config.score_head or cls.default_score_head
    if head not in scoreable_heads(cls.heads):
        raise ValueError(f"loss.score_head={head!r} but loss {config.name!r} trains only {list(cls.heads)}")
    return head


def head_scores(logits: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """Scores of one head (softmax probabilities or the multi-label head's sigmoids), or 'fused':
    the geometric mean of the two, sqrt(p_softmax * p_sigmoid), computed in log space."""
    if head == "softmax":
        return torch.softmax(logits["softmax"].float(), dim=1)
    if head == "multilabel":
        return torch.sigmoid(logits["multilabel"].float())
    if head == "fused":
        log_p = torch.log_softmax(logits["softmax"].float(), dim=1)
        log_q = torch.nn.functional.logsigmoid(logits["multilabel"].float())
        return torch.exp(0.5 * (log_p + log_q))
    raise ValueError(f"unknown score head {head!r}; known: softmax, multilabel, fused")
