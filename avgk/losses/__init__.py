"""Training losses, chosen by name from the config (`loss.name`)."""

from avgk.losses.base import LOSSES, Loss, LossOutput, build_loss, head_scores, loss_class, register_loss, score_head_for
from avgk.losses import two_head  # noqa: F401  (registers ce, two_head)

__all__ = [
    "LOSSES",
    "Loss",
    "LossOutput",
    "build_loss",
    "head_scores",
    "loss_class",
    "register_loss",
    "score_head_for",
]
