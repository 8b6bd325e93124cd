"""Procedural long-tailed, ambiguous RGB images whose true posterior p(y|x) is known."""

# Shape legend: N samples, L classes, H = W = image_size, C = 3 channels,
# M = MAX_MIX mixture slots per sample (padded with -1 / 0).

from __future__ import annotations

import colorsys
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "BLOCK_SIZE",
    "MAX_MIX",
    "SyntheticSplit",
    "class_prototypes",
    "generate_synthetic",
    "posterior_dense",
    "zipf_prior",
]

BLOCK_SIZE = 5
"""Ambiguous images mix classes of one block of consecutive ids (c - c % 5 ...), like CIFAR block noise."""
MAX_MIX = 3
"""At most this many classes are blended into one image (the width of the sparse posterior)."""

_PROTOTYPE_STREAM = 0x70726F74  # "prot": keeps prototype draws apart from every split's stream
_CHUNK = 4096  # images rendered at once; bounds peak memory at ~150 MB for 32 x 32
_NOISE_STD = 0.06
_BRIGHTNESS = (0.85, 1.15)
_COLOUR_SHIFT_STD = 0.03
_DIRICHLET_ALPHA = 2.0


@dataclass(frozen=True)
class SyntheticSplit:
    """One generated split; the posterior is stored sparsely, primary class first."""

    images_NHWC: np.ndarray
    """uint8, N x H x W x 3."""
    labels_N: np.ndarray
    """int64 labels, each drawn from its image's posterior."""
    posterior_indices: np.ndarray
    """int64, N x 3: classes with non-zero p(y|x), primary first, padded with -1."""
    posterior_probs: np.ndarray
    """float32, N x 3: p(y|x) for `posterior_indices`, padded with 0; rows sum to 1."""
    class_prior_L: np.ndarray
    """float64, L: the Zipf prior the primary classes are drawn from."""
    primary_N: np.ndarray
    """int64: the class with the largest mixing weight (the one the image mostly shows)."""
    is_ambiguous_N: np.ndarray
    """bool: True where the image blends 2 or 3 classes."""

    @property
    def num_samples(self) -> int:
        return int(self.labels_N.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.class_prior_L.shape[0])

    def posterior_NL(self) -> np.ndarray:
        """The dense N x L float32 posterior."""
        return posterior_dense(self.posterior_indices, self.posterior_probs, self.num_classes)


def posterior_dense(indices: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    """Scatter a sparse posterior (N x M indices padded with -1, N x M probs) into N x L float32."""
    indices = np.asarray(indices)
    probs = np.asarray(probs, dtype=np.float32)
    if indices.shape != probs.shape or indices.ndim != 2:
        raise ValueError(
            f"indices and probs must both be N x M, got shapes {indices.shape} and {probs.shape}"
        )
    if indices.size and int(indices.max()) >= num_classes:
        raise ValueError(f"posterior indices must be < num_classes={num_classes}, got {int(indices.max())}")
    dense_NL = np.zeros((indices.shape[0], num_classes), dtype=np.float32)
    rows, slots = np.nonzero(indices >= 0)
    # np.add.at rather than assignment so a repeated index still sums correctly
    np.add.at(dense_NL, (rows, indices[rows, slots]), probs[rows, slots])
    return dense_NL


def zipf_prior(*, num_classes: int, zipf_exponent: float) -> npt.NDArray[np.float64]:
    """Class prior proportional to 1 / (class_id + 1) ** zipf_exponent (0 gives a balanced prior)."""
    ranks = np.arange(1, num_classes + 1, dtype=np.float64)
    weights: npt.NDArray[np.float64] = ranks ** (-float(zipf_exponent))
    prior: npt.NDArray[np.float64] = weights / weights.sum()
    return prior


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def class_prototypes(*, num_classes: int, image_size: int, seed: int) -> np.ndarray:
    """Render the L x H x W x 3 float32 class prototypes in [0, 1]; they depend on (seed, num_classes, image_size) only.

    Each class has a background colour (classes of one block share a hue family, like
    CIFAR superclasses), a sinusoidal grating with its own integer wave vector (so it
    tiles seamlessly under circular shifts), grating tint and phase, and a soft blob in a
    contrasting colour with its own radius. Wave vectors have kx, ky >= 0, so a
    horizontal flip never turns one class's grating into another's.
    """
    _check_common(num_classes=num_classes, image_size=image_size, seed=seed)
    rng = np.random.default_rng([seed, _PROTOTYPE_STREAM, num_classes])
    size = image_size
    max_freq = int(np.clip(size // 8, 2, 4))
    wave_vectors = np.array(
        [(kx, ky) for kx in range(max_freq + 1) for ky in range(max_freq + 1) if (kx, ky) != (0, 0)]
    )
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    block_hue_offset = rng.random()
    prototypes_LHWC = np.empty((num_classes, size, size, 3), dtype=np.float32)
    for block_start in range(0, num_classes, BLOCK_SIZE):
        block = block_start // BLOCK_SIZE
        block_hue = block * 0.6180339887 + block_hue_offset  # golden-ratio spacing of block hues
        members = range(block_start, min(block_start + BLOCK_SIZE, num_classes))
        # distinct wave vectors inside a block: the classes that get confused must differ in texture
        block_waves = rng.choice(len(wave_vectors), size=len(members), replace=False)
        for slot, class_id in enumerate(members):
            hue = block_hue + (slot - 2) * 0.03 + rng.normal(0.0, 0.01)
            background = _hsv_to_rgb(hue, rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.9))
            kx, ky = wave_vectors[block_waves[slot]]
            phase = rng.uniform(0.0, 2 * np.pi)
            grating_HW = np.cos(2 * np.pi * (kx * xx + ky * yy) / size + phase)
            tint = rng.normal(size=3)
            tint = tint / np.linalg.norm(tint) * rng.uniform(0.18, 0.3)
            image_HWC = background + grating_HW[..., None] * tint
            blob_colour = _hsv_to_rgb(hue + 0.5 + rng.normal(0.0, 0.08), rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0))
            radius = rng.uniform(0.1, 0.28) * size
            centre_y, centre_x = rng.uniform(0, size, size=2)
            # toroidal distance: the blob wraps around like the grating does
            dy = np.minimum(np.abs(yy - centre_y), size - np.abs(yy - centre_y))
            dx = np.minimum(np.abs(xx - centre_x), size - np.abs(xx - centre_x))
            mask_HW = np.exp(-(dy**2 + dx**2) / (2 * radius**2))[..., None]
            image_HWC = image_HWC * (1 - mask_HW) + blob_colour * mask_HW
            prototypes_LHWC[class_id] = np.clip(image_HWC, 0.0, 1.0)
    return prototypes_LHWC


def _check_common(*, num_classes: int, image_size: int, seed: int) -> None:
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if int(image_size) != image_size or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _split_stream(split: str) -> int:
    # crc32, not hash(): Python salts str hashes per process
    return zlib.crc32(split.encode("utf-8"))


def generate_synthetic(
    *,
    num_samples: int,
    num_classes: int = 100,
    image_size: int = 32,
    zipf_exponent: float = 1.0,
    ambiguity_rate: float = 0.3,
    seed: int = 0,
    split: str = "train",
) -> SyntheticSplit:
    """Generate one split: Zipf-distributed primary classes, some images blending 2-3 classes of one block.

    A clear image (probability 1 - ambiguity_rate) shows its primary class and has a
    one-hot posterior. An ambiguous image blends the prototypes of its primary class and
    1 or 2 partners from the same block of 5 class ids with Dirichlet weights w (primary
    largest); its posterior is w and its label is drawn from w, so thresholding the stored
    posterior is the Bayes-optimal average-K predictor. Every image then gets a random
    circular shift, a brightness and colour jitter and Gaussian pixel noise. Classes in a
    block of size 1 (the last block when num_classes % 5 == 1) are always clear.

    Prototypes depend on (seed, num_classes, image_size) only, so all splits share them;
    the samples come from a stream derived from (seed, split).
    """
    _check_common(num_classes=num_classes, image_size=image_size, seed=seed)
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not 0.0 <= ambiguity_rate <= 1.0:
        raise ValueError(f"ambiguity_rate must be in [0, 1], got {ambiguity_rate!r}")
    if not zipf_exponent >= 0.0:  # also rejects NaN
        raise ValueError(f"zipf_exponent must be >= 0, got {zipf_exponent!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")

    num_samples, num_classes, size = int(num_samples), int(num_classes), int(image_size)
    prototypes_LHWC = class_prototypes(num_classes=num_classes, image_size=size, seed=seed)
    class_prior_L = zipf_prior(num_classes=num_classes, zipf_exponent=zipf_exponent)
    rng = np.random.default_rng([seed, _split_stream(split), num_classes, size])

    # --- latent classes and mixing weights -------------------------------------------
    primary_N = rng.choice(num_classes, size=num_samples, p=class_prior_L).astype(np.int64)
    block_start_N = primary_N - primary_N % BLOCK_SIZE
    block_size_N = np.minimum(BLOCK_SIZE, num_classes - block_start_N)
    wants_mix_N = rng.random(num_samples) < ambiguity_rate
    num_mix_N = np.where(wants_mix_N, rng.integers(2, MAX_MIX + 1, size=num_samples), 1)
    num_mix_N = np.minimum(num_mix_N, block_size_N)
    is_ambiguous_N = num_mix_N >= 2

    # partners: a random order of the block's other members (invalid slots sort last)
    slot_keys_NB = rng.random((num_samples, BLOCK_SIZE))
    slots_B = np.arange(BLOCK_SIZE)
    slot_keys_NB[slots_B[None, :] >= block_size_N[:, None]] = 2.0
    slot_keys_NB[slots_B[None, :] == (primary_N - block_start_N)[:, None]] = 3.0
    partner_slots_NP = np.argsort(slot_keys_NB, axis=1)[:, : MAX_MIX - 1]
    indices_NM = np.concatenate([primary_N[:, None], block_start_N[:, None] + partner_slots_NP], axis=1)

    gamma_NM = rng.gamma(_DIRICHLET_ALPHA, size=(num_samples, MAX_MIX))
    used_NM = np.arange(MAX_MIX)[None, :] < num_mix_N[:, None]
    gamma_NM = np.where(used_NM, gamma_NM, 0.0)
    weights_NM = -np.sort(-gamma_NM, axis=1)  # descending: the primary gets the largest weight
    weights_NM = weights_NM / weights_NM.sum(axis=1, keepdims=True)
    weights_NM = weights_NM.astype(np.float32)
    # re-normalise in float32 so rows sum to 1 at the stored precision
    weights_NM /= weights_NM.sum(axis=1, keepdims=True)
    indices_NM = np.where(used_NM, indices_NM, -1).astype(np.int64)

    # label ~ w: the first slot whose cumulative weight exceeds a uniform draw
    cumulative_NM = np.cumsum(weights_NM.astype(np.float64), axis=1)
    draws_N = rng.random(num_samples) * cumulative_NM[:, -1]
    label_slot_N = np.minimum((cumulative_NM <= draws_N[:, None]).sum(axis=1), num_mix_N - 1)
    labels_N = indices_NM[np.arange(num_samples), label_slot_N]

    # --- rendering, chunk by chunk ----------------------------------------------------
    images_NHWC = np.empty((num_samples, size, size, 3), dtype=np.uint8)
    grid = np.arange(size)
    for start in range(0, num_samples, _CHUNK):
        stop = min(start + _CHUNK, num_samples)
        count = stop - start
        chunk_idx = np.maximum(indices_NM[start:stop], 0)
        chunk_w = weights_NM[start:stop]
        blend_nHWC = chunk_w[:, 0, None, None, None] * prototypes_LHWC[chunk_idx[:, 0]]
        for slot in range(1, MAX_MIX):
            blend_nHWC += chunk_w[:, slot, None, None, None] * prototypes_LHWC[chunk_idx[:, slot]]
        shift_n2 = rng.integers(0, size, size=(count, 2))
        rows_nH = (grid[None, :] + shift_n2[:, :1]) % size
        cols_nW = (grid[None, :] + shift_n2[:, 1:]) % size
        image_nHWC = blend_nHWC[np.arange(count)[:, None, None], rows_nH[:, :, None], cols_nW[:, None, :]]
        brightness_n = rng.uniform(*_BRIGHTNESS, size=count).astype(np.float32)
        colour_shift_nC = rng.normal(0.0, _COLOUR_SHIFT_STD, size=(count, 3)).astype(np.float32)
        image_nHWC *= brightness_n[:, None, None, None]
        image_nHWC += colour_shift_nC[:, None, None, :]
        image_nHWC += rng.standard_normal(size=image_nHWC.shape, dtype=np.float32) * _NOISE_STD
        np.clip(image_nHWC, 0.0, 1.0, out=image_nHWC)
        images_NHWC[start:stop] = np.rint(image_nHWC * 255.0).astype(np.uint8)

    return SyntheticSplit(
        images_NHWC=images_NHWC,
        labels_N=labels_N.astype(np.int64),
        posterior_indices=indices_NM,
        posterior_probs=weights_NM,
        class_prior_L=class_prior_L,
        primary_N=primary_N,
        is_ambiguous_N=is_ambiguous_N,
    )
