"""`avgk study`: a reproduction study (methods x ambiguity rates x seeds) as Ray tasks, tracked in MLflow.

Each cell is one single-worker training run: a Ray task running avgk.training.engine.fit (the loop Ray
Train runs on every worker) with its own run directory, checkpoints and MLflow child run under
the study's parent run. A study cell is small, and TorchTrainer's per-run start-up (controller,
worker group, placement group) would cost more than the training itself on a laptop, so cells
are plain tasks, `max_concurrent` at a time.

    <run.storage>/<study>/
        study.yaml                the resolved study (a different study refuses this folder)
        data/ambiguity-<a>/       one synthetic data set per ambiguity rate
        runs/<method>-a<a>-s<seed>/   each cell's run directory (metrics.json, per_class.parquet, train.log)
        results.csv, per_class.parquet, summary.md, plots/*.png

Rerunning the same command resumes: finished cells are read back, unfinished ones continue
from their last checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from avgk.config import Config, ConfigError
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
from avgk.experiments.study_config import Cell, StudyConfig, study_root
from avgk.records import tracking
from avgk.runtime import storage

CELL_FILE = "study_cell.json"  # written last by a finished cell: its wall time and history


@dataclass
class StudyResult:
    root: str
    rows: pd.DataFrame
    failed: list[str]
    parent_run_id: str | None


def _train_cell(config_tree: dict[str, Any], uri: str | None, parent_run_id: str | None,
                tags: dict[str, str], threads: int) -> dict[str, Any]:
    """One cell, inside a Ray task: engine.fit with a local reporter, progress into <run_dir>/train.log."""
    import torch

    from avgk.training import checkpoints, engine

    torch.set_num_threads(threads)
    config = Config.model_validate(config_tree)
    run_dir = config.run_dir
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_run(config, parent_run_id=parent_run_id, tags=tags) if uri else None
    start = time.perf_counter()
    with open(Path(run_dir) / "train.log", "a") as log_file:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        def on_epoch_end(metrics: dict[str, float], epoch: int) -> None:
            if uri and run_id:
                tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)

        with tracking.lifecycle(uri, run_id):
            result = engine.fit(config, reporter=checkpoints.LocalReporter(run_dir), on_epoch_end=on_epoch_end, log=log)
            seconds = time.perf_counter() - start
            if uri and run_id:
                assert result.evaluation is not None  # a fit in one process evaluates
                tracking.log_evaluation(uri, run_id, metrics=result.evaluation.metrics, run_dir=run_dir)
                tracking.log_metrics(uri, run_id, {"cell_seconds": seconds}, step=0)
    record = {"seconds": seconds, "history": result.history}
    storage.write_bytes(str(Path(run_dir) / CELL_FILE), json.dumps(record).encode())
    return record


def finished_record(cell: Cell) -> dict[str, Any] | None:
    path = Path(cell.config.run_dir) / CELL_FILE
    if path.is_file() and (Path(cell.config.run_dir) / "metrics.json").is_file():
        record: dict[str, Any] = json.loads(path.read_text())
        return record
    return None


# What decides the cells; the reference, the figures and the concurrency may change on resume.
GRID_KEYS = {"name", "base", "overrides", "methods", "ambiguity_rates", "seeds"}


def _claim_folder(root: Path, study: StudyConfig, base: Config) -> None:
    """A study folder belongs to one study: a changed grid or base would mix incomparable runs."""
    resolved = json.loads(json.dumps({"study": study.model_dump(mode="json"), "base": base.to_dict()}))
    marker = root / "study.yaml"
    if marker.is_file():
        saved = yaml.safe_load(marker.read_text()) or {}
        def grid(tree: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in (tree.get("study") or {}).items() if k in GRID_KEYS}

        if grid(saved) != grid(resolved) or saved.get("base") != resolved["base"]:
            raise ConfigError(
                f"{root} holds a study with a different configuration: give this one another name "
                f"(name=...) or remove the folder"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(yaml.safe_dump(resolved, sort_keys=False))


def run_study(
    study: StudyConfig, base: Config, cells: list[Cell], *, log: Callable[[str], None] = print
) -> StudyResult:
    import ray

    from avgk.data.prepare import prepare
    from avgk.records.runs import with_absolute_paths
    from pipelines import job

    cells = [Cell(c.method, c.ambiguity, c.seed, with_absolute_paths(c.config)) for c in cells]
    root = Path(study_root(study, with_absolute_paths(base)))
    _claim_folder(root, study, base)

    # One data set per ambiguity rate, shared by every method and seed (idempotent: reused on resume).
    for ambiguity in study.ambiguity_rates:
        first = next(c for c in cells if c.ambiguity == ambiguity)
        prepare(first.config, progress=False)
        log(f"data set ambiguity={format_k(ambiguity)}: {first.config.data.shards}")

    parent_config = base.model_copy(update={"run": base.run.model_copy(
        update={"name": study.name, "storage": str(root.parent)})})
    records: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    todo = []
    for cell in cells:
        record = finished_record(cell)
        if record is None:
            todo.append(cell)
        else:
            records[cell.name] = record
    log(f"study {study.name}: {len(cells)} cells ({len(records)} already finished), "
        f"{study.max_concurrent} at a time -> {root}")
    with job.tracked(parent_config, tags={"avgk.kind": "study", "avgk.study": study.name}) as run:
        uri, parent_run_id, outcome = run.uri, run.run_id, run.outcome
        if uri and parent_run_id:
            tracking.log_params(uri, parent_run_id, study.flat())
        if todo:
            job.join_cluster(cpus=study.max_concurrent * study.cpus_per_cell)
            task = ray.remote(num_cpus=study.cpus_per_cell, max_retries=0)(_train_cell)
            threads = max(1, math.ceil(study.cpus_per_cell))
            pending: dict[Any, Cell] = {}
            queue = list(todo)
            start, done = time.perf_counter(), 0
            while queue or pending:
                while queue and len(pending) < study.max_concurrent:
                    cell = queue.pop(0)
                    tags = {"avgk.study": study.name, "avgk.method": cell.method,
                            "avgk.ambiguity": format_k(cell.ambiguity), "avgk.seed": str(cell.seed)}
                    # positional: Ray's typed .remote() of a function takes its arguments in order
                    ref = task.remote(cell.config.to_dict(), uri, parent_run_id, tags, threads)
                    pending[ref] = cell
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready[0])
                done += 1
                elapsed = time.perf_counter() - start
                try:
                    records[cell.name] = ray.get(ready[0])
                except Exception as err:  # a failed cell is reported, the others go on
                    failed.append(cell.name)
                    log(f"[{done}/{len(todo)}] {cell.name} FAILED: {str(err).splitlines()[-1][:300]} "
                        f"(see {cell.config.run_dir}/train.log)")
                    continue
                metrics = json.loads((Path(cell.config.run_dir) / "metrics.json").read_text())
                k = format_k(headline_k(study, base))
                log(f"[{done}/{len(todo)}] {cell.name}: test avg-{k} "
                    f"{100 * metrics['test']['avg_k_accuracy'][k]:.1f}% "
                    f"({records[cell.name]['seconds']:.0f} s; {elapsed / done * (len(todo) - done) / 60:.0f} min left)")
        rows, per_class = collect(cells, records)
        write_summary(study, base, root, rows, per_class, failed=failed)
        if uri and parent_run_id:
            for name in ("summary.md", "results.csv", "study.yaml"):
                tracking.log_artifact(uri, parent_run_id, root / name)
            if (root / "plots").is_dir():
                tracking.log_artifacts(uri, parent_run_id, root / "plots", "plots")
        if failed:
            outcome.status = "FAILED"
    return StudyResult(root=str(root), rows=rows, failed=failed, parent_run_id=parent_run_id)


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


def cmd_summary(result: StudyResult) -> str:
    return (f"study folder: {result.root}\nsummary: {result.root}/summary.md"
            + (f"\nfailed cells: {', '.join(result.failed)}" if result.failed else ""))


def main_log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
