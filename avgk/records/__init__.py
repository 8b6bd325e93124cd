"""What a run leaves behind, found and written by name: run-directory lookups (checkpoints, the saved
config: `runs`) and the MLflow bookkeeping (`tracking`).
Layer 3 of avgk: may import avgk.config and avgk.runtime, nothing above them.
"""
