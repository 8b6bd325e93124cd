"""`avgk prepare`: the configured source converted to WebDataset shards with a manifest."""

from __future__ import annotations

from avgk.config import Config
from avgk.data.shards import write_synthetic_shards


def prepare(config: Config):
    """Write shards for `data.source` into `data.shards` (idempotent) and return the manifest."""
    data = config.data
    if data.source == "synthetic":
        s = data.synthetic
        return write_synthetic_shards(
            shards_dir=data.shards, num_classes=s.num_classes, num_train=s.num_train, num_val=s.num_val,
            num_test=s.num_test, image_size=s.image_size, zipf_exponent=s.zipf_exponent,
            ambiguity_rate=s.ambiguity_rate, seed=s.seed, maxcount=data.shard_maxcount,
        )
    raise ValueError(
        f"data.source={data.source!r} cannot be prepared by this version yet; supported: 'synthetic'"
    )
