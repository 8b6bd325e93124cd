"""The train section: optimiser and its defaults, schedule, learning-rate groups, distribution, regularisers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from avgk.config.base import Section

OPTIMIZER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05}, "sgd": {"lr": 0.05, "weight_decay": 5e-4}}
"""train.lr and train.weight_decay when a config leaves them out, by optimizer."""

TWO_HEAD_ML_LR_SCALE = 30.0
"""train.lr_scale.multilabel when left out and loss.name=two_head: with the BCE averaged over classes
the multi-label head needs a faster learning rate than the backbone (docs/RESULTS.md: the recipe, and
the multiplier sweep 1, 3, 10, 30, where 30 was best or tied on both data sets)."""


class LrScaleConfig(Section):
    """Learning-rate multipliers per parameter group (times train.lr and its schedule)."""

    backbone: float = Field(1.0, ge=0, description="shared feature extractor (0 freezes it)")
    softmax: float = Field(1.0, gt=0, description="softmax (cross-entropy) head")
    multilabel: float | None = Field(
        None,
        gt=0,
        description=f"multi-label (sigmoid) head; default: {TWO_HEAD_ML_LR_SCALE:g} with loss.name=two_head, else 1 "
        "(the single-head losses train this head alone); the default was measured with AdamW only: with SGD "
        "and loss.ml_reduction=mean the head needs about L x (docs/RESULTS.md)",
    )


class TrainConfig(Section):
    """Optimisation and distribution."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1, description="GLOBAL batch size, split evenly over num_workers")
    lr: float = Field(  # type: ignore[assignment]  # None only until _optimizer_defaults (mode="before") fills it
        None, gt=0, description="peak learning rate; default by optimizer: adamw 2e-3, sgd 0.05"
    )
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="AdamW (decoupled decay), or SGD with momentum")
    lr_scale: LrScaleConfig = Field(default_factory=LrScaleConfig)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw: moment decay rates, each in [0, 1)")
    nesterov: bool = False
    weight_decay: float = Field(  # type: ignore[assignment]  # None only until _optimizer_defaults fills it
        None, ge=0, description="default by optimizer: adamw 0.05, sgd 5e-4 (never on biases and norms)"
    )
    schedule: Literal["constant", "step", "cosine"] = Field("cosine", description="per-step lr schedule")
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up length, epochs (fractions allowed)")
    grad_clip: float | None = Field(None, gt=0, description="clip global grad norm to this")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast dtype (GPU; bf16 also on CPU)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    extra_resources: dict[str, float] = Field(
        default_factory=dict, description="more Ray resources per worker, e.g. a custom node resource to pin workers"
    )
    seed: int = 0
    max_failures: int = Field(
        2, ge=-1,
        description="Ray Train restarts after a worker dies (a killed rank, a lost node, a dead DataLoader "
        "worker), each from the last checkpoint; -1 = unlimited, 0 = fail at once",
    )
    log_every: int = Field(20, ge=1, description="print progress every N steps")
    grad_accumulation: int = Field(
        1, ge=1,
        description="take an optimizer step every N batches: the effective batch is batch_size x N (batch_size "
        "stays the batch of one forward pass, over all workers); the lr schedule and warm-up count optimizer steps",
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="keep an exponential moving average of the weights (and BN statistics), updated at each "
        "optimizer step with this decay (e.g. 0.999); validation, the best checkpoint, the final evaluation "
        "and the logged model then use the averaged weights; 0 = off",
    )
    mixup_alpha: float = Field(
        0.0, ge=0, description="mixup: Beta(alpha, alpha) mixing of image pairs and their labels; loss.name=ce only; 0 = off"
    )
    cutmix_alpha: float = Field(
        0.0, ge=0,
        description="cutmix: a Beta(alpha, alpha)-sized patch of another image, labels mixed by area; loss.name=ce "
        "only; with mixup_alpha too, each batch takes one of the two at random; 0 = off",
    )

    @model_validator(mode="before")
    @classmethod
    def _optimizer_defaults(cls, data: Any) -> Any:
        """lr and weight decay left out (or null) take the optimizer's defaults, written into the config."""
        if isinstance(data, dict):
            defaults = OPTIMIZER_DEFAULTS.get(data.get("optimizer", "adamw"), {})
            data = {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must both lie in [0, 1), got {list(self.betas)}")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.num_workers ({self.num_workers})"
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"train.warmup_epochs={self.warmup_epochs:g} must be <= train.epochs={self.epochs}: "
                "the learning rate would never reach train.lr"
            )
        bad = [m for m in self.milestones if not 0 < m < self.epochs]
        if bad or self.milestones != sorted(self.milestones):
            raise ValueError(
                f"train.milestones must be increasing epochs in (0, {self.epochs}), got {self.milestones}"
            )
        return self
