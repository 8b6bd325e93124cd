"""`avgk prepare`: the configured source converted to WebDataset shards with a manifest, and the
check every training entry point runs first (ensure_shards)."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator

from avgk.config import SOURCES, Config, ConfigError
from avgk.config.data import GENERATED_SOURCES
from avgk.data.manifest import Manifest, read_manifest
from avgk.data.sources import ConvertOptions, available_cpus
from avgk.runtime import console, locks, safe_fs, storage

SPLITS = ("train", "val", "test")


def convert_options(config: Config, *, progress: bool = True) -> ConvertOptions:
    """data.* conversion settings -> ConvertOptions (prepare_workers=0: every available CPU)."""
    data = config.data
    return ConvertOptions(
        resize_shorter=data.resize_shorter,
        jpeg_quality=data.jpeg_quality,
        strict=data.strict,
        maxcount=data.shard_maxcount,
        maxsize_mb=data.shard_maxsize_mb,
        workers=data.prepare_workers or available_cpus(),
        progress=progress,
    )


def prepare(config: Config, *, progress: bool = True) -> Manifest:
    """Write shards for `data.source` into `data.shards` and return the manifest.

    Idempotent: a complete output written from the same inputs and settings is reused
    untouched. Conversion runs in data.prepare_workers processes with tqdm bars on stderr;
    skipped files are listed in the manifest and summarised on stderr.
    """
    with _writing(config):
        return _prepare(config, progress=progress)


@contextlib.contextmanager
def _writing(config: Config) -> Iterator[None]:
    """One command at a time writes (or checks) a shard folder on this machine; the others wait."""
    shards = storage.absolute(config.data.shards)
    with locks.waiting(f"shard folder {shards}", what=f"writes data.shards={shards}", say=console.say):
        yield


def _prepare(config: Config, *, progress: bool = True) -> Manifest:
    data = config.data
    try:
        manifest: Manifest = SOURCES.get(data.source)(data, convert_options(config, progress=progress))
    except OSError as err:
        if safe_fs.is_disk_full(err):
            raise safe_fs.DiskFullError(storage.display(data.shards)) from None
        raise
    if "train" in manifest.splits:
        empty = [manifest.classes[c] for c, n in enumerate(manifest.split("train").class_counts) if n == 0]
        if empty:
            print(f"avgk prepare: {len(empty)} of {manifest.num_classes} classes have no training image "
                  f"(kept, so class ids stay the sorted folder names): {empty[:10]}", file=sys.stderr)
    skipped = {split: len(info.skipped) for split, info in manifest.splits.items() if info.skipped}
    if skipped:
        counts = ", ".join(f"{split} {n}" for split, n in skipped.items())
        print(f"avgk prepare: skipped files ({counts}), listed with reasons under splits.<split>.skipped in "
              f"{storage.display(manifest.path)}", file=sys.stderr)
    return manifest


def ensure_shards(config: Config) -> None:
    """Generated data (synthetic, digits) is written on first use; converted sources must have been prepared.

    A folder that already holds a prepared data set is used as it is, whatever data.source says:
    its manifest says what the shards are, and training never writes over its input. The
    config is then checked against the manifest (check_data).
    """
    if config.data.source not in GENERATED_SOURCES:
        check_data(config, read_manifest(config.data.shards))
        return
    with _writing(config):  # a command generating this folder now is waited for, then its data reused
        try:
            existing = read_manifest(config.data.shards)
        except FileNotFoundError:
            existing = None
        if existing is None or existing.source == config.data.source:
            if existing is not None:
                refuse_other_settings(config, existing)
            _prepare(config)
    check_data(config, read_manifest(config.data.shards))


def refuse_other_settings(config: Config, existing: Manifest) -> None:
    """Generated data asked for with other settings than the folder's: rewriting it would pull the data
    from under any command reading it (another training on the same machine), so it is refused."""
    data = config.data
    options = convert_options(config, progress=False).output_settings()  # what the digits' converter records
    wanted = {**data.synthetic.model_dump(), "maxcount": data.shard_maxcount, **options}
    differ = [f"{key}={existing.settings[key]!r} (this config: {value!r})" for key, value in wanted.items()
              if key in existing.settings and existing.settings[key] != value]
    if differ:
        raise ConfigError(f"data error: data.shards={config.data.shards} holds {existing.source} data made with "
                          f"{', '.join(differ)}: choose another data.shards for these settings (or remove that "
                          "folder to write it again)")


def check_data(config: Config, manifest: Manifest) -> None:
    """The config against the prepared data: splits present and non-empty, batch and K x N within the data."""
    where = f"data.shards={config.data.shards}"
    for split in SPLITS:
        if split not in manifest.splits:
            raise ConfigError(f"data error: {where} has no {split!r} split (it has {sorted(manifest.splits)}): "
                              "a run needs train, val and test; re-run `avgk prepare`")
        if manifest.splits[split].num_samples < 1:
            raise ConfigError(f"data error: {where}: split {split!r} holds no samples")
    try:
        config.validate_num_classes(manifest.num_classes)
    except ValueError as err:
        raise ConfigError(f"config error: {err} (from {where})") from None
    train = manifest.splits["train"].num_samples
    workers = config.train.num_workers
    if config.train.batch_size > train:
        raise ConfigError(f"config error: train.batch_size={config.train.batch_size} exceeds the {train} training "
                          f"samples of {where}: an epoch would hold no full batch")
    accumulation = config.train.grad_accumulation
    if config.train.batch_size * accumulation > train:
        raise ConfigError(f"config error: train.grad_accumulation={accumulation} x train.batch_size="
                          f"{config.train.batch_size} exceeds the {train} training samples of {where}: an epoch "
                          "would hold no optimizer step")
    for split in ("val", "test"):
        n = manifest.splits[split].num_samples
        for key, k in [("loss.k", config.loss.k), *(("eval.ks", k) for k in config.eval.ks)]:
            if math.floor(k * n + 0.5) < 1:  # m = floor(K N + 1/2), docs/METHOD.md section 1
                raise ConfigError(f"config error: {key}={k:g} selects round(K x N) = 0 of the {n} {split} samples: "
                                  "K x N must be >= 1")
    if config.loss.name == "two_head" and config.loss.pseudo_labels == "online":
        per_rank = config.train.batch_size // workers
        if math.floor(config.loss.effective_pseudo_k * per_rank + 0.5) < 1:
            raise ConfigError(f"config error: loss.pseudo_k={config.loss.effective_pseudo_k:g} selects round(K_pl x B) = 0 "
                              f"of a rank's {per_rank} samples per batch: K_pl x B must be >= 1")
