"""Source converters for `avgk prepare`: image folders, Pl@ntNet-300K and CIFAR-100 -> WebDataset shards + manifest,
and the synthetic generator; each named in avgk.config.registry.SOURCES.
Part of avgk.data (layer 4): may import the rest of avgk.data, avgk.records, avgk.config and avgk.runtime.
"""

from avgk.data.sources.cifar100 import block_label_noise, prepare_cifar100, stratified_holdout
from avgk.data.sources.common import HIDDEN_REASON, IMAGE_SUFFIXES, ConvertOptions, available_cpus, encode_image
from avgk.data.sources.imagefolder import prepare_imagefolder, ratio_split
from avgk.data.sources.plantnet300k import SPECIES_NAMES_FILE, prepare_plantnet300k

__all__ = [
    "HIDDEN_REASON",
    "IMAGE_SUFFIXES",
    "SPECIES_NAMES_FILE",
    "ConvertOptions",
    "available_cpus",
    "block_label_noise",
    "encode_image",
    "prepare_cifar100",
    "prepare_imagefolder",
    "prepare_plantnet300k",
    "ratio_split",
    "stratified_holdout",
]
