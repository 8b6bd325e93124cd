"""`avgk study`: a reproduction study (methods x ambiguity rates x seeds) as Ray tasks, tracked in MLflow.

The study is a pipeline (avgk.experiments.study_config.study_plan) run by pipelines.pipeline: each
cell is one single-worker training, a Ray task running avgk.training.engine.fit with its own run
directory, checkpoints and MLflow child run under the study's parent run, `max_concurrent` at a time.

    <run.storage>/<study>/
        pipeline.yaml, graph.png  the resolved study as a pipeline, and its graph
        data/ambiguity-<a>/       one synthetic data set per ambiguity rate
        train/<method>-a<a>-s<seed>-<fingerprint>/   each cell's run directory (metrics.json, per_class.parquet)
        results.csv, per_class.parquet, summary.md, plots/*.png

Rerunning the same command resumes: finished cells are reused, unfinished ones continue from their
last checkpoint; a changed grid runs only its new or changed cells (and the summary).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from avgk.config import Config
from avgk.experiments.study_config import Cell, StudyConfig, study_plan
from avgk.experiments.study_summary import collect, headline_k, write_summary

__all__ = ["StudyResult", "cmd_summary", "collect", "headline_k", "main_log", "run_study", "write_summary"]


@dataclass
class StudyResult:
    root: str
    rows: pd.DataFrame
    failed: list[str]
    parent_run_id: str | None


def run_study(study: StudyConfig, base: Config, cells: list[Cell] | None = None, *, dry_run: bool = False,
              log: Callable[[str], None] = print) -> StudyResult:
    """The study's pipeline (avgk.experiments.study_config.study_plan) on the runner every pipeline uses:
    finished cells reused, interrupted ones resumed, the summary written at the study's root.
    (`cells`: the validated cells load_study returned; the plan builds the same ones.)"""
    from pipelines.pipeline import run_plan

    plan = study_plan(study, base)
    result = run_plan(plan, dry_run=dry_run, kind="study", params=study.flat(), log=log)
    root = result.plan.root
    summarized = any(cid in result.outputs for cid in result.plan.cells if result.plan.cells[cid].verb == "summarize")
    # a summary of this run (or reused): not the files an earlier run left at the root
    rows = pd.read_csv(Path(root) / "results.csv") if summarized else pd.DataFrame()
    return StudyResult(root=root, rows=rows, failed=result.failed, parent_run_id=result.parent_run_id)


def cmd_summary(result: StudyResult) -> str:
    return (f"study folder: {result.root}\nsummary: {result.root}/summary.md"
            + (f"\nfailed cells: {', '.join(result.failed)}" if result.failed else ""))


def main_log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
