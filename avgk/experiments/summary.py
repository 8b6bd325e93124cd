"""Comparison tables of metrics.json documents (plain text and markdown) and the demo's one-sentence verdict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}"


def format_summary(documents: Mapping[str, Mapping[str, Any]]) -> str:
    """A table per K: avg-K / macro avg-K / top-K accuracy (%), realised set size, per method."""
    lines = []
    names = list(documents)
    ks = next(iter(documents.values()))["ks"] if documents else []
    header = f"{'K':>4} {'method':<14} {'avg-K':>7} {'macro':>7} {'top-K':>7} {'set size':>9} {'empty':>6} {'oracle':>7}"
    lines.append(header)
    lines.append("-" * len(header))
    for k in ks:
        key = str(int(k)) if float(k).is_integer() else str(k)
        for name in names:
            test = documents[name]["test"]
            lines.append(
                f"{key:>4} {name:<14} {_pct(test['avg_k_accuracy'].get(key))} "
                f"{_pct(test['macro_avg_k_accuracy'].get(key))} {_pct(test['top_k_accuracy'].get(key))} "
                f"{test['avg_set_size'].get(key, float('nan')):9.3f} "
                f"{_pct(test.get('empty_set_fraction', {}).get(key))} "
                f"{_pct((test.get('oracle_avg_k_accuracy') or {}).get(key))}"
            )
    lines.append("accuracies in %; 'oracle' thresholds the true posterior (the Bayes ceiling, synthetic data only)")
    return "\n".join(lines)


def verdict(documents: Mapping[str, Mapping[str, Any]], *, method: str, reference: str, k: float,
            where: str = "docs/RESULTS.md") -> str:
    """One plain sentence: which of two runs wins at K on test avg-K accuracy, by how much, and the
    macro (per-class) figure beside it; where the full study is."""
    key = str(int(k)) if float(k).is_integer() else str(k)
    tests = {name: documents[name]["test"] for name in (method, reference)}
    acc = {name: 100 * t["avg_k_accuracy"][key] for name, t in tests.items()}
    macro = {name: 100 * t["macro_avg_k_accuracy"][key] for name, t in tests.items()}
    gap, macro_gap = acc[method] - acc[reference], macro[method] - macro[reference]
    if abs(gap) < 0.5:
        lead = f"{method} and {reference} tie at avg-{key} ({acc[method]:.1f}% and {acc[reference]:.1f}%)"
    else:
        winner, loser = (method, reference) if gap > 0 else (reference, method)
        lead = (f"{winner} wins at avg-{key}: {acc[winner]:.1f}% against {acc[loser]:.1f}% for {loser} "
                f"({abs(gap):.1f} points)")
    return (f"On this data and run, {lead}; macro avg-{key}: {macro[method]:.1f}% for {method}, "
            f"{macro[reference]:.1f}% for {reference} ({macro_gap:+.1f} points for {method}). That is one seed of "
            "one short run: measurements over "
            f"seeds, data sets and recipes are in {where}.")


def _md_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_markdown(documents: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: a row per K and run (avg-K, macro avg-K, top-K in %, set size, oracle)."""
    ks = sorted({key for doc in documents.values() for key in doc["test"]["avg_k_accuracy"]}, key=float)
    lines = [
        "| K | run | avg-K acc (%) | macro avg-K acc (%) | top-K acc (%) | avg set size | oracle avg-K (%) |",
        "|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for key in ks:
        for name, doc in documents.items():
            test = doc["test"]
            size = test["avg_set_size"].get(key)
            lines.append(
                f"| {key} | {name} | {_md_pct(test['avg_k_accuracy'].get(key))} "
                f"| {_md_pct(test['macro_avg_k_accuracy'].get(key))} | {_md_pct(test['top_k_accuracy'].get(key))} "
                f"| {'-' if size is None else f'{size:.3f}'} "
                f"| {_md_pct((test.get('oracle_avg_k_accuracy') or {}).get(key))} |"
            )
    return "\n".join(lines)
