"""Data: synthetic data, WebDataset shards with their manifest, decoding, loaders and transforms,
and the `avgk prepare` converters of real data sets (avgk.data.sources).
Layer 4 of avgk: may import avgk.records, avgk.config and avgk.runtime, nothing above them.
"""
