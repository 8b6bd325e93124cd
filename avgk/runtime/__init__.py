"""Process plumbing every layer may use: storage (local paths and pyarrow filesystem URIs), the
torch.distributed sums, console output, /proc readers, the guardian that ends what a killed command
leaves behind, and the source fingerprint (provenance).
Layer 1 of avgk, the bottom: imports nothing of avgk outside avgk.runtime (contracts: pyproject.toml).
"""
