"""What every study script shares: one training cell in its own process, and the 95% interval.

A cell is one `avgk.training.engine.fit` run (the loop Ray Train runs on every worker) with one CPU
thread, its progress in <run_dir>/train.log and its record in <run_dir>/cell.json, written last:
a rerun reads finished cells back, so every study resumes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def fit_cell(config, extra: dict) -> dict:
    """Train and evaluate one config (or read its finished record); `extra` is copied into the record."""
    import torch

    from avgk.training import checkpoints, engine

    torch.set_num_threads(1)
    run_dir = Path(config.run_dir)
    done = run_dir / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log_file:
        result = engine.fit(config, reporter=checkpoints.LocalReporter(str(run_dir)),
                            log=lambda line: print(line, file=log_file, flush=True))
    test = result.evaluation.metrics["test"]
    curve = [h["val_avg_k_accuracy"] for h in result.history]
    record = {
        **extra,
        "seconds": time.perf_counter() - start,
        **{f"avg{k}": test["avg_k_accuracy"][k] for k in test["avg_k_accuracy"]},
        **{f"macro_avg{k}": test["macro_avg_k_accuracy"][k] for k in test["macro_avg_k_accuracy"]},
        **{f"oracle_avg{k}": v for k, v in test.get("oracle_avg_k_accuracy", {}).items()},
        "best_epoch": int(np.argmax(curve)) + 1,
        "val_avg_k_by_epoch": curve,
    }
    done.write_text(json.dumps(record))
    return record


def interval(values: np.ndarray) -> float:
    """Half-width of the 95% t-interval of the mean (0 for one value)."""
    from scipy import stats

    n = len(values)
    return 0.0 if n < 2 else float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
