"""Image transforms: PIL image -> normalised float tensor, with train-time augmentation.

torchvision (about 2 s to import, more than torch's own share on this project's CPUs) loads when a
transform is built: a process that only normalises batches (a scoring actor) never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SMALL_IMAGE_CROP", "ImageTransform", "Transform", "build_transform", "normalize_batch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_CROP = 64
"""Below this crop size (CIFAR-like images) training uses pad + random crop instead of RandomResizedCrop."""
AUTO_AUGMENT = {"none": None, "randaugment": "RandAugment", "trivialaugment": "TrivialAugmentWide"}
"""train.auto_augment -> the torchvision.transforms.v2 class it names."""


Transform = Callable[[Image.Image], torch.Tensor]
"""What the loaders take as `transform`: a PIL image to a 3 x H x W tensor (an ImageTransform is one)."""

CPU_CHUNK_BYTES = 1 << 20
"""normalize_batch on the CPU works through a batch in chunks of about this many float32 bytes,
so its four passes (convert, scale, subtract, divide) stay in cache (the gain on small images:
BENCHMARKS.md, P3)."""


def normalize_batch(
    images_BCHW: torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    memory_format: torch.memory_format = torch.contiguous_format,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32 in [0, 1] normalised by mean/std, on the batch's device.

    The same elementwise operations as v2.ToDtype(float32, scale=True) + v2.Normalize, so the
    values equal theirs bit for bit. The result is written into `out` when given (e.g. a
    shared-memory batch), else into a new tensor in `memory_format`.
    """
    if images_BCHW.dtype != torch.uint8 or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
        raise ValueError(
            f"normalize_batch expects a uint8 B x 3 x H x W batch, got {images_BCHW.dtype} "
            f"of shape {tuple(images_BCHW.shape)}"
        )
    if out is None:
        out = torch.empty(images_BCHW.shape, dtype=torch.float32, device=images_BCHW.device, memory_format=memory_format)
    batch = images_BCHW.shape[0]
    per_image = max(1, images_BCHW[0].numel() * 4)
    rows = batch if images_BCHW.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // per_image)
    # v2.functional.normalize's own operations: subtract, then divide, by float32 C x 1 x 1 tensors
    mean_ = torch.as_tensor(list(mean), dtype=torch.float32, device=out.device).view(-1, 1, 1)
    std_ = torch.as_tensor(list(std), dtype=torch.float32, device=out.device).view(-1, 1, 1)
    for first in range(0, batch, rows):
        chunk = out[first:first + rows]
        chunk.copy_(images_BCHW[first:first + rows]).mul_(1.0 / 255)  # what to_dtype(scale=True) computes
        chunk.sub_(mean_).div_(std_)
    return out


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised float32 3 x H x W, in two halves so that loaders can batch the second.

    `geometry` maps one PIL image to a uint8 3 x H x W tensor (resize, crop, augmentation);
    `finish` (normalize_batch with this mean/std) turns a uint8 batch into normalised float32,
    bit for bit what v2.ToDtype(scale=True) + v2.Normalize give. Calling the object does both
    for one image. Why the split: run per image through v2, ToDtype + Normalize cost ~2x the
    geometry on 32 x 32 images (v2's per-call overhead: 300 -> 100 us per image); and a uint8
    batch can travel to the device, 4x smaller than float32, to be normalised there (P3 and P5
    in BENCHMARKS.md).
    """

    geometry: Callable[[Image.Image | torch.Tensor], torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def finish(
        self,
        images_BCHW: torch.Tensor,
        *,
        memory_format: torch.memory_format = torch.contiguous_format,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return normalize_batch(images_BCHW, mean=self.mean, std=self.std, memory_format=memory_format, out=out)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.geometry(image).unsqueeze(0))[0]


def build_transform(
    *,
    train: bool,
    resize: int,
    crop: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: bool = True,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    auto_augment: str = "none",
) -> ImageTransform:
    """Build a callable mapping a PIL image to a float32 3 x crop x crop tensor, normalised by mean/std.

    train, crop >= 64: RandomResizedCrop(crop, scale=crop_scale) + horizontal flip (if hflip)
    (`resize` is then unused: the random crop is resized straight to `crop`).
    train, crop < 64:  Resize(resize) + RandomCrop(crop, padding=crop // 8) + horizontal flip (if hflip).
    train, then:       RandAugment (2 ops, magnitude 9) or TrivialAugmentWide if auto_augment says so.
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

    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(crop_scale)}")
    if auto_augment not in AUTO_AUGMENT:
        raise ValueError(f"auto_augment must be one of {', '.join(AUTO_AUGMENT)}, got {auto_augment!r}")
    from torchvision.transforms import v2

    after_crop = [v2.RandomHorizontalFlip()] if hflip else []
    augment = AUTO_AUGMENT[auto_augment]
    after_crop += [getattr(v2, augment)()] if augment else []
    if train and crop >= SMALL_IMAGE_CROP:
        geometry = [v2.RandomResizedCrop(crop, scale=tuple(crop_scale), antialias=True), *after_crop]
    elif train:
        geometry = [v2.Resize(resize, antialias=True), v2.RandomCrop(crop, padding=max(1, crop // 8)), *after_crop]
    else:
        geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
    return ImageTransform(
        geometry=v2.Compose([v2.ToImage(), *geometry, v2.ToPureTensor()]),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
    )
