"""Reading WebDataset shards: which shards each rank and loader worker reads (pure functions),
the shard stream, and the train/eval loaders.

Shape legend: B batch size, L classes, H x W image size.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset import tariterators

from avgk.data.decoding import Collate, DataSetupError, SampleDecoder
from avgk.data.manifest import Manifest, read_manifest
from avgk.data.transforms import ImageTransform, Transform
from avgk.runtime import safe_fs, storage

log = logging.getLogger(__name__)

# =====================================================================================
# Shard assignment (pure functions)
# =====================================================================================


def _seed_int(*parts: int) -> int:
    """One 64-bit seed from several non-negative ints, independent of Python's hash salt."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0])


def epoch_shard_order(*, shard_urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The training shard order of an epoch: the same on every rank, different from epoch to epoch."""
    order = list(shard_urls)
    random.Random(_seed_int(seed, epoch)).shuffle(order)
    return order


def worker_shards(
    *, shard_urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards one worker of one rank reads: every world_size-th from `rank`, then every num_workers-th."""
    return list(shard_urls)[rank::world_size][worker::max(1, num_workers)]


# =====================================================================================
# Reading
# =====================================================================================


class _SkipAndCount:
    """Webdataset exception handler: skip the broken sample or shard, count it, warn at most every 30 s."""

    def __init__(self, interval_s: float = 30.0):
        self.num_skipped = 0
        self.interval_s = interval_s
        self._last_warning = -float("inf")

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, DataSetupError):
            raise exn
        if isinstance(exn, safe_fs.OutageError):  # the store, not the shard: every later shard would fail too
            raise DataSetupError(str(exn).split("\n")[0]) from None
        self.num_skipped += 1
        now = time.monotonic()
        if now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning("skipping broken sample (%d skipped so far in this worker): %r", self.num_skipped, exn)
        return True


def _check_normalize(transform: Transform | None, normalize: bool) -> None:
    if not normalize and not isinstance(transform, ImageTransform):
        raise ValueError(
            f"normalize=False needs an ImageTransform (avgk.data.transforms.build_transform) to leave uint8 "
            f"images for the consumer, got transform={transform!r}"
        )


def _open_shards(urls: Iterator[str], *, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """{"url", "stream"} per shard, as webdataset's url_opener, through avgk.runtime.storage: a local file, or
    a remote object (s3://...) streamed with read-ahead, never copied to disk. A shard that cannot be
    opened goes to `handler` (skipped and counted), except a storage setup error (credentials,
    bucket, endpoint), which no later shard would escape: it stops the loader with its message."""
    for url in urls:
        try:
            stream = storage.open_input_stream(url)
        except (storage.StorageError, safe_fs.OutageError) as err:
            raise DataSetupError(str(err)) from None
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        yield {"url": url, "stream": stream}


class _ShardStream(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Batches from the shards one (rank, worker) owns; the worker index comes from torch, never from env vars."""

    def __init__(
        self,
        *,
        shard_urls: Sequence[str],
        training: bool,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        resampled: bool,
        shuffle_buffer: int,
        batch_size: int,
        decoder: SampleDecoder,
        normalize: bool = True,
    ):
        super().__init__()
        self.normalize = normalize
        self.shard_urls = list(shard_urls)
        self.training = training
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.decoder = decoder
        self.handler = _SkipAndCount()
        self._num_read = 0
        """Encoded samples read from this worker's shards so far."""
        self._pass_size = 0
        """Encoded samples read in the last complete pass over this worker's shards (0: none yet)."""
        self._worker_shards: list[str] = []
        """The shards this worker cycles over (training), for error messages."""

    @property
    def num_skipped(self) -> int:
        """Broken samples skipped so far (in this process; each worker process counts its own)."""
        return self.handler.num_skipped

    def _urls(self, worker: int, num_workers: int) -> Iterator[str]:
        if not self.training:
            yield from worker_shards(
                shard_urls=self.shard_urls,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
            )
            return
        draw: Callable[[list[str]], list[str]]  # the next pass's shard order from this one's
        if self.resampled:
            mine = self.shard_urls
            rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker, 1))
            draw = lambda order: [rng.choice(mine) for _ in mine]  # noqa: E731
        else:
            mine = worker_shards(
                shard_urls=epoch_shard_order(shard_urls=self.shard_urls, seed=self.seed, epoch=self.epoch),
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
            )
            rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker, 2))
            draw = lambda order: rng.sample(order, len(order))  # noqa: E731
        self._worker_shards = mine
        order = list(mine)  # pass 0 keeps the epoch order; later passes reshuffle
        empty_passes = 0
        while True:
            read_before = self._num_read
            yield from order
            # an endless stream over shards that hold nothing readable would otherwise spin forever
            # (shards whose samples read but do not decode: see _decoded)
            self._pass_size = self._num_read - read_before
            empty_passes = empty_passes + 1 if self._pass_size == 0 else 0
            if empty_passes >= 3:
                raise self._stalled(worker)
            order = draw(order)

    def _stalled(self, worker: int) -> RuntimeError:
        mine = self._worker_shards
        return RuntimeError(
            f"rank {self.rank} worker {worker}: no readable sample in 3 passes over its "
            f"{len(mine)} shards (e.g. {mine[:3]}); {self.num_skipped} broken samples or shards skipped"
        )

    def _read(self, urls: Iterator[str]) -> Iterator[dict[str, Any]]:
        streams = _open_shards(urls, handler=self.handler)
        files = tariterators.tar_file_expander(streams, handler=self.handler)
        for sample in tariterators.group_by_keys(files, handler=self.handler):
            self._num_read += 1
            yield sample

    def _decoded(self, samples: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        failures = 0  # consecutive samples that did not decode
        for sample in samples:
            try:
                decoded = self.decoder(sample)
            except Exception as exn:
                self.handler(exn)
                failures += 1
                # Training streams never end: once every sample of 3 passes (plus whatever the
                # shuffle buffer held) failed, nothing in these shards decodes.
                if self.training and self._pass_size and failures >= 3 * self._pass_size + self.shuffle_buffer:
                    raise self._stalled(worker) from None
                continue
            failures = 0
            yield decoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._num_read = self._pass_size = 0
        samples = self._read(self._urls(worker, num_workers))
        if self.training and self.shuffle_buffer > 1:
            # The buffer shuffles encoded samples and decoding comes after it (the open_clip
            # order): it holds compressed bytes, not transformed float tensors (7-20x larger at
            # 224 px: ~600 MB per worker for 1,000 samples), and the samples still in it when
            # the epoch's last batch is taken are never decoded (decoding first wasted
            # shuffle_buffer decodes + transforms per worker and epoch).
            rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker, 3))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        decoded = self._decoded(samples, worker)
        collate = Collate(self.decoder.transform, normalize=self.normalize)
        yield from wds.batched(self.batch_size, collation_fn=collate, partial=not self.training)(decoded)


def _check_rank(*, rank: int, world_size: int, num_workers: int, batch_size: int) -> None:
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if int(rank) != rank or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _loader(dataset: _ShardStream, *, num_workers: int, seed: int, pin_memory: bool) -> wds.WebLoader:
    generator = torch.Generator()
    # makes the torch seeds of the workers (hence random augmentations) reproducible
    generator.manual_seed(_seed_int(seed, dataset.epoch, dataset.rank, 4) % (1 << 63))
    return wds.WebLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        generator=generator,
    )


def train_loader(
    *,
    shards_dir: str | os.PathLike[str] | Manifest,
    split: str = "train",
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    transform: Transform | None,
    num_batches: int,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    pin_memory: bool = False,
    normalize: bool = True,
) -> wds.WebLoader:
    """A loader yielding exactly `num_batches` full batches of `batch_size` on this rank; build one per epoch.

    `shards_dir` is the shard folder or its Manifest, read once by the caller (training passes
    the run's, so the manifest is not re-read every epoch); the same holds for eval_loader.

    The open_clip scheme: every rank shuffles the full shard list with the same seed
    (seed, epoch), takes every world_size-th shard from its rank, then every
    num_workers-th of those per dataloader worker, so ranks x workers partition the shards.
    Each worker cycles over its shards (reshuffled on every pass after the first) and
    shuffles samples in a buffer of `shuffle_buffer`; partial batches are dropped, and the
    loader stops after `num_batches` batches, so no rank runs short and every rank takes the
    same number of steps. `resampled=True` instead draws shards with replacement, seeded by
    (seed, epoch, rank, worker). Rank and world size come from the arguments only
    (webdataset's RANK/WORLD_SIZE environment lookup is not used). Broken samples are
    skipped, counted and warned about at most every 30 s. Batches: {"image": float32 B x 3 x H x W, "label": int64 B,
    "idx": int64 B, "key": list[str]}. `transform` maps a PIL image to a 3 x H x W tensor
    (None: [0, 1] floats, no augmentation). An ImageTransform (build_transform's) runs its
    geometry per image and normalises each batch in one pass; with `normalize=False` the images
    stay uint8 B x 3 x H x W, for the consumer to normalise where the model runs
    (avgk.models.inputs.model_input): 4x less shared memory and host-to-device traffic.
    """
    _check_rank(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    _check_normalize(transform, normalize)
    if int(num_batches) != num_batches or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(shuffle_buffer) != shuffle_buffer or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}")
    manifest = shards_dir if isinstance(shards_dir, Manifest) else read_manifest(shards_dir)
    urls = manifest.shard_urls(split)
    num_streams = world_size * max(1, num_workers)
    if not urls:
        raise ValueError(f"split {split!r} in {manifest.root} has no shards to train on")
    if not resampled and len(urls) < num_streams:
        raise ValueError(
            f"split {split!r} has {len(urls)} shards, fewer than world_size x max(1, num_workers) = "
            f"{world_size} x {max(1, num_workers)} = {num_streams}: every worker needs a shard; "
            "write more shards (a smaller maxcount) or use resampled=True"
        )
    dataset = _ShardStream(
        shard_urls=urls,
        training=True,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        batch_size=batch_size,
        decoder=SampleDecoder(transform=transform, num_classes=manifest.num_classes, with_posterior=False),
        normalize=normalize,
    )
    return _loader(dataset, num_workers=num_workers, seed=seed, pin_memory=pin_memory).with_epoch(num_batches)


def eval_loader(
    *,
    shards_dir: str | os.PathLike[str] | Manifest,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    transform: Transform | None,
    num_classes: int | None = None,
    with_posterior: bool = False,
    pin_memory: bool = False,
    normalize: bool = True,
) -> wds.WebLoader:
    """A deterministic loader reading each sample of the split exactly once across all ranks.

    Shard i goes to rank i % world_size, then to that rank's workers in turn; the last batch
    of each worker may be partial, and a rank without shards yields nothing. With
    `with_posterior`, batches also hold "posterior": float32 B x L (L = num_classes, by
    default the manifest's). `transform` and `normalize` as in train_loader.
    """
    _check_rank(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    _check_normalize(transform, normalize)
    manifest = shards_dir if isinstance(shards_dir, Manifest) else read_manifest(shards_dir)
    urls = manifest.shard_urls(split)
    if num_classes is None:
        num_classes = manifest.num_classes
    elif num_classes < manifest.num_classes:
        raise ValueError(f"num_classes must be >= the manifest's {manifest.num_classes}, got {num_classes}")
    dataset = _ShardStream(
        shard_urls=urls,
        training=False,
        rank=rank,
        world_size=world_size,
        seed=0,
        epoch=0,
        resampled=False,
        shuffle_buffer=0,
        batch_size=batch_size,
        decoder=SampleDecoder(transform=transform, num_classes=num_classes, with_posterior=with_posterior),
        normalize=normalize,
    )
    return _loader(dataset, num_workers=num_workers, seed=0, pin_memory=pin_memory)


def num_train_batches(*, num_samples: int, batch_size: int, world_size: int) -> int:
    """Steps per epoch so that every rank sees about one pass: floor(num_samples / (batch_size * world_size))."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    num_batches = int(num_samples) // (int(batch_size) * int(world_size))
    if num_batches < 1:
        raise ValueError(
            f"num_samples={num_samples} is less than batch_size x world_size = {batch_size} x {world_size} "
            f"= {batch_size * world_size}: not one full batch per rank"
        )
    return num_batches
