"""`avgk compare`: paired differences between methods over finished runs, with 95% intervals.

Pure functions over metrics.json documents; no Ray. Runs are labelled by method and paired by
seed (method minus reference, same seed, same data), so an interval is the t-interval of the
paired differences: mean +- t(0.975, n-1) * std / sqrt(n). One pair gives a difference and no
interval, and the table says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import pandas as pd
from matplotlib.figure import Figure

from avgk.evaluation.metrics import format_k

METRICS = ("avg_k_accuracy", "macro_avg_k_accuracy")


@dataclass(frozen=True)
class RunEntry:
    method: str
    seed: int
    run_dir: str
    metrics: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]] = ()  # per-epoch metrics (history.json), when the run wrote them


def best_epoch(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The 1-based epoch of the best val avg-K (the checkpoint a run evaluates by default)."""
    if not history or any(h.get("val_avg_k_accuracy") is None for h in history):
        return None
    curve = [float(h["val_avg_k_accuracy"]) for h in history]
    return max(range(len(curve)), key=lambda i: curve[i]) + 1


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (scipy's)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def rows_of(entries: Sequence[RunEntry]) -> pd.DataFrame:
    """One row per run: method, seed, and every test metric of METRICS at every K (`avg_k_accuracy@2`)."""
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"method": entry.method, "seed": entry.seed, "run_dir": entry.run_dir,
                               "best_epoch": best_epoch(entry.history), "epochs": len(entry.history) or None}
        test = entry.metrics["test"]
        for name in METRICS:
            for k, value in (test.get(name) or {}).items():
                row[f"{name}@{k}"] = value
        for k, value in (test.get("oracle_avg_k_accuracy") or {}).items():  # known posteriors: synthetic data
            row[f"oracle_avg_k_accuracy@{k}"] = value
        row.update(_set_rule_columns(test.get("set_rules") or {}))
        row.update(_set_rule_columns(test.get("oracle_set_rules") or {}, prefix="oracle_"))
        rows.append(row)
    frame: pd.DataFrame = pd.DataFrame(rows)
    duplicated = frame[frame.duplicated(["method", "seed"], keep=False)]
    if not duplicated.empty:
        pairs = sorted({(m, int(s)) for m, s in zip(duplicated["method"], duplicated["seed"], strict=True)})
        raise ValueError(f"two runs share method and seed {pairs}: one run per method and seed")
    return frame


BINS = ("few", "medium", "many")


def _set_rule_columns(rules: Mapping[str, Mapping[str, Any]], *, prefix: str = "") -> dict[str, float | None]:
    """coverage@<rule>@<target>, set_size@..., and the same per training-frequency bin (coverage_few@...)."""
    row: dict[str, float | None] = {}
    for rule, targets in rules.items():
        for target, entry in targets.items():
            at = f"@{rule}@{target}"
            row[f"{prefix}coverage{at}"] = entry["coverage"]
            row[f"{prefix}set_size{at}"] = entry["avg_set_size"]
            for name in BINS:
                group = (entry.get("by_frequency") or {}).get(name) or {}
                row[f"{prefix}coverage_{name}{at}"] = group.get("coverage")
                row[f"{prefix}set_size_{name}{at}"] = group.get("avg_set_size")
    return row


def _num(value: float, *, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _difference_cells(diffs: pd.DataFrame, method: str, *, reference: str, fmt: Callable[..., str]) -> str:
    """A row's last two cells: its paired difference to the reference (pairs) and the 95% interval."""
    if method == reference:
        return " (reference) | |"
    d = diffs.loc[method]
    interval = "-" if math.isnan(d["low"]) else f"[{fmt(d['low'], signed=True)}, {fmt(d['high'], signed=True)}]"
    return f" {fmt(d['diff'], signed=True)} ({int(d['pairs'])} pairs) | {interval} |"


def coverage_markdown(rows: pd.DataFrame, *, reference: str) -> str:
    """Per set rule and coverage target: each method's test coverage and mean set size (+- std over seeds), the
    paired difference in set size to the reference with its 95% interval, and both per training-frequency bin."""
    targets = sorted({str(c).removeprefix("set_size") for c in rows.columns if str(c).startswith("set_size@")})
    if not targets:
        return ""
    parts = ["", "## Sets with a coverage target (eval.set_rules)", "",
             "Mean set size at each target (smaller is better at equal coverage); coverage in %; the size "
             f"difference is paired by seed against `{reference}`, with its 95% t-interval; per bin: the test "
             "images of the classes with few / medium / many training images (eval.freq_bins)."]
    for at in targets:
        rule, target = at.removeprefix("@").split("@")
        diffs = paired_differences(rows, reference=reference, column=f"set_size{at}").set_index("method")
        bins = " | ".join(f"{b}: coverage, size" for b in BINS)
        parts += ["", f"### {rule} at coverage {target}", "",
                  f"| method | runs | coverage % | mean set size | size vs {reference} | 95% interval | {bins} |",
                  "|---|---:|---:|---:|---:|---|" + "---|" * len(BINS)]
        for method, frame in rows.groupby("method", sort=True):
            size = frame[f"set_size{at}"]
            line = (f"| {method} | {len(frame)} | {_pts(float(frame[f'coverage{at}'].mean()))} | "
                    f"{_num(float(size.mean()))} ± {_num(float(size.std(ddof=1)))} |")
            line += _difference_cells(diffs, str(method), reference=reference, fmt=_num)
            for b in BINS:
                coverage = pd.to_numeric(frame[f"coverage_{b}{at}"], errors="coerce")
                bin_size = pd.to_numeric(frame[f"set_size_{b}{at}"], errors="coerce")
                line += (" - |" if coverage.isna().all() else
                         f" {_pts(float(coverage.mean()))}, {_num(float(bin_size.mean()))} |")
            parts.append(line)
        oracle = f"oracle_set_size{at}"
        if oracle in rows and rows[oracle].notna().any():
            parts += ["", f"Bayes-optimal sets (the data's known posterior, calibrated the same way): mean size "
                          f"{_num(float(rows[oracle].mean()))} at coverage {_pts(float(rows[f'oracle_coverage{at}'].mean()))}%."]
    return "\n".join(parts) + "\n"


def paired_differences(rows: pd.DataFrame, *, reference: str, column: str) -> pd.DataFrame:
    """Per method: mean of (method - reference) over the seeds both have, std, pairs, 95% interval."""
    methods = sorted(set(rows["method"]))
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not one of the compared methods {methods}")
    ref = rows[rows["method"] == reference][["seed", column]].rename(columns={column: "reference"})
    out = []
    for method in methods:
        if method == reference:
            continue
        joined = rows[rows["method"] == method][["seed", column]].merge(ref, on="seed", how="inner")
        diffs = (joined[column] - joined["reference"]).to_numpy(dtype=float)
        n = len(diffs)
        mean = float(diffs.mean()) if n else math.nan
        std = float(diffs.std(ddof=1)) if n > 1 else math.nan
        half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        out.append({"method": method, "pairs": n, "diff": mean, "std": std, "low": mean - half, "high": mean + half})
    table: pd.DataFrame = pd.DataFrame(out, columns=["method", "pairs", "diff", "std", "low", "high"])
    return table


def summary_table(rows: pd.DataFrame, *, column: str) -> pd.DataFrame:
    grouped = rows.groupby("method", sort=True)[column]
    table: pd.DataFrame = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1),
                                        "runs": grouped.size()}).reset_index()
    return table


def _pts(value: float, *, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def markdown(rows: pd.DataFrame, *, reference: str, ks: Sequence[str]) -> str:
    """Per K and metric: each method's mean +- std (%), and its paired difference to the reference with the 95% interval."""
    parts = [f"{len(rows)} runs, {rows['seed'].nunique()} seed(s); differences are paired by seed against "
             f"`{reference}`, in points, with 95% t-intervals (none from one pair)."]
    for k in ks:
        for name in METRICS:
            column = f"{name}@{k}"
            if column not in rows:
                continue
            summary = summary_table(rows, column=column)
            diffs = paired_differences(rows, reference=reference, column=column).set_index("method")
            parts += ["", f"## {name.replace('_', ' ')} at K={k}", "",
                      "| method | runs | mean % | std | diff vs " + reference + " | 95% interval |",
                      "|---|---:|---:|---:|---:|---|"]
            for _, r in summary.iterrows():
                method = str(r["method"])
                line = f"| {method} | {int(r['runs'])} | {_pts(r['mean'])} | {_pts(r['std'])} |"
                line += _difference_cells(diffs, method, reference=reference, fmt=_pts)
                parts.append(line)
            oracle = f"oracle_avg_k_accuracy@{k}"
            if name == METRICS[0] and oracle in rows and rows[oracle].notna().any():
                parts += ["", f"Bayes oracle (the data's known posterior): {_pts(float(rows[oracle].mean()))}% avg-{k}."]
    if rows["best_epoch"].notna().any():
        parts += ["", "## best val epoch (the checkpoint evaluated), by seed", "", "| method | epochs trained | best epochs |",
                  "|---|---:|---|"]
        for method, frame in rows.sort_values("seed").groupby("method", sort=True):
            epochs = ", ".join("-" if pd.isna(e) else str(int(e)) for e in frame["best_epoch"])
            trained = ", ".join(sorted({str(int(e)) for e in frame["epochs"].dropna()}))
            parts.append(f"| {method} | {trained} | {epochs} |")
    return "\n".join(parts) + "\n" + coverage_markdown(rows, reference=reference)


def plot_val_curves(entries: Sequence[RunEntry]) -> Figure | None:
    """Val avg-K by epoch, the mean over each method's seeds, its best epoch marked; None without histories."""
    import numpy as np

    curves: dict[str, list[list[float]]] = {}
    for entry in entries:
        curve = [h.get("val_avg_k_accuracy") for h in entry.history]
        if curve and all(v is not None for v in curve):
            curves.setdefault(entry.method, []).append([float(v) for v in curve])  # type: ignore[arg-type]
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    for i, (method, runs) in enumerate(sorted(curves.items())):
        length = min(len(c) for c in runs)  # seeds of one method train as many epochs
        mean = 100 * np.mean([c[:length] for c in runs], axis=0)
        epochs = np.arange(1, length + 1)
        style = ("-", "--", ":")[i // 10 % 3]  # matplotlib cycles 10 colours: more methods differ by line style
        (line,) = ax.plot(epochs, mean, style, label=f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        best = int(np.argmax(mean))
        ax.plot(epochs[best], mean[best], "o", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("val avg-K accuracy, % (mean over seeds)")
    ax.set_title("validation avg-K by epoch (dot: best epoch)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def plot_differences(rows: pd.DataFrame, *, reference: str, ks: Sequence[str], metric: str = "avg_k_accuracy") -> Figure:
    """Paired difference to the reference (points) per K, one marker per method, 95% intervals as bars."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    methods = sorted(set(rows["method"]) - {reference})
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, k in enumerate(ks):
            column = f"{metric}@{k}"
            if column not in rows:
                continue
            d = paired_differences(rows, reference=reference, column=column).set_index("method").loc[method]
            xs.append(j + (i - (len(methods) - 1) / 2) * width)
            ys.append(100 * d["diff"])
            errs.append(0.0 if math.isnan(d["high"]) else 100 * (d["high"] - d["diff"]))
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=4, label=method)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
    ax.set_ylabel(f"{metric.replace('_', ' ')}: difference (points)")
    ax.set_title(f"paired by seed against {reference}; bars: 95% intervals")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def winner(rows: pd.DataFrame, *, reference: str, k: float) -> str:
    """The method with the best mean test avg-K accuracy at k (the reference included)."""
    column = f"avg_k_accuracy@{format_k(k)}"
    means = rows.groupby("method")[column].mean()
    return str(means.idxmax())
