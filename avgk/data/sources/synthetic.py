"""The built-in synthetic source: generated, not converted (avgk.data.synthetic draws the images)."""

from __future__ import annotations

from avgk.config import DataConfig
from avgk.data.manifest import Manifest
from avgk.data.shards import write_synthetic_shards
from avgk.data.sources.common import ConvertOptions


def from_config(data: DataConfig, options: ConvertOptions) -> Manifest:
    s = data.synthetic
    return write_synthetic_shards(
        shards_dir=data.shards, num_classes=s.num_classes, num_train=s.num_train, num_val=s.num_val,
        num_test=s.num_test, image_size=s.image_size, zipf_exponent=s.zipf_exponent,
        ambiguity_rate=s.ambiguity_rate, seed=s.seed, maxcount=data.shard_maxcount,
    )
