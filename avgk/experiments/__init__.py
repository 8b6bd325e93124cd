"""Many runs together: sweep and reproduction-study configs, study aggregation, comparison tables
and the figures of finished runs.
Layer 10 of avgk, the top: may import any avgk layer, but, like all of avgk, neither Ray nor
pipelines (pipelines/tune.py and pipelines/study.py run what is configured here).
"""
