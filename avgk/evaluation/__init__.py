"""Evaluation as summable states: average-K and top-K set metrics, top-T score rows, the passes
that run thresholds, metrics and global pseudo-labels over batches, and the accounting of every sample.
Layer 6 of avgk: may import avgk.method and the layers below it (data, records, config, runtime).
"""
