"""Set-valued prediction with a trained run: SetPredictor and `avgk predict` (predict) and the
run's MLflow pyfunc model (serving).
Layer 9 of avgk: may import avgk.training and every layer below it; not avgk.experiments.
"""
