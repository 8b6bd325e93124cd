"""Image transforms: PIL image -> normalised float tensor, with train-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SMALL_IMAGE_CROP", "ImageTransform", "build_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_CROP = 64
"""Below this crop size (CIFAR-like images) training uses pad + random crop instead of RandomResizedCrop."""


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised float32 3 x H x W, in two halves so that a loader can batch the second.

    `geometry` maps one PIL image to a uint8 3 x H x W tensor (resize, crop, augmentation);
    `finish` turns a uint8 batch B x 3 x H x W into float32 in [0, 1] normalised by mean/std,
    the same elementwise operations as v2.ToDtype(scale=True) + v2.Normalize, so the values are
    equal bit for bit. Calling the object does both for one image.
    Why the split: run per image, ToDtype + Normalize cost ~2x the geometry on 32 x 32 images
    (v2's per-call overhead: 300 -> 100 us per image) and ~0.66 ms per 224 x 224 image against
    ~0.27 ms as one pass over a batch (P3 and P5 in BENCHMARKS.md).
    """

    geometry: Callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def finish(self, images_BCHW: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 B x 3 x H x W -> normalised float32, written into `out` when given (e.g. shared memory)."""
        if images_BCHW.dtype != torch.uint8 or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            raise ValueError(
                f"finish expects a uint8 B x 3 x H x W batch, got {images_BCHW.dtype} of shape {tuple(images_BCHW.shape)}"
            )
        if out is None:
            out = torch.empty(images_BCHW.shape, dtype=torch.float32)
        out.copy_(images_BCHW).mul_(1.0 / 255)  # exactly what to_dtype(float32, scale=True) computes
        return F.normalize(out, mean=list(self.mean), std=list(self.std), inplace=True)

    def __call__(self, image) -> torch.Tensor:
        return self.finish(self.geometry(image).unsqueeze(0))[0]


def build_transform(
    *,
    train: bool,
    resize: int,
    crop: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImageTransform:
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
    return ImageTransform(
        geometry=v2.Compose([v2.ToImage(), *geometry, v2.ToPureTensor()]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
