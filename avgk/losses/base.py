"""The loss interface and the registry that picks a loss by name from the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from avgk.config import LossConfig


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


LossBuilder = Callable[..., Loss]
LOSSES: dict[str, LossBuilder] = {}


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    def wrap(builder: LossBuilder) -> LossBuilder:
        assert name not in LOSSES, f"loss {name!r} registered twice"
        LOSSES[name] = builder
        return builder

    return wrap


def loss_class(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss.name {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]  # type: ignore[return-value]


def build_loss(config: LossConfig, *, num_classes: int, num_train: int) -> Loss:
    """The loss named by `config.name`, its knobs validated against L and N."""
    return loss_class(config.name).from_config(config, num_classes=num_classes, num_train=num_train)  # type: ignore[attr-defined]


def score_head_for(config: LossConfig) -> str:
    """The head thresholded for average-K: the configured one, else the loss's default."""
    cls = loss_class(config.name)
    head = config.score_head or cls.default_score_head
    if head not in cls.heads:
        raise ValueError(f"loss.score_head={head!r} but loss {config.name!r} trains only {list(cls.heads)}")
    return head


def head_scores(logits: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """Scores of one head: softmax probabilities, or sigmoid outputs of the multi-label head."""
    if head == "softmax":
        return torch.softmax(logits["softmax"].float(), dim=1)
    if head == "multilabel":
        return torch.sigmoid(logits["multilabel"].float())
    raise ValueError(f"unknown score head {head!r}; known: softmax, multilabel")
