"""Typed, self-validating run configuration: YAML files plus `key.sub=value` overrides.

The defaults are the embedded demo (`avgk demo`): 100 synthetic classes, a small CNN,
a few minutes on a 2-core CPU. configs/*.yaml override them for real data sets.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from avgk import storage


class ConfigError(ValueError):
    """A configuration problem, phrased for a person: the key, the value and the rule."""


class _Section(BaseModel):
    # Unknown keys are errors (a mistyped key must fail, not be silently ignored);
    # assignment is validated so overrides applied after load obey the same rules.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """The built-in procedural data set (docs/METHOD.md: known posterior, long tail, ambiguity)."""

    num_classes: int = Field(100, ge=2, description="number of classes L")
    num_train: int = Field(12000, ge=1, description="training images")
    num_val: int = Field(3000, ge=1, description="validation images (calibration and model selection)")
    num_test: int = Field(3000, ge=1, description="test images (final metrics only)")
    image_size: int = Field(32, ge=8, description="side of the square images, pixels")
    zipf_exponent: float = Field(1.0, ge=0.0, description="class prior ∝ 1/(rank+1)^exponent; 0 = balanced")
    ambiguity_rate: float = Field(0.3, ge=0.0, le=1.0, description="fraction of images mixing 2-3 classes")
    seed: int = Field(0, description="generation seed (prototypes and samples)")


SOURCE_NAMES = ("synthetic", "imagefolder", "plantnet300k", "cifar100")
"""The sources avgk.data.sources registers, listed here so that a config validates without importing them."""


class DataConfig(_Section):
    """Where the images come from, where the shards go, and how they are read."""

    source: Literal[SOURCE_NAMES] = Field(
        "synthetic", description="input layout converted by `avgk prepare`"
    )
    root: str | None = Field(None, description="input folder of the source (not needed for synthetic)")
    shards: str = Field(
        "data/synthetic",
        description="output/input folder of WebDataset shards + manifest.json: a local path or a filesystem URI "
        "(s3://bucket/prefix, gs://..., any pyarrow filesystem) that every worker streams from; credentials and "
        "endpoint come from the environment (AWS_* variables, ~/.aws, the node's role), never from this config",
    )
    shard_maxcount: int = Field(1000, ge=1, description="samples per shard when writing")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    resize: int = Field(32, ge=8, description="eval: resize the shorter side to this")
    hflip: bool = Field(
        True,
        description="train: random horizontal flips; turn off where a mirror image is another class "
        "(digits, text, asymmetric specimens)",
    )
    crop: int = Field(32, ge=8, description="train random crop / eval center crop side")
    crop_scale: tuple[float, float] = Field(
        (0.35, 1.0),
        description="train, crop >= 64: the area range (min, max) of RandomResizedCrop, as fractions of the image",
    )
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none",
        description="train: torchvision's RandAugment (2 ops, magnitude 9) or TrivialAugmentWide after the crop",
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="input normalisation mean (RGB, pixel values in [0, 1]); default: the timm backbone's "
        "pretrained config (e.g. CLIP's), else ImageNet's",
    )
    std: tuple[float, float, float] | None = Field(
        None, description="input normalisation std (RGB, each > 0); default: as data.mean",
    )
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per training rank")
    shuffle_buffer: int = Field(1000, ge=1, description="per-worker sample shuffle buffer")
    resampled: bool = Field(False, description="draw shards with replacement (allows fewer shards than ranks x workers)")
    # --- `avgk prepare` of the image sources (imagefolder, plantnet300k, cifar100) ---
    shard_maxsize_mb: float = Field(
        0.0, ge=0, description="also start a new shard past about this many MB (0 = count only; not for synthetic)"
    )
    resize_shorter: int = Field(
        0,
        ge=0,
        description="prepare: shrink images whose shorter side exceeds this to exactly this many pixels (aspect kept) "
        "and re-encode them as JPEG; never enlarges; 0 = keep every JPEG/PNG's original bytes",
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="prepare: JPEG quality of every re-encoded image")
    strict: bool = Field(
        False,
        description="prepare: fail on the first unreadable image or non-image file, naming it, instead of skipping "
        "and listing it in the manifest (hidden files such as .DS_Store are always only listed)",
    )
    split_ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1),
        description="imagefolder without train/val/test folders: train, val, test fractions of every class",
    )
    split_seed: int = Field(
        0, ge=0, description="seed of the ratio split (imagefolder) and of the 45k/5k train/val split (cifar100)"
    )
    cifar_val_fraction: float = Field(
        0.1, gt=0, lt=1, description="cifar100: share of each class of the training set held out as val (5k of 50k)"
    )
    cifar_noise_p: float = Field(
        0.0,
        ge=0,
        le=1,
        description="cifar100: probability that a train label is redrawn uniformly from its block of 5 consecutive ids",
    )
    cifar_noise_seed: int = Field(0, ge=0, description="cifar100: seed of the label noise")
    plantnet_metadata: str | None = Field(
        None,
        description="plantnet300k: JSON mapping species id -> name (relative paths from data.root); "
        "default: <root>/plantnet300K_species_id_2_name.json if present, else the ids are the names",
    )
    prepare_workers: int = Field(0, ge=0, description="prepare: conversion processes (0 = every available CPU)")

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _rgb(cls, value: Any, info) -> Any:
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3):
            raise ValueError(f"data.{info.field_name} must be 3 numbers (R, G, B), got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if storage.is_remote(self.shards):
            try:
                storage.check_uri(self.shards)
            except ValueError as err:
                raise ValueError(f"data.shards: {err}") from None
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale must be (min, max) with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"data.std values must all be > 0, got {list(self.std)}")
        if self.crop > self.resize:
            raise ValueError(f"data.crop must be <= data.resize, got crop={self.crop} resize={self.resize}")
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")
        if 0 < self.resize_shorter < 8:
            raise ValueError(f"data.resize_shorter must be 0 (keep) or >= 8 pixels, got {self.resize_shorter}")
        ratios = self.split_ratios
        sums_to_one = math.isclose(sum(ratios), 1.0, abs_tol=1e-6)
        if min(ratios) < 0 or ratios[0] <= 0 or ratios[1] + ratios[2] <= 0 or not sums_to_one:
            raise ValueError(
                "data.split_ratios must be (train, val, test) fractions >= 0 summing to 1, with train > 0 and "
                f"val + test > 0, got {list(ratios)}"
            )
        if self.source == "synthetic" and self.shard_maxsize_mb > 0:
            raise ValueError(
                f"data.shard_maxsize_mb must be 0 for data.source='synthetic' (its shards are cut by "
                f"shard_maxcount only), got {self.shard_maxsize_mb}"
            )
        if self.cifar_noise_p > 0 and self.source != "cifar100":
            raise ValueError(
                f"data.cifar_noise_p applies to data.source='cifar100' only, got {self.cifar_noise_p} "
                f"with source={self.source!r}"
            )
        if self.plantnet_metadata is not None and self.source != "plantnet300k":
            raise ValueError(
                f"data.plantnet_metadata applies to data.source='plantnet300k' only, got {self.plantnet_metadata!r} "
                f"with source={self.source!r}"
            )
        return self


BACKBONE_FAMILIES = ("small_cnn", "timm", "torchvision")
"""The backbone families avgk.backbones registers, listed here so that a config validates without importing them."""


class ModelConfig(_Section):
    """Backbone and the two heads (docs/METHOD.md section 3)."""

    backbone: str = Field(
        "small_cnn",
        description="'small_cnn', 'timm:<name>' or 'torchvision:<name>' (e.g. timm:resnet50)",
    )
    pretrained: str | None = Field(
        None,
        description="backbone weights from local disk, never downloaded: a timm/torchvision state dict file, an "
        "avgk checkpoint file, or an avgk run directory (its best checkpoint); the heads start fresh",
    )
    width: int = Field(16, ge=4, description="small_cnn base channel count")
    channels_last: bool = Field(
        True,
        description="channels_last (NHWC) memory format for the model and its input batches: faster convolutions "
        "on CPU (oneDNN; BENCHMARKS.md, channels_last) "
        "and on GPU tensor cores",
    )
    compile: bool = Field(False, description="torch.compile the model")


LOSS_NAMES = ("two_head", "ce", "an", "an_ls", "wan", "epr", "role", "em", "em_apl")
"""The losses avgk.losses registers. Listed here so that a config validates without importing torch
(a config error answers at once); registering a loss whose name is missing here fails at import."""


class LossConfig(_Section):
    """The training objective, chosen by name from the loss registry."""

    name: str = Field("two_head", description="registered loss name (avgk.losses.LOSSES)")
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
    apl_neg_proportion: float = Field(0.01, gt=0, le=1, description="em_apl: share of unobserved entries pseudo-labelled negative per class")
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
    def _check(self) -> "LossConfig":
        if self.name not in LOSS_NAMES:
            raise ValueError(f"loss.name must be one of {', '.join(sorted(LOSS_NAMES))}, got {self.name!r}")
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


OPTIMIZER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05}, "sgd": {"lr": 0.05, "weight_decay": 5e-4}}
"""train.lr and train.weight_decay when a config leaves them out, by optimizer."""

TWO_HEAD_ML_LR_SCALE = 10.0
"""train.lr_scale.multilabel when left out and loss.name=two_head: with the BCE averaged over classes
the multi-label head needs a faster learning rate than the backbone (docs/RESULTS.md, the recipe)."""


class LrScaleConfig(_Section):
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


class TrainConfig(_Section):
    """Optimisation and distribution."""

    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1, description="GLOBAL batch size, split evenly over num_workers")
    lr: float = Field(
        None, gt=0, description="peak learning rate; default by optimizer: adamw 2e-3, sgd 0.05"  # type: ignore[arg-type]
    )
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="AdamW (decoupled decay), or SGD with momentum")
    lr_scale: LrScaleConfig = Field(default_factory=LrScaleConfig)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw: moment decay rates, each in [0, 1)")
    nesterov: bool = False
    weight_decay: float = Field(
        None, ge=0, description="default by optimizer: adamw 0.05, sgd 5e-4 (never on biases and norms)"  # type: ignore[arg-type]
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
    def _check(self) -> "TrainConfig":
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


class EvalConfig(_Section):
    """Which K are evaluated, and the class-frequency bins."""

    ks: list[float] = Field(default_factory=lambda: [1, 2, 3, 5, 10], min_length=1)
    freq_bins: tuple[int, int] = Field((20, 100), description="few < a <= medium <= b < many (train counts)")
    batch_size: int = Field(256, ge=1)
    strict: bool = Field(
        True,
        description="an evaluation that reads fewer samples than the manifest lists (truncated shard, broken or "
        "unlabelled sample) fails; false: it scores what it read and records the counts in metrics.json",
    )
    checkpoint: Literal["best", "last"] = Field("best", description="checkpoint evaluated at the end")
    num_actors: int | None = Field(
        None, ge=1, description="scoring-job actors (evaluate, pseudolabel); default one per GPU, else one per CPU"
    )
    gpu_wait_seconds: float = Field(
        600.0, ge=0, description="scoring jobs on GPU: how long to wait for an autoscaling cluster to bring a GPU up"
    )
    score_rows: Literal["top", "full"] = Field(
        "top",
        description="what the scoring jobs (evaluate, pseudolabel) keep per sample in the object store: 'top': its "
        "top_t largest scores and the few exact numbers the metrics need (avgk.top_scores), every result proven "
        "equal to the full rows' at run time, else the job scores again with full rows and says so; 'full': all L scores",
    )
    top_t: int | None = Field(
        None, ge=2, description="scores kept per sample with score_rows=top; None: 8 x the largest K served "
        "(eval.ks for evaluate, loss.pseudo_k for pseudolabel), at least 16; must exceed every such K",
    )

    @field_validator("ks")
    @classmethod
    def _ks(cls, ks: list[float]) -> list[float]:
        for k in ks:
            if not (k > 0 and math.isfinite(k)):
                raise ValueError(f"every K in eval.ks must be > 0, got {k}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"eval.ks has duplicates: {ks}")
        return sorted(ks)

    @field_validator("freq_bins")
    @classmethod
    def _bins(cls, bins: tuple[int, int]) -> tuple[int, int]:
        if not 0 < bins[0] <= bins[1]:
            raise ValueError(f"eval.freq_bins must satisfy 0 < few <= many, got {bins}")
        return bins


class TrackingConfig(_Section):
    """MLflow."""

    enabled: bool = True
    uri: str | None = Field(
        None, description="tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///<run.storage>/mlflow.db"
    )
    experiment: str = "avgk"
    log_model: bool = Field(
        True, description="log the trained model as an MLflow pyfunc model (image bytes -> label sets) at the end"
    )
    register_model: str | None = Field(
        None, description="model registry name to register the logged pyfunc model under; None: not registered"
    )

    @model_validator(mode="after")
    def _check(self) -> "TrackingConfig":
        if self.register_model is not None:
            if not self.register_model.strip() or self.register_model != self.register_model.strip():
                raise ValueError(
                    f"tracking.register_model must be a non-empty name without surrounding spaces, got {self.register_model!r}"
                )
            if not (self.enabled and self.log_model):
                raise ValueError(
                    f"tracking.register_model={self.register_model!r} needs tracking.enabled=true and "
                    f"tracking.log_model=true, got enabled={self.enabled} log_model={self.log_model}"
                )
        return self


class RunConfig(_Section):
    """Where a run lives."""

    name: str = Field("demo", min_length=1, description="run name: <storage>/<name> is the run directory")
    storage: str = Field("runs", description="local folder or pyarrow filesystem URI (s3://, gs://) holding runs")
    resume: Literal["auto", "never", "force"] = Field(
        "auto",
        description="an existing run directory: auto = resume when its config.yaml matches (else stop, naming "
        "the differing keys); never = stop; force = resume with this config",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if "/" in name or name in {".", ".."}:
            raise ValueError(f"run.name must be a plain folder name, got {name!r}")
        return name


class Config(_Section):
    """A whole avgk run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.data.source == "synthetic":
            self.validate_num_classes(self.data.synthetic.num_classes)
        largest_k = max(*self.eval.ks, self.loss.effective_pseudo_k)
        if self.eval.top_t is not None and self.eval.top_t <= largest_k:
            raise ValueError(
                f"eval.top_t must be > the largest K it serves (eval.ks and loss.pseudo_k: {largest_k:g}), "
                f"got {self.eval.top_t}: the scoring jobs keep top_t scores per sample and need rank round(K N) + 1"
            )
        if (self.train.mixup_alpha or self.train.cutmix_alpha) and self.loss.name != "ce":
            # Mixed images have two weighted labels: the two-head pseudo-labels and the single-positive
            # baselines are defined from one observed label per image, so there is no correct target.
            raise ValueError(
                f"train.mixup_alpha / train.cutmix_alpha need loss.name=ce (soft targets for the softmax "
                f"cross-entropy), got loss.name={self.loss.name!r}: the other losses take one observed label per image"
            )
        return self

    def validate_num_classes(self, num_classes: int) -> None:
        """Rules that need L, which real data sets only reveal in their manifest."""
        for k in self.eval.ks:
            if k >= num_classes:
                raise ValueError(f"eval.ks: K must be < number of classes {num_classes}, got {k}")
        if self.loss.k >= num_classes:
            raise ValueError(f"loss.k must be < number of classes {num_classes}, got {self.loss.k}")
        if self.loss.effective_pseudo_k >= num_classes:
            raise ValueError(f"loss.pseudo_k must be < number of classes {num_classes}, got {self.loss.effective_pseudo_k}")

    @property
    def multilabel_lr_scale(self) -> float:
        """train.lr_scale.multilabel, or its default for the loss."""
        scale = self.train.lr_scale.multilabel
        if scale is not None:
            return scale
        return TWO_HEAD_ML_LR_SCALE if self.loss.name == "two_head" else 1.0

    @property
    def run_dir(self) -> str:
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif "input" in e and e["type"] not in {"value_error", "assertion_error"}:
            parts.append(f"{loc}={e['input']!r}: {msg}" if loc else msg)
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings -> (key, YAML-parsed value)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote lists as "
                              f"'{key}=[a, b]'") from None
        parsed.append((key.strip(), value))
    return parsed


def build_config(tree: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    tree = copy.deepcopy(tree or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"config error: {_format_errors(err)}") from None


def bundled_configs_dir() -> Path | None:
    """The configs/ folder installed with the wheel (<prefix>/share/avgk/configs), if there is one."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        folder = Path(prefix) / "share" / "avgk" / "configs"
        if folder.is_dir():
            return folder
    return None


def find_config_file(path: str | Path) -> Path:
    """`path` when it exists; else the config of that name that ships with avgk, so that the README's
    commands work outside a checkout: `configs/smoke.yaml`, `smoke.yaml` and `smoke` all name the
    installed configs/smoke.yaml (likewise `configs/sweeps/smoke.yaml`). Anything else is returned as given."""
    path = Path(path)
    bundled = bundled_configs_dir()
    if path.exists() or path.is_absolute() or bundled is None:
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    candidate = bundled.joinpath(*parts) if parts else bundled
    if not candidate.suffix:
        candidate = candidate.with_suffix(".yaml")
    return candidate if candidate.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None: the embedded defaults) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = find_config_file(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory: pass a YAML file (e.g. configs/demo.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    return build_config(tree, overrides)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, description) of every config key, in declaration order."""
    model = model or Config
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_keys(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        if get_origin(annotation) is Literal:
            kind = "one of " + " | ".join(str(v) for v in get_args(annotation))
        else:
            kind = str(annotation).replace("typing.", "") if get_args(annotation) else annotation.__name__
        rows.append((f"{prefix}{name}", kind, default, field.description or ""))
    return rows

