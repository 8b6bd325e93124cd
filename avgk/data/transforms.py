"""Image transforms: PIL image -> normalised float tensor, with train-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SMALL_IMAGE_CROP", "build_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_CROP = 64
"""Below this crop size (CIFAR-like images) training uses pad + random crop instead of RandomResizedCrop."""


def build_transform(
    *,
    train: bool,
    resize: int,
    crop: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """Build a callable mapping a PIL image to a float32 3 x crop x crop tensor, normalised by mean/std.

    train, crop >= 64: RandomResizedCrop(crop, scale=(0.35, 1)) + horizontal flip
    (`resize` is then unused: the random crop is resized straight to `crop`).
    train, crop < 64:  Resize(resize) + RandomCrop(crop, padding=crop // 8) + horizontal flip.
    eval:              Resize(resize) (shorter side) + CenterCrop(crop).
    """
    if int(resize) != resize or resize < 1:
        raise ValueError(f"resize must be a positive integer, got {resize!r}")
    if int(crop) != crop or crop < 1:
        raise ValueError(f"crop must be a positive integer, got {crop!r}")
    if crop > resize:
        raise ValueError(f"crop must be <= resize, got crop={crop} > resize={resize}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got mean={tuple(mean)} std={tuple(std)}")
    if min(std) <= 0:
        raise ValueError(f"std values must be > 0, got {tuple(std)}")

    if train and crop >= SMALL_IMAGE_CROP:
        geometry = [v2.RandomResizedCrop(crop, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif train:
        geometry = [
            v2.Resize(resize, antialias=True),
            v2.RandomCrop(crop, padding=max(1, crop // 8)),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
