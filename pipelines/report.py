"""Comparison tables of metrics.json documents (plain text and markdown), and `avgk report`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


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
    return (f"On this data and run, {lead}; macro avg-{key} {macro[method]:.1f}% against {macro[reference]:.1f}% "
            f"({macro_gap:+.1f} points for {method}). That is one seed of one short run: measurements over "
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


def run_names(run_dirs: Sequence[str]) -> list[str]:
    """Display names: the folder names, made unique with their parents where two collide."""
    from avgk import storage

    parts = [storage.absolute(d).rstrip("/").split("/") for d in run_dirs]
    names = [p[-1] for p in parts]
    if len(set(names)) < len(names):
        names = ["/".join(p[-2:]) for p in parts]
    return names


def run_report(run_dirs: Sequence[str], *, out: str) -> str:
    """report.md (the markdown table) and the overlaid figures of several runs into `out`; returns the table."""
    from avgk import report, storage

    if not run_dirs:
        raise ValueError("avgk report needs at least one RUN_DIR")
    runs = {name: report.load_run(d) for name, d in zip(run_names(run_dirs), run_dirs)}
    table = format_markdown({name: run.metrics for name, run in runs.items()})
    text = (
        "# avgk comparison\n\n"
        + "\n".join(f"- `{name}`: {storage.absolute(d)}" for name, d in zip(runs, run_dirs))
        + "\n\n" + table + "\n\naccuracies in % on test; 'oracle' thresholds the true posterior (synthetic data only)\n"
    )
    out = storage.absolute(out)
    storage.write_bytes(storage.join(out, "report.md"), text.encode())
    for file, fig in report.comparison_figures(runs).items():
        report.save_figure(fig, storage.join(out, file))
    return table


def log_run_plots(uri: str | None, run_id: str | None, run_dir: str) -> list[str]:
    """Write the run's figures to <run_dir>/plots/ and, with an MLflow run, log them under plots/."""
    import tempfile
    from pathlib import Path

    from avgk import report, storage, tracking

    written = report.write_run_plots(run_dir)
    if uri and run_id:
        with tempfile.TemporaryDirectory() as tmp:
            for file in written:
                local = Path(tmp) / file.rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(file))
            tracking.log_artifacts(uri, run_id, tmp, report.PLOTS_DIR)
    return written
