"""Plain-text comparison tables of metrics.json documents."""

from __future__ import annotations

from typing import Any, Mapping


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
