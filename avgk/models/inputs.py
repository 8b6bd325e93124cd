"""What the model sees: the image transform a config asks for, the normalisation of its backbone,
and a loader batch turned into model input (on the device, normalised, in the model's memory format).

Every process that runs a model (training ranks, scoring actors, SetPredictor) builds its
transform here, so they all feed the network the same pixels.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from avgk.config import Config, DataConfig, ModelConfig
from avgk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, build_transform, normalize_batch


@lru_cache(maxsize=64)
def _backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if backbone.startswith("timm:"):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(backbone.removeprefix("timm:"))
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def normalization(*, model: ModelConfig, data: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input normalisation: data.mean / data.std when set, else the timm
    backbone's pretrained config (e.g. CLIP's), else ImageNet's (small_cnn, torchvision)."""
    mean, std = _backbone_normalization(model.backbone)
    return tuple(data.mean or mean), tuple(data.std or std)


def image_transform(config: Config, *, train: bool) -> ImageTransform:
    """The transform of the config's data section, normalised for its backbone."""
    data = config.data
    mean, std = normalization(model=config.model, data=data)
    if not train:
        return build_transform(train=False, resize=data.resize, crop=data.crop, mean=mean, std=std)
    return build_transform(
        train=True, resize=data.resize, crop=data.crop, mean=mean, std=std, hflip=data.hflip,
        crop_scale=data.crop_scale, auto_augment=data.auto_augment,
    )


def normalize_in_loader(device: torch.device) -> bool:
    """Where the engine's loaders normalise images: in their worker processes when the model runs
    on the CPU (off the training thread, which bounds CPU training), else on the device (uint8
    batches cross to a GPU at a quarter of float32's size and the GPU normalises them for free)."""
    return torch.device(device).type == "cpu"


def model_input(images: torch.Tensor, *, device: torch.device, config: Config) -> torch.Tensor:
    """A loader batch as the model takes it, on `device` and in the model's memory format.

    uint8 batches (loaders with normalize=False, see normalize_in_loader) are normalised on the
    device with the config's normalization, the one its image_transform uses.
    """
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        mean, std = normalization(model=config.model, data=config.data)
        return normalize_batch(images, mean=mean, std=std, memory_format=memory_format)
    return images.contiguous(memory_format=memory_format)
