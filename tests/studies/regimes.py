"""Does the two-head loss beat CE? Three training regimes x four methods, each tuned with the same budget.

    python -m tests.studies.regimes                     # the whole study, resumable (rerun = resume)
    python -m tests.studies.regimes --report            # tables and figure from finished cells only
    python -m tests.studies.regimes --curves            # CE and avgk's recipe trained 100 epochs (CURVES)

Stages, each skipped when its output exists (everything under runs/regimes/):
1. data: the target set (50 synthetic classes, ambiguity 0.5, 3,000 / 1,000 / 2,000 images at
   16 px: the recipe screen's) and the pretraining source (configs/studies/regimes-source.yaml:
   50 other classes from another generator seed, 12,000 training images).
2. source: a CE model trained on the source, the stand-in for ImageNet weights.
3. tune: `avgk tune` (pipelines.tune.run_sweep: one TorchTrainer per trial, ASHA on val avg-2,
   grace 3 epochs) for every method from scratch (10 epochs), NUM_TRIALS random trials each over
   the method's own knobs (SPACES); every regime trains with the values chosen there.
4. final: every regime x method x K x seed with the tuned values, trained as single-process
   cells (tests/studies/cells.py), two at a time. One model per K: the two-head models of the
   avg-3 columns are trained with loss.k = K_pl = 3 (values tuned at K = 2), in K3_REGIMES;
   CE has no K and is scored at both from one model.
5. report: runs/regimes/summary.md, results.csv, tuned.csv, curves.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tests.studies.cells import fit_cell, interval

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "runs" / "regimes"
SOURCE_CONFIG = ROOT / "configs" / "studies" / "regimes-source.yaml"
SEEDS = (0, 1, 2)
KS = (2, 3)
NUM_TRIALS = 6

COMMON = {
    "data.source": "synthetic", "data.shards": str(OUT / "data" / "target"), "data.shard_maxcount": 500,
    "data.synthetic.num_classes": 50, "data.synthetic.num_train": 3000, "data.synthetic.num_val": 1000,
    "data.synthetic.num_test": 2000, "data.synthetic.image_size": 16, "data.synthetic.ambiguity_rate": 0.5,
    "data.synthetic.seed": 0, "data.resize": 16, "data.crop": 16, "data.loader_workers": 0,
    "model.backbone": "small_cnn", "model.width": 16,
    "train.batch_size": 64, "train.schedule": "cosine", "train.num_workers": 1,
    "eval.ks": [1, 2, 3, 5], "tracking.enabled": False, "loss.k": 2,
}
REGIMES = {
    "scratch": {"train.epochs": 10},
    "long": {"train.epochs": 30},
    "finetune": {"train.epochs": 10, "model.pretrained": str(OUT / "source")},
}
# Does CE's val curve decline once trained far past the long regime? CE and avgk's recipe, one seed, 100 epochs
# (--curves, a separate table: the long regime's best epochs were 23-29 of 30, on a plateau).
CURVES = {"regime": "long100", "overrides": {"train.epochs": 100}, "methods": ("ce", "two_head"), "seeds": (0,)}
K3_REGIMES = ("scratch", "finetune")  # the K = 3 models; the long regime (3x the cost) trains K = 2 only
TUNED_IN = {"scratch": "scratch", "long": "scratch", "finetune": "scratch"}
# Every method pins every recipe key, so a change of avgk's defaults never changes a cell.
PAPER = {"train.optimizer": "sgd", "train.warmup_epochs": 0, "loss.ml_reduction": "sum",
         "train.lr_scale.multilabel": 1, "loss.ml_stop_gradient": False, "loss.pseudo_prior_tau": 0.0}
CHOSEN = {"train.optimizer": "adamw", "train.warmup_epochs": 1, "loss.ml_reduction": "mean",
          "loss.pseudo_prior_tau": 0.0}
METHODS = {
    "ce": {"loss.name": "ce", "train.optimizer": "adamw", "train.warmup_epochs": 1},
    "two_head_paper": {"loss.name": "two_head", **PAPER},       # the paper as specified: SGD, BCE summed
    "two_head": {"loss.name": "two_head", **CHOSEN},            # avgk's default recipe
    "two_head_tau1": {"loss.name": "two_head", **CHOSEN, "loss.pseudo_prior_tau": 1.0},  # beyond the paper
}
ADAMW_SPACE = {"train.lr": {"loguniform": [5e-4, 8e-3]}, "train.weight_decay": {"loguniform": [5e-3, 0.2]}}
SGD_SPACE = {"train.lr": {"loguniform": [0.01, 0.2]}, "train.weight_decay": {"loguniform": [1e-5, 1e-3]}}
TWO_HEAD_SPACE = {"loss.ml_weight": {"loguniform": [0.3, 3.0]}, "train.lr_scale.multilabel": {"choice": [1, 3, 10, 30]},
                  "loss.ml_stop_gradient": {"choice": [False, True]}}
SPACES = {
    "ce": ADAMW_SPACE,
    "two_head_paper": {**SGD_SPACE, "loss.ml_weight": {"loguniform": [0.3, 3.0]}},
    "two_head": {**ADAMW_SPACE, **TWO_HEAD_SPACE},
    "two_head_tau1": {**ADAMW_SPACE, **TWO_HEAD_SPACE},
}


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def build(values: dict):
    from avgk.config import build_config

    return build_config({}, [f"{k}={json.dumps(v)}" for k, v in values.items()])


# ---------------------------------------------------------------- stages 1-2: data and the source model


def prepare_data() -> None:
    from avgk.config import load_config
    from avgk.data.prepare import prepare

    prepare(build(COMMON), progress=False)
    prepare(source_config(load_config), progress=False)


def source_config(load_config):
    config = load_config(SOURCE_CONFIG)
    config.data.shards = str(OUT / "data" / "source")
    config.run.storage = str(OUT)
    return config


def train_source() -> dict:
    from avgk.config import load_config

    return fit_cell(source_config(load_config), {"cell": "source"})


# ---------------------------------------------------------------- stage 3: avgk tune, the same budget for every method


def sweep_file(regime: str, method: str) -> Path:
    folder = OUT / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.yaml"
    base.write_text(yaml.safe_dump(build({**COMMON, "train.cpus_per_worker": 0.5,
                                          "run.storage": str(OUT / "tune")}).to_dict(), sort_keys=False))
    space = SPACES[method]
    sweep = {
        "name": f"{regime}-{method}", "base": "base.yaml",
        "overrides": {**REGIMES[regime], **METHODS[method]},
        "space": space, "num_samples": NUM_TRIALS,
        "scheduler": {"name": "asha", "metric": "val_avg_k_accuracy", "mode": "max", "time_attr": "epoch",
                      "grace_period": 3, "reduction_factor": 2},
        "max_concurrent_trials": 2, "trial_cpus": 0.5, "seed": 0, "evaluate_best": False,
    }
    path = folder / f"{regime}-{method}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def tune(regime: str, method: str) -> dict:
    """The best trial's values (and its val avg-2), from `avgk tune`; cached in tuned/<regime>-<method>.json."""
    done = OUT / "tuned" / f"{regime}-{method}.json"
    if done.is_file():
        return json.loads(done.read_text())
    from avgk.experiments.sweep_config import load_sweep
    from pipelines.tune import run_sweep

    sweep, base = load_sweep(sweep_file(regime, method))
    start = time.perf_counter()
    outcome = run_sweep(sweep, base, log=lambda line: None)
    if outcome.best is None:
        raise RuntimeError(f"sweep {regime}-{method}: no trial reported a val avg-K (see {outcome.root})")
    record = {"regime": regime, "method": method, "params": {k: _plain(v) for k, v in outcome.best.params.items()},
              "val_avg2": outcome.best.best_val, "trials": len(outcome.rows),
              "epochs": sum(r.epochs for r in outcome.rows), "seconds": time.perf_counter() - start}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(record))
    return record


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------- stage 4: the final cells


def cell_values(regime: str, method: str, k: int, seed: int, params: dict) -> dict:
    overrides = CURVES["overrides"] if regime == CURVES["regime"] else REGIMES[regime]
    return {**COMMON, **overrides, **METHODS[method], **params, "loss.k": k, "train.seed": seed,
            "run.name": f"{regime}-{method}-k{k}-s{seed}", "run.storage": str(OUT / "runs")}


def run_cell(spec: tuple[str, str, int, int, dict]) -> dict:
    regime, method, k, seed, params = spec
    return fit_cell(build(cell_values(regime, method, k, seed, params)),
                    {"regime": regime, "method": method, "k": k, "seed": seed})


def final_cells(tuned: dict) -> list[tuple]:
    """The 10-epoch regimes first, seed-major, then the long one (3x the cost), so a partial study has whole
    seeds of the cheap regimes; CE once (K = 2), two-head once per K (K3_REGIMES)."""
    cells = [(regime, method, k, seed, tuned[(TUNED_IN[regime], method)]["params"])
             for seed in SEEDS for regime in REGIMES for method in METHODS
             for k in (KS[:1] if method == "ce" or regime not in K3_REGIMES else KS)]
    return sorted(cells, key=lambda cell: (cell[0] == "long", cell[3]))  # stable: method order kept


def curve_cells(tuned: dict) -> list[tuple]:
    return [(CURVES["regime"], method, KS[0], seed, tuned[("scratch", method)]["params"])
            for seed in CURVES["seeds"] for method in CURVES["methods"]]


def read_cells() -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*/cell.json"))]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- stage 5: the report


def _mean_ci(values: np.ndarray) -> str:
    values = 100 * np.asarray(values, dtype=float)
    return f"{values.mean():.1f} ± {interval(values):.1f}" if len(values) else "-"


def _paired(a: pd.DataFrame, b: pd.DataFrame, column: str) -> str:
    joined = a[["seed", column]].merge(b[["seed", column]], on="seed", suffixes=("", "_ref"))
    if joined.empty:
        return "-"
    gains = 100 * (joined[column] - joined[f"{column}_ref"]).to_numpy()
    return f"{gains.mean():+.1f} ± {interval(gains):.1f}"


def summary(rows: pd.DataFrame, tuned: pd.DataFrame) -> str:
    lines = ["| regime | method | seeds | test avg-2 % | avg-3 % | macro avg-2 % | macro avg-3 % | "
             "avg-2 minus CE | avg-3 minus CE | macro avg-2 minus CE | best epochs (K = 2) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for regime in REGIMES:
        frame = rows[rows.regime == regime]
        if frame.empty:
            continue
        ce = frame[frame.method == "ce"]
        for method in METHODS:
            at = {k: frame[(frame.method == method) & (frame.k == (2 if method == "ce" else k))] for k in KS}
            if at[2].empty:
                continue
            gains = ["", "", ""] if method == "ce" else [
                _paired(at[2], ce, "avg2"), _paired(at[3], ce, "avg3"), _paired(at[2], ce, "macro_avg2")]
            lines.append(f"| {regime} | {method} | {len(at[2])} | {_mean_ci(at[2].avg2)} | {_mean_ci(at[3].avg3)} | "
                         f"{_mean_ci(at[2].macro_avg2)} | {_mean_ci(at[3].macro_avg3)} | {' | '.join(gains)} | "
                         f"{', '.join(str(e) for e in at[2].best_epoch)} |")
        oracle = frame.iloc[0]
        lines.append(f"| {regime} | Bayes oracle | | {100 * oracle.oracle_avg2:.1f} | {100 * oracle.oracle_avg3:.1f} "
                     "| | | | | | |")
    lines += ["", "Mean ± half-width of the 95% t-interval over seeds; differences paired by seed. "
              f"Training time summed over cells: {rows.seconds.sum() / 60:.0f} min (two cells at a time, one thread each); "
              f"tuning: {tuned.seconds.sum() / 60:.0f} min of wall time; {os.cpu_count()} CPUs, {platform.machine()}.",
              "", "Tuned values (best val avg-2 of NUM_TRIALS trials each, from scratch at 10 epochs; every regime "
              "trains with them):", "",
              "| regime | method | values | best val avg-2 % | trials | epochs trained | minutes |",
              "|---|---|---|---:|---:|---:|---:|"]
    for _, t in tuned.iterrows():
        values = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                           for k, v in t.params.items())
        lines.append(f"| {t.regime} | {t.method} | {values} | {100 * t.val_avg2:.1f} | {t.trials} | {t.epochs} | "
                     f"{t.seconds / 60:.1f} |")
    return "\n".join(lines).replace("NUM_TRIALS", str(NUM_TRIALS))


def curves_table(rows: pd.DataFrame) -> str:
    """The --curves cells: where each val curve peaks and where it ends."""
    frame = rows[rows.regime == CURVES["regime"]]
    if frame.empty:
        return ""
    epochs = CURVES["overrides"]["train.epochs"]
    lines = [f"Trained {epochs} epochs (cosine schedule), seed(s) {', '.join(map(str, CURVES['seeds']))}:", "",
             "| method | seed | best epoch | best val avg-2 % | val avg-2 % at 30 | last epoch's val avg-2 % | "
             "test avg-2 % (best epoch) | macro avg-2 % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in frame.iterrows():
        curve = 100 * np.asarray(r.val_avg_k_by_epoch)
        lines.append(f"| {r.method} | {r.seed} | {r.best_epoch} | {curve.max():.1f} | {curve[29]:.1f} | "
                     f"{curve[-1]:.1f} | {100 * r.avg2:.1f} | {100 * r.macro_avg2:.1f} |")
    return "\n".join(lines)


def plot_curves(rows: pd.DataFrame, path: Path, *, regime: str = "long") -> None:
    """Val avg-2 by epoch in one regime (K = 2 models), mean over seeds, best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = rows[(rows.regime == regime) & (rows.k == 2)]
    if frame.empty:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        curves = [c for c in frame[frame.method == method].val_avg_k_by_epoch]
        if not curves:
            continue
        mean = 100 * np.mean(np.array(curves), axis=0)
        epochs = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(epochs, mean, label=f"{method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        best = int(np.argmax(mean))
        ax.plot(epochs[best], mean[best], "o", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("val avg-2 accuracy, %")
    ax.set_title(f"From scratch, {len(mean)} epochs: validation avg-2 by epoch (dot: best epoch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report() -> str:
    rows = read_cells()
    rows = rows[rows.get("regime").notna()] if "regime" in rows else rows
    tuned = pd.DataFrame([json.loads(p.read_text()) for p in sorted((OUT / "tuned").glob("*.json"))])
    rows = rows[rows.regime.isin(list(REGIMES))]
    text = summary(rows, tuned)
    rows.drop(columns=["val_avg_k_by_epoch"]).to_csv(OUT / "results.csv", index=False)
    tuned.to_csv(OUT / "tuned.csv", index=False)
    plot_curves(rows, OUT / "curves.png")
    (OUT / "summary.md").write_text(text + "\n")
    return text


def recorded_tuned() -> dict:
    """The tuned values the study recorded (docs/results/regimes-tuned.csv), by (regime, method)."""
    import ast

    table = pd.read_csv(ROOT / "docs" / "results" / "regimes-tuned.csv")
    return {(r.regime, r.method): {"params": ast.literal_eval(r.params)} for r in table.itertuples()}


def run_curves(parallel: int) -> str:
    """The CURVES cells with the recorded tuned values; writes curves-long100.md and .png under OUT."""
    from avgk.data.prepare import prepare

    prepare(build(COMMON), progress=False)
    cells = curve_cells(recorded_tuned())
    with mp.get_context("spawn").Pool(parallel, maxtasksperchild=1) as pool:
        for record in pool.imap_unordered(run_cell, cells):
            log(f"{record['regime']} {record['method']} s{record['seed']}: best epoch {record['best_epoch']}, "
                f"test avg-2 {100 * record['avg2']:.1f} ({record['seconds']:.0f} s)")
    rows = read_cells()
    rows = rows[rows.regime == CURVES["regime"]]
    text = curves_table(rows)
    name = f"curves-{CURVES['regime']}"
    plot_curves(rows, OUT / f"{name}.png", regime=CURVES["regime"])
    (OUT / f"{name}.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="only write the report from finished cells")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--curves", action="store_true",
                        help="only the CURVES cells (CE and avgk's recipe trained 100 epochs), with the tuned values "
                        "recorded in docs/results/regimes-tuned.csv")
    args = parser.parse_args()
    if args.curves:
        print(run_curves(args.parallel))
        return
    if args.report:
        print(report())
        return
    start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    log("data")
    prepare_data()
    log("source model")
    source = train_source()
    log(f"source: test avg-2 {100 * source['avg2']:.1f} ({source['seconds']:.0f} s)")
    tuned = {}
    try:
        for regime in sorted(set(TUNED_IN.values())):
            for method in METHODS:
                record = tune(regime, method)
                tuned[(regime, method)] = record
                log(f"tuned {regime} {method}: {record['params']} val avg-2 {100 * record['val_avg2']:.1f} "
                    f"({record['seconds']:.0f} s)")
    finally:
        import ray

        ray.shutdown()  # the final cells need both cores
    cells = final_cells(tuned)
    with mp.get_context("spawn").Pool(args.parallel, maxtasksperchild=1) as pool:
        for n, record in enumerate(pool.imap_unordered(run_cell, cells), 1):
            log(f"[{n}/{len(cells)}] {record['regime']} {record['method']} K={record['k']} s{record['seed']}: "
                f"test avg-{record['k']} {100 * record['avg' + str(record['k'])]:.1f} ({record['seconds']:.0f} s)")
    print(report())
    log(f"study done in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
