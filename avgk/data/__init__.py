"""Data: synthetic data, WebDataset shards with their manifest, decoding, loaders and transforms,
and the `avgk prepare` converters of real data sets (avgk.data.sources).
Layer 4 of avgk: may import avgk.records, avgk.config and avgk.runtime, nothing above them.
"""

from avgk.data.loaders import eval_loader, num_train_batches, train_loader
from avgk.data.manifest import Manifest, SplitInfo, read_manifest, write_manifest
from avgk.data.shards import write_split, write_synthetic_shards
from avgk.data.synthetic import SyntheticSplit, generate_synthetic, posterior_dense
from avgk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Manifest",
    "SplitInfo",
    "SyntheticSplit",
    "build_transform",
    "eval_loader",
    "generate_synthetic",
    "num_train_batches",
    "posterior_dense",
    "read_manifest",
    "train_loader",
    "write_manifest",
    "write_split",
    "write_synthetic_shards",
]
