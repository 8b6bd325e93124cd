"""The model and loss sections: backbone family and weights, the two heads, the loss chosen by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from avgk.config.base import Section
from avgk.config.registry import LOSSES

FUSED_HEADS = ("softmax", "multilabel")
"""The heads a 'fused' score combines (their geometric mean)."""


def scoreable_heads(heads: Sequence[str]) -> tuple[str, ...]:
    """The scores a model with these trained heads gives: each head's, and 'fused' when it has both."""
    return (*heads, *(("fused",) if set(FUSED_HEADS) <= set(heads) else ()))


class ModelConfig(Section):
    """Backbone and the two heads (docs/METHOD.md section 3)."""

    backbone: str = Field(
        "small_cnn",
        description="'small_cnn', 'timm:<name>' or 'torchvision:<name>' (e.g. timm:resnet50)",
    )
    pretrained: str | None = Field(
        None,
        description="backbone weights from local disk or object storage (s3://...), never downloaded: a "
        "timm/torchvision state dict file, an avgk checkpoint file, or an avgk run directory (its best checkpoint); "
        "the heads start fresh",
    )
    width: int = Field(16, ge=4, description="small_cnn base channel count")
    channels_last: bool = Field(
        True,
        description="channels_last (NHWC) memory format for the model and its input batches: faster convolutions "
        "on CPU (oneDNN; BENCHMARKS.md, channels_last) "
        "and on GPU tensor cores",
    )
    compile: bool = Field(False, description="torch.compile the model")


class LossConfig(Section):
    """The training objective, chosen by name from the loss registry."""

    name: str = Field("two_head", description="registered loss name (avgk.config.registry.LOSSES)")
    k: float = Field(2.0, gt=0, description="the K targeted (sets of K labels on average)")
    pseudo_k: float | None = Field(None, description="K_pl of the pseudo-label rule; default: k; must be >= 1")
    ml_weight: float = Field(1.0, ge=0, description="mu: weight of the multi-label BCE term")
    ml_reduction: Literal["sum", "mean"] = Field(
        "mean",
        description="BCE over classes: 'mean' over the L classes (then over the batch), or 'sum' over classes "
        "(the backbone then gets a BCE gradient up to L times the CE's)",
    )
    pseudo_warmup_epochs: int = Field(0, ge=0, description="epochs with the multi-label term off")
    ml_stop_gradient: bool = Field(
        False,
        description="two_head: the multi-label head trains on detached features, so its BCE never reaches "
        "the shared backbone (the backbone learns from the CE alone)",
    )
    pseudo_prior_tau: float = Field(
        0.0,
        ge=0,
        description="two_head: pseudo-labels are selected on p(j|x) / pi_j^tau (pi: training class frequencies), "
        "so the extra positives do not go to frequent classes by default; 0 = the paper's rule",
    )
    pseudo_labels: Literal["online", "offline"] = Field(
        "online", description="per-batch pseudo-labels, or the global table from `avgk pseudolabel`"
    )
    refresh_epochs: int = Field(1, ge=1, description="offline mode: recompute global pseudo-labels every R epochs")
    score_head: Literal["multilabel", "softmax", "fused"] | None = Field(
        None,
        description="scores thresholded for average-K: a head's own, or 'fused' (two_head: geometric mean of "
        "the softmax and sigmoid scores); default: the loss's own head",
    )
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="baselines: sum over classes + mean over batch, or mean over all entries"
    )
    eps: float = Field(0.1, ge=0, lt=1, description="an_ls: label smoothing coefficient")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="ce and two_head: label smoothing of the softmax cross-entropy (two_head's pseudo-labels still "
        "come from the softmax and its multi-label targets stay 0/1)",
    )
    alpha: float = Field(0.1, ge=0, description="em/em_apl: entropy weight")
    beta: float = Field(1.0, ge=0, description="em_apl: weight of the negative pseudo-labels")
    apl_warmup_epochs: int = Field(1, ge=0, description="em_apl: epochs before pseudo-labelling starts")
    apl_neg_proportion: float = Field(
        0.01, gt=0, le=1, description="em_apl: share of unobserved entries pseudo-labelled negative per class"
    )
    role_lr: float = Field(
        1.0,
        gt=0,
        description="role: SGD step size of the label-estimate table (per-sample gradient, not divided by the batch size)",
    )
    role_table_device: Literal["model", "cpu", "memmap"] = Field(
        "model",
        description="role: where the N x L float32 table lives: with the loss on the model's device, in CPU RAM, "
        "or in a memory-mapped file at role_table_path (4 * N * L bytes: 4.3 GB per million samples at L=1081)",
    )
    role_table_path: str | None = Field(
        None, description="role: file of the memory-mapped table (role_table_device=memmap only; one file per rank)"
    )

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        LOSSES.check(self.name)
        if self.pseudo_k is not None and self.pseudo_k < 1:
            raise ValueError(f"loss.pseudo_k must be >= 1, got {self.pseudo_k}")
        two_head_only = {
            "loss.ml_stop_gradient": self.ml_stop_gradient,
            "loss.pseudo_prior_tau": self.pseudo_prior_tau,
            "loss.score_head=fused": self.score_head == "fused",
        }
        for key, value in two_head_only.items():
            if value and self.name != "two_head":
                raise ValueError(f"{key} applies to loss.name=two_head only, got loss.name={self.name!r}")
        if self.pseudo_prior_tau and self.pseudo_labels == "offline":
            raise ValueError(
                f"loss.pseudo_prior_tau={self.pseudo_prior_tau} applies to online pseudo-labels only, "
                "got loss.pseudo_labels='offline'"
            )
        if self.pseudo_labels == "offline" and self.name != "two_head":
            raise ValueError(
                "loss.pseudo_labels=offline needs loss.name=two_head (the loss that takes pseudo-labels), "
                f"got loss.name={self.name!r}"
            )
        if self.label_smoothing and self.name not in ("ce", "two_head"):
            raise ValueError(
                f"loss.label_smoothing applies to the softmax cross-entropy of loss.name=ce or two_head, got "
                f"loss.name={self.name!r} (an_ls has its own: loss.eps)"
            )
        if (self.role_table_device == "memmap") != (self.role_table_path is not None):
            raise ValueError(
                "loss.role_table_path must be set exactly when loss.role_table_device is 'memmap', got "
                f"role_table_device={self.role_table_device!r} role_table_path={self.role_table_path!r}"
            )
        return self

    @property
    def effective_pseudo_k(self) -> float:
        return self.k if self.pseudo_k is None else self.pseudo_k
