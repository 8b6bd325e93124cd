"""Training losses, chosen by name from the config (`loss.name`)."""

from avgk.losses.base import LOSSES, Loss, LossOutput, build_loss, head_scores, loss_class, register_loss, score_head_for
from avgk.losses import two_head  # noqa: F401  (registers ce, two_head)
from avgk.losses.baselines import (  # registers an, an_ls, wan, epr, em, em_apl
    an_loss,
    an_ls_loss,
    apl_negative_mask,
    em_apl_loss,
    em_loss,
    epr_loss,
    wan_loss,
)
from avgk.losses.role import role_loss  # registers role

__all__ = [
    "LOSSES",
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
    "register_loss",
    "role_loss",
    "score_head_for",
    "wan_loss",
]
