"""Aggregation of a reproduction study: per-cell rows, mean +- std over seeds, paired gains, figures.

Pure functions over the documents each cell wrote (metrics.json, per_class.parquet); no Ray.
Gains are paired by seed (method minus reference trained with the same seed on the same data),
so the std of a gain is the spread of paired differences, not of two independent means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from avgk.evaluation.metrics import format_k

# metrics.json test-section keys reported per K
PER_K = ("avg_k_accuracy", "macro_avg_k_accuracy", "avg_set_size", "oracle_avg_k_accuracy", "gap_to_oracle")
FREQUENCY_GROUPS = ("few", "medium", "many")


def cell_row(*, method: str, ambiguity: float, seed: int, metrics: Mapping[str, Any],
             history: Sequence[Mapping[str, float]] = (), seconds: float | None = None) -> dict[str, Any]:
    """One flat row per cell: test metrics per K (`avg_k_accuracy@2`), frequency groups, training summary."""
    test = metrics["test"]
    row: dict[str, Any] = {"method": method, "ambiguity": float(ambiguity), "seed": int(seed),
                           "score_head": metrics.get("score_head")}
    for name in PER_K:
        for k, value in (test.get(name) or {}).items():
            row[f"{name}@{k}"] = value
    for group in FREQUENCY_GROUPS:
        for k, value in ((test.get("by_frequency") or {}).get(group, {}).get("avg_k_accuracy") or {}).items():
            row[f"{group}_avg_k_accuracy@{k}"] = value
    if history:
        val = [h["val_avg_k_accuracy"] for h in history]
        row["epochs"] = len(history)
        row["best_epoch"] = int(np.argmax(val)) + 1
        row["val_avg_k_accuracy_last"] = val[-1]
        row["val_avg_k_accuracy_best"] = max(val)
    if seconds is not None:
        row["seconds"] = seconds
    return row


def summarize(rows: pd.DataFrame, *, columns: Sequence[str]) -> pd.DataFrame:
    """Mean and std (ddof=1; 0 for one seed) over seeds of each column, per (ambiguity, method)."""
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the study rows (have {sorted(rows.columns)})")
    grouped = rows.groupby(["ambiguity", "method"], sort=True)[list(columns)]
    mean = grouped.mean().add_suffix(":mean")
    std = grouped.std(ddof=1).fillna(0.0).add_suffix(":std")
    count = grouped.size().rename("seeds")
    summary: pd.DataFrame = pd.concat([mean, std, count], axis=1).reset_index()
    return summary


def paired_gains(rows: pd.DataFrame, *, reference: str, column: str) -> pd.DataFrame:
    """column(method) - column(reference) per (ambiguity, seed), then mean/std over seeds.

    Only seeds where both runs exist are paired; `pairs` says how many.
    """
    if reference not in set(rows["method"]):
        raise KeyError(f"reference method {reference!r} has no rows (methods: {sorted(set(rows['method']))})")
    ref = rows[rows["method"] == reference][["ambiguity", "seed", column]].rename(columns={column: "reference"})
    joined = rows[["method", "ambiguity", "seed", column]].merge(ref, on=["ambiguity", "seed"], how="inner")
    joined["gain"] = joined[column] - joined["reference"]
    grouped = joined.groupby(["ambiguity", "method"], sort=True)["gain"]
    out: pd.DataFrame = pd.DataFrame({"gain:mean": grouped.mean(), "gain:std": grouped.std(ddof=1).fillna(0.0),
                                      "pairs": grouped.size()}).reset_index()
    return out


def frequency_gains(per_class: pd.DataFrame, *, reference: str, method: str, k: float,
                    num_bins: int = 5) -> pd.DataFrame:
    """Per-class gain of `method` over `reference` in avg-K accuracy at k, binned by training count.

    `per_class` has one row per (method, ambiguity, seed, class_id) with `train_count`,
    `num_samples` and `avg_k_accuracy@<k>`. A class's gain is paired by seed, then averaged over
    seeds; bins are quantiles of the training count (classes with no test sample are left out).
    Returns one row per (ambiguity, bin): count range, classes, mean gain and its standard error.
    """
    column = f"avg_k_accuracy@{format_k(k)}"
    keys = ["ambiguity", "seed", "class_id"]
    frame = per_class[per_class["num_samples"] > 0]
    a = frame[frame["method"] == method][[*keys, "train_count", column]]
    b = frame[frame["method"] == reference][[*keys, column]].rename(columns={column: "reference"})
    joined = a.merge(b, on=keys, how="inner")
    if joined.empty:
        raise ValueError(f"no per-class rows pair {method!r} with {reference!r}")
    joined["gain"] = joined[column] - joined["reference"]
    per_cls = joined.groupby(["ambiguity", "class_id"], sort=True).agg(
        gain=("gain", "mean"), train_count=("train_count", "first")).reset_index()
    rows = []
    for ambiguity, group in per_cls.groupby("ambiguity", sort=True):
        edges = np.unique(np.quantile(group["train_count"], np.linspace(0, 1, num_bins + 1)))
        bins = np.clip(np.searchsorted(edges, group["train_count"], side="right") - 1, 0, max(len(edges) - 2, 0))
        for b_index in sorted(set(bins.tolist())):
            members = group[bins == b_index]
            gains = members["gain"].to_numpy()
            sem = float(gains.std(ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else 0.0
            rows.append({"ambiguity": ambiguity, "bin": b_index,
                         "train_count_min": int(members["train_count"].min()),
                         "train_count_max": int(members["train_count"].max()),
                         "classes": len(members), "gain:mean": float(gains.mean()), "gain:sem": sem})
    gains_by_bin: pd.DataFrame = pd.DataFrame(rows)
    return gains_by_bin


# ---------------------------------------------------------------- tables


def pct(mean: float, std: float | None = None, *, signed: bool = False) -> str:
    """0.4567, 0.012 -> '45.7 ± 1.2' (percentage points)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


def method_by_rate_table(frame: pd.DataFrame, *, column: str, methods: Sequence[str], signed: bool = False) -> str:
    """Markdown: one row per method, one column per ambiguity rate, cells '<column>:mean ± <column>:std' (%)."""
    rates = sorted(set(frame["ambiguity"]))
    lines = ["| method | " + " | ".join(f"a={format_k(a)}" for a in rates) + " |",
             "|---|" + "---:|" * len(rates)]
    for method in methods:
        cells = []
        for a in rates:
            hit = frame[(frame["ambiguity"] == a) & (frame["method"] == method)]
            cells.append(pct(hit[f"{column}:mean"].iloc[0], hit[f"{column}:std"].iloc[0], signed=signed)
                         if len(hit) else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_table(summary: pd.DataFrame, *, column: str, methods: Sequence[str]) -> str:
    """A summarize() column per method and ambiguity rate, 'mean ± std' in %."""
    return method_by_rate_table(summary, column=column, methods=methods)


def gain_table(gains: pd.DataFrame, *, methods: Sequence[str]) -> str:
    """paired_gains() per method and ambiguity rate, signed points ± std."""
    return method_by_rate_table(gains, column="gain", methods=methods, signed=True)


def frequency_table(freq: pd.DataFrame) -> str:
    lines = ["| ambiguity | train images per class | classes | gain (points) ± s.e. |", "|---:|---|---:|---:|"]
    for row in freq.to_dict("records"):
        lines.append(f"| {format_k(row['ambiguity'])} | {row['train_count_min']}-{row['train_count_max']} | "
                     f"{row['classes']} | {pct(row['gain:mean'], row['gain:sem'], signed=True)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def plot_gain_vs_ambiguity(gains: pd.DataFrame, *, reference: str, title: str) -> Figure:
    """Paired gain over the reference (points) against the ambiguity rate, one line per method, ±1 std."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for method, group in gains[gains["method"] != reference].groupby("method", sort=True):
        group = group.sort_values("ambiguity")
        ax.errorbar(group["ambiguity"], 100 * group["gain:mean"], yerr=100 * group["gain:std"],
                    marker="o", capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("ambiguity rate of the data")
    ax.set_ylabel(f"gain over {reference} (points)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gain_vs_frequency(freq: pd.DataFrame, *, title: str) -> Figure:
    """Per-class gain (points, ± s.e.) against the class's training images, one line per ambiguity rate."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for ambiguity, group in freq.groupby("ambiguity", sort=True):
        centre = np.sqrt(group["train_count_min"].clip(lower=1) * group["train_count_max"].clip(lower=1))
        ax.errorbar(centre, 100 * group["gain:mean"], yerr=100 * group["gain:sem"], marker="o", capsize=3,
                    label=f"ambiguity {format_k(cast(float, ambiguity))}")  # the ambiguity column holds floats
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training images of the class (bin geometric centre)")
    ax.set_ylabel("per-class gain (points)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gain_by_method(gains: pd.DataFrame, *, reference: str, title: str) -> Figure:
    """Paired gain over the reference (points, ±1 std) per method, as bars: a study at one ambiguity rate."""
    rows = gains[gains["method"] != reference]
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.5))
    ax = fig.add_subplot()
    positions = np.arange(len(rows))
    colours = ["tab:green" if g >= 0 else "tab:red" for g in rows["gain:mean"]]
    ax.barh(positions, 100 * rows["gain:mean"], xerr=100 * rows["gain:std"], color=colours, capsize=3)
    labels = [f"{m} (a={format_k(a)})" for m, a in zip(rows["method"], rows["ambiguity"], strict=True)]
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"gain over {reference} (points)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
