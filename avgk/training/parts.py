"""What a training run is built from: the model, loss, optimiser and data facts the loops share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from avgk.config import Config
from avgk.data.manifest import Manifest
from avgk.method.losses import Loss

Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""mixup / cutmix of a batch (images, class ids) -> (images, class probabilities)."""


@dataclass
class Parts:
    """Everything a run builds from its config and the shard manifest."""

    config: Config
    manifest: Manifest
    num_classes: int
    model: nn.Module
    loss: Loss
    score_head: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    """Optimizer steps per epoch (what the lr schedule counts)."""
    device: torch.device
    train_class_counts: np.ndarray
    batches_per_epoch: int = 0
    """Loader batches per epoch: steps_per_epoch x train.grad_accumulation."""
    ema: AveragedModel | None = None
    """The weights' moving average (train.ema_decay > 0): what is validated, checkpointed as `model` and evaluated."""
    mix: Mix | None = None
    """mixup / cutmix of a batch (images, class ids) -> (images, class probabilities)."""

    @property
    def eval_model(self) -> nn.Module:
        """The network that is validated, evaluated and saved as the checkpoint's `model`."""
        return self.ema.module if self.ema is not None else self.model
