"""A reproduction study's summary: one row per finished cell, tables per K, paired gains and figures.

Pure functions over the cells' run directories (metrics.json, per_class.parquet); no Ray. The study's
summarize stage (pipelines.pipeline_cells) writes them into its folder and the study's root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from avgk.config import Config
from avgk.evaluation.metrics import format_k
from avgk.experiments.report import save_figure
from avgk.experiments.study import (
    cell_row,
    frequency_gains,
    frequency_table,
    gain_table,
    metric_table,
    paired_gains,
    plot_gain_by_method,
    plot_gain_vs_ambiguity,
    plot_gain_vs_frequency,
    summarize,
)
from avgk.experiments.study_config import Cell, StudyConfig


def headline_k(study: StudyConfig, base: Config) -> float:
    return study.headline_k if study.headline_k is not None else base.loss.k


def collect(cells: list[Cell], records: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of the finished cells, and their per-class tables stacked with the cell's keys."""
    rows, tables = [], []
    for cell in cells:
        if cell.name not in records:
            continue
        run_dir = Path(cell.config.run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        record = records[cell.name]
        rows.append(cell_row(method=cell.method, ambiguity=cell.ambiguity, seed=cell.seed, metrics=metrics,
                             history=record.get("history", []), seconds=record.get("seconds")))
        table = pd.read_parquet(run_dir / "per_class.parquet")
        table.insert(0, "seed", cell.seed)
        table.insert(0, "ambiguity", cell.ambiguity)
        table.insert(0, "method", cell.method)
        tables.append(table)
    return pd.DataFrame(rows), (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame())


def write_summary(study: StudyConfig, base: Config, root: Path, rows: pd.DataFrame, per_class: pd.DataFrame,
                  *, failed: list[str]) -> str:
    """results.csv, per_class.parquet, summary.md and plots/ in the study folder; returns summary.md's text."""
    if rows.empty:
        raise RuntimeError(f"no cell of study {study.name!r} finished: nothing to summarise (failed: {failed})")
    rows.to_csv(root / "results.csv", index=False)
    per_class.to_parquet(root / "per_class.parquet", index=False)
    methods = [m for m in study.methods if m in set(rows["method"])]
    k = format_k(headline_k(study, base))
    ks = [format_k(x) for x in base.eval.ks]
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    seeds = rows.groupby(["ambiguity", "method"]).size()
    parts = [
        f"# Study {study.name}",
        "",
        f"{len(rows)} finished cells ({len(study.methods)} methods x {len(study.ambiguity_rates)} ambiguity rates x "
        f"{len(study.seeds)} seeds; {int(seeds.min())}-{int(seeds.max())} seeds per cell group)"
        + (f"; **failed: {', '.join(failed)}**" if failed else "") + ".",
        f"Test set, thresholds calibrated on val; values in % as mean ± std over seeds; gains are paired by seed "
        f"against `{study.reference}`. Training time per cell: {rows['seconds'].median():.0f} s median."
        if "seconds" in rows else "",
    ]
    for key in ks:
        columns = [f"{name}@{key}" for name in ("avg_k_accuracy", "macro_avg_k_accuracy", "gap_to_oracle",
                                                  "avg_set_size", "oracle_avg_k_accuracy") if f"{name}@{key}" in rows]
        summary = summarize(rows, columns=columns)
        parts += ["", f"## K = {key}", "", f"### avg-{key} accuracy", "",
                  metric_table(summary, column=f"avg_k_accuracy@{key}", methods=methods),
                  "", f"### macro avg-{key} accuracy", "",
                  metric_table(summary, column=f"macro_avg_k_accuracy@{key}", methods=methods)]
        if f"gap_to_oracle@{key}" in rows:
            parts += ["", f"### gap to the Bayes oracle (oracle minus method, avg-{key})", "",
                      metric_table(summary, column=f"gap_to_oracle@{key}", methods=methods)]
        for name in ("avg_k_accuracy", "macro_avg_k_accuracy"):
            gains = paired_gains(rows, reference=study.reference, column=f"{name}@{key}")
            parts += ["", f"### gain over {study.reference}, {name.replace('_', ' ')} at K={key} (points)", "",
                      gain_table(gains, methods=[m for m in methods if m != study.reference])]
            if key == k:
                title = f"{name.replace('_', ' ')} at K={key}: gain over {study.reference}"
                if len(set(rows["ambiguity"])) == 1:  # one rate: a bar per method says more than points on a line
                    save_figure(plot_gain_by_method(gains, reference=study.reference, title=title),
                                plots / f"gain_by_method_{name}_k{key}.png")
                    continue
                save_figure(plot_gain_vs_ambiguity(gains, reference=study.reference, title=title),
                            plots / f"gain_vs_ambiguity_{name}_k{key}.png")
                focus = [m for m in study.focus if m in methods]
                if focus:  # the methods of interest alone, on their own scale
                    save_figure(plot_gain_vs_ambiguity(gains[gains["method"].isin(focus)], reference=study.reference,
                                                       title=title),
                                plots / f"gain_vs_ambiguity_{name}_k{key}_focus.png")
    focus = [m for m in methods if m != study.reference]
    if not per_class.empty and focus:
        parts += ["", f"## Gain against class frequency (avg-{k}, per class, averaged over seeds)"]
        for method in focus:
            freq = frequency_gains(per_class, reference=study.reference, method=method, k=headline_k(study, base))
            freq.to_csv(plots / f"gain_vs_frequency_{method}_k{k}.csv", index=False)
            save_figure(plot_gain_vs_frequency(freq, title=f"{method} minus {study.reference}: per-class avg-{k} accuracy"),
                        plots / f"gain_vs_frequency_{method}_k{k}.png")
            parts += ["", f"### {method}", "", frequency_table(freq)]
    if "best_epoch" in rows:
        epochs = rows.groupby("method")[["best_epoch", "epochs"]].mean().to_dict("index")  # {method: {column: mean}}
        parts += ["", "## Model selection (val avg-K): mean best epoch / epochs trained", "",
                  "| method | best epoch | epochs |", "|---|---:|---:|"]
        parts += [f"| {m} | {epochs[m]['best_epoch']:.1f} | {epochs[m]['epochs']:.0f} |" for m in methods]
    text = "\n".join(parts) + "\n"
    (root / "summary.md").write_text(text)
    return text
