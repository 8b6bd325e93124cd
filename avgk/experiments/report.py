"""Figures of finished runs (matplotlib Agg, no pyplot state): accuracy vs K, per-class accuracy, set sizes.

Every plotting function takes the run documents keyed by a display name (several runs are
overlaid) and returns the Figure; `save_figure` writes it as PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import numpy as np
from matplotlib.figure import Figure

from avgk.runtime import storage

__all__ = [
    "RunResults",
    "load_run",
    "log_run_plots",
    "plot_accuracy_vs_k",
    "plot_per_class_accuracy",
    "plot_set_size_histogram",
    "plot_sweep",
    "run_names",
    "run_report",
    "save_figure",
    "write_run_plots",
]

PLOTS_DIR = "plots"


class RunResults:
    """What a finished run wrote: metrics.json, and per_class.parquet's columns when present."""

    def __init__(self, metrics: dict[str, Any], per_class: dict[str, np.ndarray] | None):
        self.metrics = metrics
        self.per_class = per_class


def load_run(run_dir: str) -> RunResults:
    import pyarrow.parquet as pq

    run_dir = storage.absolute(run_dir)
    metrics_file = storage.join(run_dir, "metrics.json")
    if not storage.exists(metrics_file):
        raise FileNotFoundError(f"no metrics.json in run directory {run_dir}: train or evaluate it first")
    per_class = None
    per_class_file = storage.join(run_dir, "per_class.parquet")
    if storage.exists(per_class_file):
        table = pq.read_table(io.BytesIO(storage.read_bytes(per_class_file)))
        per_class = {name: table.column(name).to_numpy() for name in table.column_names}
    return RunResults(storage.read_json(metrics_file), per_class)


def _ks(metrics: Mapping[str, Any]) -> list[str]:
    return sorted(metrics["test"]["avg_k_accuracy"], key=float)


def _sorted_points(values: Mapping[str, float]) -> tuple[list[float], list[float]]:
    keys = sorted(values, key=float)
    return [float(k) for k in keys], [values[k] for k in keys]


def plot_accuracy_vs_k(runs: Mapping[str, RunResults]) -> Figure:
    """Test avg-K (solid) and top-K (dashed) accuracy against K, one colour per run; oracle dotted."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, run) in enumerate(runs.items()):
        test, color = run.metrics["test"], f"C{i}"
        ax.plot(*_sorted_points(test["avg_k_accuracy"]), "o-", color=color, label=f"{name} avg-K")
        if test.get("top_k_accuracy"):
            ax.plot(*_sorted_points(test["top_k_accuracy"]), "s--", color=color, label=f"{name} top-K")
        if test.get("oracle_avg_k_accuracy"):
            ax.plot(*_sorted_points(test["oracle_avg_k_accuracy"]), ":", color=color, label=f"{name} oracle")
    ax.set_title("Test accuracy against K")
    ax.set_xlabel("K (average set size)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_per_class_accuracy(runs: Mapping[str, RunResults], *, k: str) -> Figure:
    """Per-class test avg-K accuracy against the class's training count (log x), runs overlaid.

    Points are classes; the line through each run's points is the mean accuracy per
    log-spaced frequency bin, which is what shows gains on rare classes.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    column = f"avg_k_accuracy@{k}"
    for i, (name, run) in enumerate(runs.items()):
        table = run.per_class
        if table is None or column not in table or "train_count" not in table:
            continue
        counts = np.asarray(table["train_count"], dtype=np.float64)
        accuracy = np.asarray(table[column], dtype=np.float64)
        keep = np.isfinite(accuracy) & (counts > 0)
        counts, accuracy = counts[keep], accuracy[keep]
        if not counts.size:
            continue
        ax.scatter(counts, accuracy, s=14, alpha=0.45, color=f"C{i}", label=f"{name} (classes)")
        edges = np.unique(np.geomspace(counts.min(), counts.max() * 1.0001, num=8))
        which = np.clip(np.digitize(counts, edges) - 1, 0, len(edges) - 2)
        centres, means = [], []
        for b in range(len(edges) - 1):
            if np.any(which == b):
                centres.append(float(np.sqrt(edges[b] * edges[b + 1])))
                means.append(float(accuracy[which == b].mean()))
        ax.plot(centres, means, "-", color=f"C{i}", linewidth=2, label=f"{name} (bin mean)")
    ax.set_xscale("log")
    ax.set_title(f"Per-class avg-{k} accuracy against training frequency")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel(f"avg-{k} accuracy of the class")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


def plot_set_size_histogram(runs: Mapping[str, RunResults], *, k: str) -> Figure:
    """Fraction of test images per predicted set size at one K, runs side by side."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    histograms = {name: run.metrics["test"].get("set_size_histogram", {}).get(k, {}) for name, run in runs.items()}
    sizes = sorted({int(s) for h in histograms.values() for s in h})
    width = 0.8 / max(1, len(histograms))
    for i, (name, histogram) in enumerate(histograms.items()):
        total = sum(histogram.values()) or 1
        fractions = [histogram.get(str(s), 0) / total for s in sizes]
        ax.bar(np.asarray(sizes) + (i - (len(histograms) - 1) / 2) * width, fractions, width=width,
               color=f"C{i}", label=name)
    ax.axvline(float(k), color="black", linestyle=":", linewidth=1, label=f"K = {k}")
    ax.set_title(f"Predicted set sizes at average-K = {k} (test)")
    ax.set_xlabel("set size |Γ(x)|")
    ax.set_ylabel("fraction of test images")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


def _set_rules(run: RunResults) -> dict[str, dict[str, Any]]:
    rules: dict[str, dict[str, Any]] = run.metrics["test"].get("set_rules") or {}
    return rules


def _rule_label(rule: str, entries: Mapping[str, Any], *, run: RunResults) -> str:
    """A rule's name, with its head where the run's rules or average-K use more than one."""
    heads = {e.get("head") for entries_ in _set_rules(run).values() for e in entries_.values()}
    heads.add(run.metrics.get("score_head"))
    head = next(iter(entries.values())).get("head")
    return f"{rule} ({head} head)" if head and len(heads) > 1 else rule


def plot_coverage_vs_target(runs: Mapping[str, RunResults]) -> Figure:
    """Test coverage (solid: marginal, dashed: mean over classes) against the coverage target of each set rule."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    targets: list[float] = []
    markers = "os^vDP*X"
    for i, (name, run) in enumerate(runs.items()):
        for j, (rule, entries) in enumerate(_set_rules(run).items()):
            x, y = _sorted_points({t: e["coverage"] for t, e in entries.items()})
            _, macro = _sorted_points({t: e["macro_coverage"] for t, e in entries.items()})
            ax.plot(x, y, f"{markers[j % len(markers)]}-", color=f"C{i}",
                    label=f"{name} {_rule_label(rule, entries, run=run)}")
            ax.plot(x, macro, f"{markers[j % len(markers)]}--", color=f"C{i}", alpha=0.6, label="_nolegend_")
            targets += x
    if targets:
        line = [min(targets), max(targets)]
        ax.plot(line, line, ":", color="black", linewidth=1, label="target")
    ax.set_title("Test coverage against the coverage target (calibrated on val)")
    ax.set_xlabel("coverage target 1 - alpha (dashed: the mean of the per-class coverages)")
    ax.set_ylabel("test coverage")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, not over them
    return fig


def plot_size_vs_coverage(runs: Mapping[str, RunResults]) -> Figure:
    """Mean set size against test coverage: each set rule through its targets, and average-K (dotted) through
    its K, one colour per run, each line naming its head (a two-head run's rules on both heads: the smaller
    the sets at a coverage, the better)."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    markers = "os^vDP*X"
    for i, (name, run) in enumerate(runs.items()):
        test = run.metrics["test"]
        for j, (rule, entries) in enumerate(_set_rules(run).items()):
            points = sorted((e["coverage"], e["avg_set_size"]) for e in entries.values())
            ax.plot(*zip(*points, strict=True), f"{markers[j % len(markers)]}-", color=f"C{i}",
                    label=f"{name} {_rule_label(rule, entries, run=run)}")
        keys = sorted(test.get("avg_k_accuracy", {}), key=float)
        if keys:
            head = run.metrics.get("score_head")
            ax.plot([test["avg_k_accuracy"][k] for k in keys], [test["avg_set_size"][k] for k in keys], ".:",
                    color=f"C{i}", label=f"{name} average-K" + (f" ({head} head)" if head else ""))
    ax.set_yscale("log")
    ax.set_title("Mean set size against test coverage")
    ax.set_xlabel("test coverage (avg-K accuracy for average-K)")
    ax.set_ylabel("mean set size (log scale)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, not over them
    return fig


def coverage_table(runs: Mapping[str, RunResults]) -> str:
    """Markdown: per run, set rule and target, test coverage (marginal, per class), mean size, classes below target."""
    rows = ["| run | rule | target | coverage | mean over classes | classes below target | mean set size |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        for rule, entries in _set_rules(run).items():
            for target in sorted(entries, key=float):
                e = entries[target]
                full = " (full label set)" if e["calibration"]["full_label_set"] else ""
                rows.append(f"| {name} | {_rule_label(rule, entries, run=run)} | {target}{full} | {100 * e['coverage']:.2f} | "
                            f"{100 * e['macro_coverage']:.2f} | {e['classes_below_target']} of {e['num_classes']} | "
                            f"{e['avg_set_size']:.2f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def plot_sweep(df: Any, params: Sequence[str], metric: str, path: str | Path | None = None) -> Figure:
    """One panel per searched parameter: `metric` of each trial against that parameter (a pandas frame)."""
    if not params:
        raise ValueError("plot_sweep needs at least one parameter column")
    missing = [c for c in (*params, metric) if c not in df.columns]
    if missing:
        raise ValueError(f"plot_sweep: columns {missing} are not in the frame (columns: {list(df.columns)})")
    fig = Figure(figsize=(4 * len(params), 3.6), layout="constrained")
    for i, param in enumerate(params):
        ax = fig.add_subplot(1, len(params), i + 1)
        values = df[param]
        numeric = np.issubdtype(np.asarray(values).dtype, np.number)
        x = values if numeric else values.astype(str)
        ax.scatter(x, df[metric], s=20)
        positive = numeric and len(values) and (np.asarray(values, dtype=float) > 0).all()
        if positive and np.nanmax(values) / max(np.nanmin(values), 1e-300) > 50:
            ax.set_xscale("log")
        ax.set_title(f"{metric} vs {param}")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Sweep: {metric} per trial")
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: str | Path) -> str:
    """Write the figure as PNG to a local path or storage URI; returns the URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    uri = storage.absolute(str(path))
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def comparison_figures(runs: Mapping[str, RunResults]) -> dict[str, Figure]:
    """File name -> figure: accuracy vs K, then per-class accuracy and set sizes at every K of the first run."""
    figures = {"accuracy_vs_k.png": plot_accuracy_vs_k(runs)}
    first = next(iter(runs.values()))
    for k in _ks(first.metrics):
        if any(run.per_class is not None for run in runs.values()):
            figures[f"per_class_avg_k{k}.png"] = plot_per_class_accuracy(runs, k=k)
        figures[f"set_size_k{k}.png"] = plot_set_size_histogram(runs, k=k)
    if any(_set_rules(run) for run in runs.values()):
        figures["coverage_vs_target.png"] = plot_coverage_vs_target(runs)
        figures["size_vs_coverage.png"] = plot_size_vs_coverage(runs)
    return figures


def write_run_plots(run_dir: str, *, name: str | None = None) -> list[str]:
    """Every figure of one run into <run_dir>/plots/; returns the written URIs."""
    run_dir = storage.absolute(run_dir)
    runs = {name or run_dir.rstrip("/").rsplit("/", 1)[-1]: load_run(run_dir)}
    return [save_figure(fig, storage.join(run_dir, PLOTS_DIR, file)) for file, fig in comparison_figures(runs).items()]


def run_names(run_dirs: Sequence[str]) -> list[str]:
    """Display names: the folder names, made unique with their parents where two collide."""
    parts = [storage.absolute(d).rstrip("/").split("/") for d in run_dirs]
    names = [p[-1] for p in parts]
    if len(set(names)) < len(names):
        names = ["/".join(p[-2:]) for p in parts]
    return names


def run_report(run_dirs: Sequence[str], *, out: str) -> str:
    """report.md (the markdown table) and the overlaid figures of several runs into `out`; returns the table."""
    if not run_dirs:
        raise ValueError("avgk report needs at least one RUN_DIR")
    runs = {name: load_run(d) for name, d in zip(run_names(run_dirs), run_dirs, strict=True)}
    from avgk.experiments.summary import format_markdown

    table = format_markdown({name: run.metrics for name, run in runs.items()})
    text = (
        "# avgk comparison\n\n"
        # strict=False: a folder named twice is one run (one key of `runs`), listed once
        + "\n".join(f"- `{name}`: {storage.absolute(d)}" for name, d in zip(runs, run_dirs, strict=False))
        + "\n\n" + table + "\n\naccuracies in % on test; 'oracle' thresholds the true posterior (synthetic data only)\n"
    )
    coverage = coverage_table(runs)
    if coverage:
        text += "\n## Set rules with a coverage target (eval.set_rules)\n\n" + coverage + "\n\ncoverages in % on test\n"
    out = storage.absolute(out)
    storage.write_bytes(storage.join(out, "report.md"), text.encode())
    for file, fig in comparison_figures(runs).items():
        save_figure(fig, storage.join(out, file))
    return table


def log_run_plots(uri: str | None, run_id: str | None, run_dir: str) -> list[str]:
    """Write the run's figures to <run_dir>/plots/ and, with an MLflow run, log them under plots/."""
    import tempfile
    from pathlib import Path

    from avgk.records import tracking

    written = write_run_plots(run_dir)
    if uri and run_id:
        with tempfile.TemporaryDirectory() as tmp:
            for file in written:
                local = Path(tmp) / file.rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(file))
            tracking.log_artifacts(uri, run_id, tmp, PLOTS_DIR)
    return written
