"""The data section: the built-in synthetic set, the sources `avgk prepare` converts, shards and reading."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from avgk.config.base import Section
from avgk.config.registry import SOURCES
from avgk.runtime import storage

GENERATED_SOURCES = ("synthetic", "digits")
"""Sources written on first use from data.synthetic's settings, with no input folder (data.root)."""


class SyntheticConfig(Section):
    """The built-in procedural data set (docs/METHOD.md: known posterior, long tail, ambiguity); its
    sizes, image size, ambiguity rate, Zipf exponent and seed also shape data.source=digits."""

    num_classes: int = Field(100, ge=2, description="number of classes L")
    num_train: int = Field(12000, ge=1, description="training images")
    num_val: int = Field(3000, ge=1, description="validation images (calibration and model selection)")
    num_test: int = Field(3000, ge=1, description="test images (final metrics only)")
    image_size: int = Field(16, ge=8, description="side of the square images, pixels")
    zipf_exponent: float = Field(1.0, ge=0.0, description="class prior ∝ 1/(rank+1)^exponent; 0 = balanced")
    ambiguity_rate: float = Field(0.3, ge=0.0, le=1.0, description="fraction of images mixing 2-3 classes")
    seed: int = Field(0, description="generation seed (prototypes and samples)")


class DataConfig(Section):
    """Where the images come from, where the shards go, and how they are read."""

    source: str = Field(
        "synthetic", description="input layout converted by `avgk prepare` (avgk.config.registry.SOURCES)"
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
    resize: int = Field(16, ge=8, description="eval: resize the shorter side to this")
    hflip: bool = Field(
        True,
        description="train: random horizontal flips; turn off where a mirror image is another class "
        "(digits, text, asymmetric specimens)",
    )
    crop: int = Field(16, ge=8, description="train random crop / eval center crop side")
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

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return SOURCES.check(value)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _rgb(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3):
            raise ValueError(f"data.{info.field_name} must be 3 numbers (R, G, B), got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
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
        if self.source not in GENERATED_SOURCES and not self.root:
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
