"""`avgk demo`: the embedded default end to end, two-head against softmax thresholding.

The two runs train side by side, each a Ray Train run of its own on the one local cluster: a
run's single worker trains on one thread, so one after the other left a core of a 2-core laptop
mostly idle (BENCHMARKS.md, "Demo wall time").
"""

from __future__ import annotations

import threading
import time
from typing import Any

from avgk.config import Config, load_config
from avgk.evaluation.passes import Evaluation
from avgk.experiments.summary import format_summary, verdict
from avgk.records import tracking
from avgk.records.runs import with_absolute_paths
from avgk.runtime import storage
from pipelines import job
from pipelines.train import run_training

METHODS = ("two_head", "ce")


def method_configs(base: Config) -> dict[str, Config]:
    configs = {}
    for method in METHODS:
        config = base.model_copy(deep=True)
        config.loss.name = method
        config.run.name = f"{base.run.name}-{method}"
        configs[method] = with_absolute_paths(config)
    return configs


def _mark_killed(configs: dict[str, Config]) -> None:
    """Ctrl-C reaches only this thread: end the runs' MLflow runs here (their threads die with the process)."""
    for config in configs.values():
        id_file = storage.join(config.run_dir, tracking.RUN_ID_FILE)
        if config.tracking.enabled and storage.exists(id_file):
            tracking.end_run(tracking.tracking_uri(config), storage.read_bytes(id_file).decode().strip(), status="KILLED")


def run_demo(overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    base = load_config(None, overrides)
    configs = method_configs(base)
    start = time.perf_counter()
    # The data is made once, before the runs start: both would otherwise write the same data set.
    # resume=None: each run's own start (pipelines.train.run_training) checks its run directory.
    needed = len(METHODS) * base.train.num_workers * base.train.cpus_per_worker
    job.start(configs[METHODS[0]], cpus=needed, resume=None)
    print(f"\n=== training {' and '.join(METHODS)} side by side ({base.train.epochs} epochs, "
          f"{base.train.num_workers} Ray worker(s) each; lines start with the run's name) ===", flush=True)
    results: dict[str, Evaluation | BaseException | None] = {}

    def train(method: str) -> None:
        try:
            results[method] = run_training(configs[method], log_prefix=configs[method].run.name)
        except BaseException as err:  # re-raised on the main thread
            results[method] = err

    threads = [threading.Thread(target=train, args=(m,), name=f"demo-{m}", daemon=True) for m in METHODS]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)  # short joins: Ctrl-C and SIGTERM reach the main thread
    except BaseException:
        _mark_killed(configs)
        raise
    documents: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        result = results.get(method)
        if isinstance(result, BaseException):
            raise result
        assert result is not None, f"the {method} run finished without writing metrics.json"
        documents[method] = result.metrics
    print(f"\n=== test set, thresholds calibrated on val ({time.perf_counter() - start:.0f} s) ===")
    print(format_summary(documents))
    print("\n" + verdict(documents, method=METHODS[0], reference=METHODS[1], k=base.loss.k))
    if base.tracking.enabled:
        uri = tracking.tracking_uri(base)
        print(f"\nruns in {base.run.storage}/; MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return documents
