"""`avgk demo`: the embedded default end to end, two-head against softmax thresholding."""

from __future__ import annotations

import time

from avgk import tracking
from avgk.config import load_config
from pipelines.report import format_summary, verdict
from pipelines.train import run_training

METHODS = ("two_head", "ce")


def run_demo(overrides: list[str] | None = None) -> dict[str, dict]:
    base = load_config(None, overrides)
    documents: dict[str, dict] = {}
    start = time.perf_counter()
    for method in METHODS:
        config = base.model_copy(deep=True)
        config.loss.name = method
        config.run.name = f"{base.run.name}-{method}"
        print(f"\n=== training {method} ({config.train.epochs} epochs, {config.train.num_workers} Ray worker(s)) ===", flush=True)
        evaluation = run_training(config)
        assert evaluation is not None, "training finished without writing metrics.json"
        documents[method] = evaluation.metrics
    print(f"\n=== test set, thresholds calibrated on val ({time.perf_counter() - start:.0f} s) ===")
    print(format_summary(documents))
    print("\n" + verdict(documents, method=METHODS[0], reference=METHODS[1], k=base.loss.k))
    if base.tracking.enabled:
        uri = tracking.tracking_uri(base)
        print(f"\nruns in {base.run.storage}/; MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return documents
