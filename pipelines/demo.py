"""`avgk demo`: the embedded default end to end, two-head against softmax thresholding.

It runs the pipeline configs/pipelines/demo.yaml (data, the two trainings side by side as Ray
tasks, the comparison) and prints the comparison table and its one-sentence verdict. Run it
again and every finished stage is reused; `avgk pipeline configs/pipelines/demo.yaml --dry-run`
shows what would run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from avgk.config import find_config_file, load_config
from avgk.experiments.summary import format_summary, verdict
from avgk.records import tracking
from pipelines.pipeline import run_pipeline, train_documents

METHODS = ("two_head", "ce")
SPEC = Path("configs") / "pipelines" / "demo.yaml"


def demo_spec() -> Path:
    """The checkout's configs/pipelines/demo.yaml, else the one installed with avgk."""
    checkout = Path(__file__).resolve().parents[1] / SPEC
    return checkout if checkout.is_file() else find_config_file(SPEC)


def run_demo(overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    base = load_config(None, overrides)
    start = time.perf_counter()
    print(f"\n=== training {' and '.join(METHODS)} side by side ({base.train.epochs} epochs, "
          f"{base.train.num_workers} Ray worker(s) each; lines start with the run's name) ===", flush=True)
    result = run_pipeline(demo_spec(), overrides)
    if result.failed:
        raise RuntimeError(f"the demo's {', '.join(result.failed)} failed (see the lines above)")
    documents = train_documents(result, "train")
    documents = {method: documents[method] for method in METHODS}
    print(f"\n=== test set, thresholds calibrated on val ({time.perf_counter() - start:.0f} s) ===")
    print(format_summary(documents))
    print("\n" + verdict(documents, method=METHODS[0], reference=METHODS[1], k=base.loss.k))
    if base.tracking.enabled:
        uri = tracking.tracking_uri(result.plan.base)
        print(f"\nruns in {result.plan.root}/; MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return documents
