"""`avgk pipeline SPEC`: a graph of avgk verbs run on Ray, resumable stage by stage, one MLflow run tree.

The driver walks the graph (avgk.experiments.pipeline_spec) and nothing more: a cell whose
inputs are finished starts, up to `max_concurrent` at once; the work itself runs on the Ray
cluster every verb joins (RAY_ADDRESS's, else a local one). A single-worker CPU training cell is
one Ray task (engine.fit, the loop Ray Train runs on each worker: a TorchTrainer's controller and
worker group would cost more than a small cell's training); a cell with train.num_workers > 1, a
GPU or remote run storage runs as a TorchTrainer (pipelines.train). Scoring jobs, sweeps and
comparisons run as their verbs do.

    <run.storage>/<name>/                   the pipeline folder: its MLflow parent run, graph.png, pipeline.yaml
        <stage>/<cell>-<fingerprint>/       one cell: record.json (fingerprint, status, outputs) and its results

A finished cell with the same fingerprint is reused (avgk.experiments.pipeline_state says what
counts); an interrupted one runs again in its folder, a training resuming from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from avgk.config import ConfigError, find_config_file
from avgk.experiments import pipeline_state as ps
from avgk.experiments.pipeline_plan import Cell, Plan, load_pipeline
from avgk.experiments.pipeline_spec import PipelineSpecError
from avgk.experiments.pipeline_view import graph_figure, tree_lines
from avgk.experiments.sweep_config import config_for
from avgk.records import tracking
from avgk.records.runs import with_absolute_paths
from avgk.runtime import locks, storage
from avgk.runtime.console import say
from pipelines.pipeline_cells import Runner, load_stage_sweep


@dataclass
class PipelineResult:
    plan: Plan
    states: dict[str, ps.State]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell id -> its record's outputs
    seconds: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not run: an input failed, or outside --only/--from
    parent_run_id: str | None = None


def _with_plan_paths(plan: Plan) -> Plan:
    base = with_absolute_paths(plan.base)
    cells = {cid: Cell(c.stage, c.verb, c.labels, with_absolute_paths(c.config), c.options, c.inputs, c.values)
             for cid, c in plan.cells.items()}
    return Plan(spec=plan.spec, base=base, cells=cells, stage_order=plan.stage_order)


def select(plan: Plan, *, only: str | None, start: str | None) -> set[str]:
    """The stages to run: all; --only STAGE; --from STAGE and every stage that depends on it."""
    for flag, stage in (("--only", only), ("--from", start)):
        if stage is not None and stage not in plan.spec.stages:
            raise PipelineSpecError(f"{flag} {stage!r}: no such stage (stages: {', '.join(plan.stage_order)})")
    if only is not None:
        return {only}
    if start is None:
        return set(plan.stage_order)
    chosen = {start}
    for name in plan.stage_order:  # dependency order: a stage's needs come first
        if set(plan.spec.stages[name].needs) & chosen:
            chosen.add(name)
    return chosen


# ---------------------------------------------------------------- the walk


def run_pipeline(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    dry_run: bool = False,
    only: str | None = None,
    start: str | None = None,
    log: Callable[[str], None] = say,
) -> PipelineResult:
    plan = load_pipeline(path, overrides)
    spec_dir = find_config_file(path).parent  # a shipped spec's sweeps live beside it, installed or not
    return run_plan(plan, spec_dir=spec_dir, dry_run=dry_run, only=only, start=start, log=log)


def run_plan(
    plan: Plan,
    *,
    spec_dir: Path | None = None,
    dry_run: bool = False,
    only: str | None = None,
    start: str | None = None,
    kind: str = "pipeline",
    params: dict[str, Any] | None = None,
    log: Callable[[str], None] = say,
) -> PipelineResult:
    """Walks an expanded plan (a spec's, or a study's: pipelines.study); `kind` tags the MLflow parent run,
    `params` go to it beside the base config's (a study's own settings)."""
    plan = _with_plan_paths(plan)
    if dry_run:
        return _run_plan(plan, spec_dir=spec_dir, dry_run=True, only=only, start=start, kind=kind, params=params, log=log)
    # One command at a time writes a pipeline's folder on this machine (avgk.runtime.locks).
    lock = f"pipeline folder {plan.root}"
    holder = locks.claim(lock)
    if holder:
        raise ConfigError(f"pipeline error: {plan.root} is in use by another command ({holder}): "
                          "wait for it to end, or give this one another run.storage")
    try:
        return _run_plan(plan, spec_dir=spec_dir, dry_run=False, only=only, start=start, kind=kind, params=params,
                         log=log)
    finally:
        locks.release(lock)


def _run_plan(plan: Plan, *, spec_dir: Path | None, dry_run: bool, only: str | None, start: str | None, kind: str,
              params: dict[str, Any] | None, log: Callable[[str], None]) -> PipelineResult:
    for cell in plan.cells.values():  # sweeps are files of their own: checked before anything starts, and
        if cell.verb == "tune":      # their content is part of the tune cell's fingerprint (its options)
            cell.options["resolved_sweep"] = load_stage_sweep(cell, spec_dir).model_dump(mode="json")
    selected = select(plan, only=only, start=start)
    prints = ps.fingerprints(plan)
    states = ps.states(plan, prints)
    result = PipelineResult(plan=plan, states=states)
    for line in tree_lines(plan, states, prints, selected=selected):
        log(line)
    unreachable = next((s for s in states.values() if s.state == ps.UNREACHABLE), None)
    if unreachable is not None:
        log(f"records unreachable: {unreachable.why}")
    if dry_run:
        return result
    missing = [cid for cid, c in plan.cells.items() if c.stage in selected for i in c.inputs
               if plan.cells[i].stage not in selected and states[i].state != ps.DONE]
    if missing:
        raise PipelineSpecError(f"{missing[0]} needs {plan.cells[missing[0]].inputs} finished first: "
                                "run the pipeline without --only/--from (or --from an earlier stage)")
    if unreachable is not None:
        raise OSError(f"pipeline records under {plan.root} cannot be read: {unreachable.why}")
    return _walk(plan, prints, states, selected, spec_dir=spec_dir, kind=kind, params=params or {}, log=log,
                 result=result)


def _walk(plan: Plan, prints: dict[str, dict[str, Any]], states: dict[str, ps.State], selected: set[str], *,
          spec_dir: Path | None, kind: str, params: dict[str, Any], log: Callable[[str], None],
          result: PipelineResult) -> PipelineResult:
    from pipelines import job

    root = plan.root
    if not storage.is_remote(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    storage.write_bytes(storage.join(root, "pipeline.yaml"),
                        yaml.safe_dump({"spec": plan.spec.model_dump(mode="json", by_alias=True),
                                        "base": plan.base.to_dict()}, sort_keys=False).encode())
    parent_config = plan.base.model_copy(update={"run": plan.base.run.model_copy(update={"name": plan.spec.name})})
    with job.tracked(parent_config, tags={"avgk.kind": kind, f"avgk.{kind}": plan.spec.name}) as run:
        if run.uri and run.run_id and params:
            # MLflow params cannot change: a resumed parent run keeps those of its first run (the
            # resolved spec of each run is its pipeline.yaml artifact)
            known = tracking.run_params(run.uri, run.run_id)
            tracking.log_params(run.uri, run.run_id, {k: v for k, v in params.items() if k not in known})
        runner = Runner(plan, prints, uri=run.uri, parent_run_id=run.run_id, spec_dir=spec_dir, log=log)
        todo: list[str] = []
        for cid, state in states.items():
            if state.state == ps.DONE and state.record is not None:
                runner.outputs[cid] = state.record.get("outputs") or {}
                result.outputs[cid] = runner.outputs[cid]
                result.seconds[cid] = float(state.record.get("seconds") or 0.0)
            elif plan.cells[cid].stage in selected:
                todo.append(cid)
            else:
                result.skipped.append(cid)
        reused = [cid for cid in states if states[cid].state == ps.DONE and plan.cells[cid].stage in selected]
        if reused:
            log(f"reused {len(reused)} finished cell(s): {', '.join(reused)}")
        if todo:
            job.join_cluster(cpus=plan.spec.max_concurrent * max(_cpus_of(plan.cells[cid]) for cid in todo))
            _open_stage_runs(runner, todo, run.uri)
        _run_cells(runner, todo, result, log=log)
        if result.failed:
            run.outcome.status = "FAILED"
        for stage, stage_run in runner.stage_runs.items():
            failed = any(plan.cells[cid].stage == stage for cid in result.failed)
            if run.uri:
                tracking.end_run(run.uri, stage_run, status="FAILED" if failed else "FINISHED")
        final = {cid: (ps.State(ps.DONE, "ran") if cid in runner.outputs else states[cid]) for cid in plan.cells}
        lines = tree_lines(plan, final, prints, result.seconds, selected)
        with tempfile.TemporaryDirectory(prefix="avgk-graph-") as tmp:  # drawn here, then copied to the folder
            from avgk.experiments.report import save_figure

            (Path(tmp) / "graph.txt").write_text("\n".join(lines) + "\n")
            save_figure(graph_figure(plan, final, result.seconds, result.failed), Path(tmp) / "graph.png")
            (Path(tmp) / "pipeline.yaml").write_bytes(storage.read_bytes(storage.join(root, "pipeline.yaml")))
            for name in ("graph.txt", "graph.png"):
                storage.upload_file(Path(tmp) / name, storage.join(root, name))
            if run.uri and run.run_id:
                for name in ("graph.png", "graph.txt", "pipeline.yaml"):
                    tracking.log_artifact(run.uri, run.run_id, Path(tmp) / name)
        result.parent_run_id = run.run_id
        log("\n".join(lines[1:]))
        if result.failed:
            log(f"pipeline {plan.spec.name}: {len(result.failed)} cell(s) failed: {', '.join(result.failed)}"
                + (f"; not run: {', '.join(result.skipped)}" if result.skipped else ""))
    return result


def _run_cells(runner: Runner, todo: list[str], result: PipelineResult, *, log: Callable[[str], None]) -> None:
    """Starts each cell whose inputs finished, `max_concurrent` at a time, each in a daemon thread: Ctrl-C or
    SIGTERM reach this (main) thread, which ends the running cells' MLflow runs KILLED and unwinds at once
    (a pool's non-daemon threads would keep the process until their trainings ended)."""
    plan = runner.plan
    pending = list(todo)  # dependency order
    running: set[str] = set()
    finished: queue.Queue[tuple[str, dict[str, Any] | BaseException]] = queue.Queue()
    done, total, begun = 0, len(todo), time.perf_counter()
    failed: set[str] = set()

    def work(cid: str) -> None:
        try:
            finished.put((cid, runner.run_cell(plan.cells[cid])))
        except BaseException as err:  # reported by the main thread
            finished.put((cid, err))

    try:
        while pending or running:
            for cid in list(pending):
                if len(running) >= plan.spec.max_concurrent:
                    break
                inputs = plan.cells[cid].inputs
                lost = [i for i in inputs if i in failed or i in result.skipped]
                tolerant = plan.cells[cid].verb in Runner.TOLERANT
                if lost and (not tolerant or all(i in lost for i in inputs)):
                    pending.remove(cid)
                    result.skipped.append(cid)
                    done += 1
                    continue
                if all(i in runner.outputs or i in lost for i in inputs) and (not lost or tolerant):
                    runner.failed_inputs[cid] = lost
                    pending.remove(cid)
                    log(f"start {cid}")
                    running.add(cid)
                    threading.Thread(target=work, args=(cid,), name=f"avgk-{cid}", daemon=True).start()
            if not running:
                break
            try:
                cid, outcome = finished.get(timeout=0.5)  # short waits: Ctrl-C and SIGTERM reach this thread
            except queue.Empty:
                continue
            running.discard(cid)
            done += 1
            if isinstance(outcome, BaseException):
                failed.add(cid)
                result.failed.append(cid)
                text = str(outcome).strip()
                log(f"[{done}/{total}] {cid} FAILED: {text.splitlines()[-1][:300] if text else type(outcome).__name__}")
                continue
            seconds = outcome.pop("_seconds")
            runner.outputs[cid] = outcome
            result.outputs[cid] = outcome
            result.seconds[cid] = seconds
            left = (time.perf_counter() - begun) / done * (total - done)
            eta = f"; about {_duration(left)} left" if done < total else ""
            log(f"[{done}/{total}] {cid} finished in {seconds:.0f} s{eta}")
    except BaseException:
        for cid in running:  # a cell's own run, or its sweep's
            for folder in (runner.folder(plan.cells[cid]), storage.join(runner.folder(plan.cells[cid]), "sweep")):
                id_file = storage.join(folder, tracking.RUN_ID_FILE)
                if runner.uri and storage.exists(id_file):
                    tracking.end_run(runner.uri, storage.read_bytes(id_file).decode().strip(), status="KILLED")
        for stage_run in runner.stage_runs.values():
            if runner.uri:
                tracking.end_run(runner.uri, stage_run, status="KILLED")
        raise


def _cpus_of(cell: Cell) -> float:
    """The CPUs one cell holds at once: a training's workers (or a task), a sweep's trial; 1 for the rest."""
    if cell.verb in ("train", "tune"):
        return cell.config.train.num_workers * cell.config.train.cpus_per_worker + (1 if cell.verb == "tune" else 0)
    return 1.0


def _open_stage_runs(runner: Runner, todo: list[str], uri: str | None) -> None:
    """A matrix stage with cells to run gets an MLflow run of its own under the pipeline's, parent of its
    cells' runs (reopened on a rerun: <root>/.stages/<stage>/mlflow_run_id.txt)."""
    plan = runner.plan
    if not uri:
        return
    for stage in dict.fromkeys(plan.cells[cid].stage for cid in todo):
        if not plan.spec.stages[stage].matrix:
            continue
        config = config_for(plan.base.to_dict(), {"run.storage": storage.join(plan.root, ".stages"), "run.name": stage,
                                                  "tracking.uri": uri})
        runner.stage_runs[stage] = tracking.start_run(
            config, parent_run_id=runner.parent_run_id,
            tags={"avgk.kind": "pipeline-stage", "avgk.pipeline": plan.spec.name, "avgk.stage": stage})


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{math.ceil(seconds / 60)} min"


def train_documents(result: PipelineResult, stage: str) -> dict[str, dict[str, Any]]:
    """{cell label: metrics.json} of a train stage's finished cells."""
    docs = {}
    for cell in result.plan.of_stage(stage):
        out = result.outputs.get(cell.id)
        if out and "run_dir" in out:
            docs[cell.name] = json.loads(storage.read_bytes(storage.join(out["run_dir"], "metrics.json")))
    return docs
