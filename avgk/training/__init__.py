"""Training in plain torch, rank-agnostic: what a run is built from, the loops, checkpoints, scoring
on the training ranks, global pseudo-label refreshes and the checks a run passes before it starts.
Layer 8 of avgk: may import avgk.models and the layers below it (evaluation, method, data, records,
config, runtime); not avgk.inference or avgk.experiments.
"""
