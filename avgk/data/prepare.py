"""`avgk prepare`: the configured source converted to WebDataset shards with a manifest, and the
check every training entry point runs first (ensure_shards)."""

from __future__ import annotations

import sys

from avgk import preflight, storage
from avgk.config import Config
from avgk.data.manifest import Manifest, read_manifest
from avgk.data.sources import ConvertOptions, available_cpus, converter_for


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
    data = config.data
    manifest = converter_for(data.source)(data, convert_options(config, progress=progress))
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
    """Synthetic data is generated on first use; real sources must have been prepared.

    A folder that already holds a prepared data set is used as it is, whatever data.source says:
    its manifest says what the shards are, and training never writes over its input. The
    config is then checked against the manifest (preflight.check_data).
    """
    try:
        existing = read_manifest(config.data.shards)
    except FileNotFoundError:
        existing = None
    if config.data.source == "synthetic" and (existing is None or existing.source == "synthetic"):
        prepare(config)
    preflight.check_data(config, read_manifest(config.data.shards))
