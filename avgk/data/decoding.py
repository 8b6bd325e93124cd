"""Decoding WebDataset samples into images, labels and posteriors, and collating them into batches.

Shape legend: B batch size, L classes, H x W image size.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from avgk.data.manifest import IMAGE_EXTENSIONS, decode_posterior
from avgk.data.transforms import ImageTransform, Transform


class DataSetupError(ValueError):
    """A configuration error (e.g. a posterior asked for but absent): never skipped."""


def _image_bytes(sample: Mapping[str, Any]) -> bytes:
    for ext in (*IMAGE_EXTENSIONS, "jpeg"):
        if ext in sample:
            data: bytes = sample[ext]
            return data
    raise ValueError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_EXTENSIONS)})")


def decode_sample_image(sample: Mapping[str, Any]) -> Image.Image:
    """The RGB PIL image of a shard sample (its jpg/png/... entry), for transforms that take PIL images."""
    with Image.open(io.BytesIO(_image_bytes(sample))) as image:
        rgb: Image.Image = image.convert("RGB")
        return rgb


try:
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec (a further dependency, not
    # taken yet) but ships them; once a release drops them, every image goes through PIL.
    from torchvision.io import ImageReadMode, decode_image

    warnings.filterwarnings(
        "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
        category=DeprecationWarning,
    )
except ImportError:  # pragma: no cover - a torchvision without image decoders
    decode_image = None


def decode_sample_image_uint8(sample: Mapping[str, Any]) -> torch.Tensor:
    """uint8 3 x H x W RGB. torchvision.io decodes straight into a tensor, faster than PIL +
    convert + to-tensor with the same pixels (BENCHMARKS.md, P3); what it
    cannot give as 8-bit RGB (e.g. a 16-bit PNG) goes through PIL, as every image used to."""
    data = _image_bytes(sample)
    if decode_image is not None:
        try:
            # bytearray: a writable copy (~30 us for 100 KB) that torch wraps without a warning
            image_CHW: torch.Tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if image_CHW.dtype == torch.uint8:
                return image_CHW
        except RuntimeError:
            pass  # PIL decides: it decodes what torchvision does not, and raises on a broken image
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@dataclass
class SampleDecoder:
    transform: Transform | None
    num_classes: int
    with_posterior: bool

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(self.transform, ImageTransform):
            # its geometry takes tensors; uint8 out, the batch is normalised in Collate or later
            image_CHW = self.transform.geometry(decode_sample_image_uint8(sample))
        elif self.transform is not None:
            image_CHW = self.transform(decode_sample_image(sample))  # any other transform gets a PIL image, as documented
        else:
            image_CHW = decode_sample_image_uint8(sample).float().div_(255.0)
        out = {
            "image": image_CHW,
            "label": int(sample["cls"]),
            "idx": int(sample["idx"]),
            "key": sample["__key__"],
        }
        if self.with_posterior:
            if "post.npy" not in sample:
                raise DataSetupError(
                    f"with_posterior=True but sample {sample['__key__']!r} has no post.npy "
                    "(only synthetic shards carry posteriors)"
                )
            post_2M = np.load(io.BytesIO(sample["post.npy"]), allow_pickle=False)
            out["posterior"] = decode_posterior(post_2M=post_2M, num_classes=self.num_classes)
        return out


def _shared_float_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 tensor; in a loader worker, in shared memory, where the batch must go to reach
    the main process (a plain tensor would be copied there once more when pickled; its cost:
    BENCHMARKS.md, P3). The same calls as torch's default_collate."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    elem = torch.empty(0, dtype=torch.float32)
    storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device=elem.device)
    return elem.new(storage).resize_(*shape)


@dataclass
class Collate:
    """Samples -> one batch dict. uint8 images from an ImageTransform's geometry are normalised here
    in one pass over the batch, or, with normalize=False, left uint8 for the consumer."""

    transform: Transform | None
    normalize: bool = True

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        if isinstance(self.transform, ImageTransform) and self.normalize:
            uint8_BCHW = torch.stack(images)
            image_batch = self.transform.finish(uint8_BCHW, out=_shared_float_batch(tuple(uint8_BCHW.shape)))
        else:
            # default_collate stacks straight into shared memory in a loader worker (see above).
            image_batch = torch.utils.data.default_collate(images)
        batch = {
            "image": image_batch,
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "idx": torch.tensor([s["idx"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples],
        }
        if "posterior" in samples[0]:
            batch["posterior"] = torch.from_numpy(np.stack([s["posterior"] for s in samples]))
        return batch
