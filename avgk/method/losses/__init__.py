"""Training losses, chosen by name from the config (`loss.name`, avgk.config.registry.LOSSES).
Part of avgk.method (layer 5): may import the rest of avgk.method, avgk.data, avgk.records, avgk.config
and avgk.runtime, nothing above them.
"""

from avgk.method.losses.base import Loss, LossOutput, build_loss, head_scores, loss_class, score_head_for
from avgk.method.losses.baselines import (
    an_loss,
    an_ls_loss,
    apl_negative_mask,
    em_apl_loss,
    em_loss,
    epr_loss,
    wan_loss,
)
from avgk.method.losses.role import role_loss

__all__ = [
    "Loss",
    "LossOutput",
    "an_loss",
    "an_ls_loss",
    "apl_negative_mask",
    "build_loss",
    "em_apl_loss",
    "em_loss",
    "epr_loss",
    "head_scores",
    "loss_class",
    "role_loss",
    "score_head_for",
    "wan_loss",
]
