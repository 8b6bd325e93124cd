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
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from avgk.config import Config
from avgk.experiments import pipeline_state as ps
from avgk.experiments.pipeline_spec import Cell, PipelineSpecError, Plan, load_pipeline
from avgk.experiments.sweep_config import config_for
from avgk.records import tracking
from avgk.records.runs import with_absolute_paths
from avgk.runtime import storage
from avgk.runtime.console import say


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


# ---------------------------------------------------------------- the console tree and the figure


def tree_lines(plan: Plan, states: dict[str, ps.State], prints: dict[str, dict[str, Any]],
               seconds: dict[str, float] | None = None, selected: set[str] | None = None) -> list[str]:
    seconds = seconds or {}
    lines = [f"pipeline {plan.spec.name} -> {plan.root}"]
    for name in plan.stage_order:
        stage = plan.spec.stages[name]
        needs = f" <- {', '.join(stage.needs)}" if stage.needs else ""
        off = "" if selected is None or name in selected else "  [not selected]"
        lines.append(f"  {name} ({stage.verb}){needs}{off}")
        for cell in plan.of_stage(name):
            took = f", {seconds[cell.id]:.0f} s" if cell.id in seconds else ""
            label = cell.name if cell.labels else "-"
            lines.append(f"    {label:<24} {states[cell.id].describe():<34} {prints[cell.id]['fingerprint']}{took}")
    return lines


COLORS = {ps.DONE: "#9ecf8f", ps.RUN: "#f4d58d", ps.RESUME: "#f6b26b", ps.UNREACHABLE: "#cccccc", "failed": "#e06666"}


def graph_figure(plan: Plan, states: dict[str, ps.State], seconds: dict[str, float], failed: list[str]) -> Any:
    """Stages left to right by depth, one box per cell coloured by state, with its duration; arrows for needs."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    depth: dict[str, int] = {}
    for name in plan.stage_order:
        needs = plan.spec.stages[name].needs
        depth[name] = 1 + max((depth[n] for n in needs), default=-1)
    columns: dict[int, list[Cell]] = {}
    for name in plan.stage_order:
        columns.setdefault(depth[name], []).extend(plan.of_stage(name))
    rows = max(len(v) for v in columns.values())
    fig = Figure(figsize=(2.6 * len(columns) + 1, 0.75 * rows + 1.2))
    ax = fig.add_subplot()
    where: dict[str, tuple[float, float]] = {}
    for col, cells in columns.items():
        for i, cell in enumerate(cells):
            x, y = col * 2.6, (rows - 1) / 2 - i + (len(cells) - 1) / 2 - (rows - 1) / 2
            where[cell.id] = (x, y)
            state = "failed" if cell.id in failed else states[cell.id].state
            ax.add_patch(FancyBboxPatch((x - 1.0, y - 0.28), 2.0, 0.56, boxstyle="round,pad=0.02",
                                        facecolor=COLORS.get(state, "#ffffff"), edgecolor="#555555"))
            took = f"\n{states[cell.id].why}, {seconds[cell.id]:.0f} s" if cell.id in seconds else ""
            ax.text(x, y, f"{cell.id}{took}", ha="center", va="center", fontsize=7)
    for cell in plan.cells.values():
        for source in cell.inputs:
            (x0, y0), (x1, y1) = where[source], where[cell.id]
            ax.annotate("", xy=(x1 - 1.0, y1), xytext=(x0 + 1.0, y0),
                        arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.8})
    ax.set_xlim(-1.2, 2.6 * (len(columns) - 1) + 1.2)
    ax.set_ylim(-rows / 2 - 0.2, rows / 2 + 0.2)
    ax.axis("off")
    ax.set_title(f"pipeline {plan.spec.name}: green done, yellow to run, orange to resume, red failed", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the verbs as cells


def _train_task(config_tree: dict[str, Any], uri: str | None, parent_run_id: str | None, tags: dict[str, str],
                log_prefix: str) -> dict[str, Any]:
    """One single-worker training inside a Ray task: engine.fit with a local reporter, then what the
    rank 0 of a TorchTrainer run does at the end (evaluation, plots and model in MLflow)."""
    import torch

    from avgk.runtime.console import say as say_line
    from avgk.training import checkpoints, engine
    from pipelines.train import record_results

    torch.set_num_threads(1)
    config = Config.model_validate(config_tree)
    run_dir = config.run_dir
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_run(config, parent_run_id=parent_run_id, tags=tags) if uri else None

    def log(line: str) -> None:
        say_line(f"[{log_prefix}] {line}")

    def on_epoch_end(metrics: dict[str, float], epoch: int) -> None:
        if uri and run_id:
            tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)

    with tracking.lifecycle(uri, run_id):
        result = engine.fit(config, reporter=checkpoints.LocalReporter(run_dir), on_epoch_end=on_epoch_end, log=log)
        if result.evaluation is not None:
            record_results(config, result.evaluation, uri=uri, run_id=run_id, log=log)
    return {"run_dir": run_dir, "mlflow_run_id": run_id}


OWN_RUNS = {"train", "tune", "evaluate", "pseudolabel"}
"""Verbs whose work opens its MLflow run itself (a training's run, a sweep's parent run; the scoring
jobs log into the run they score); the others get a child run of the pipeline's for their cell."""


class Runner:
    def __init__(self, plan: Plan, prints: dict[str, dict[str, Any]], *, uri: str | None, parent_run_id: str | None,
                 spec_dir: Path | None, log: Callable[[str], None]):
        self.plan, self.prints, self.uri, self.parent_run_id = plan, prints, uri, parent_run_id
        self.spec_dir, self.log = spec_dir, log
        self.outputs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def folder(self, cell: Cell) -> str:
        return ps.cell_dir(self.plan, cell, self.prints[cell.id]["fingerprint"])

    def cell_config(self, cell: Cell) -> Config:
        """The cell's config with its run folder, the pipeline's tracking store, its inputs' data and tuned values."""
        values: dict[str, Any] = {"run.storage": ps.stage_dir(self.plan, cell.stage),
                                  "run.name": f"{cell.name}-{self.prints[cell.id]['fingerprint']}"}
        if self.uri:
            values["tracking.uri"] = self.uri
        else:
            values["tracking.enabled"] = False
        for source in cell.inputs:
            out = self.outputs[source]
            if "shards" in out:
                values["data.shards"] = out["shards"]
            values.update(out.get("values") or {})
        return config_for(cell.config.to_dict(), values)

    def tags(self, cell: Cell) -> dict[str, str]:
        return {"avgk.kind": "pipeline-cell", "avgk.pipeline": self.plan.spec.name, "avgk.stage": cell.stage,
                "avgk.cell": cell.id, "avgk.fingerprint": self.prints[cell.id]["fingerprint"],
                **{f"avgk.{dim}": label for dim, label in cell.labels}}

    def trained_inputs(self, cell: Cell) -> list[tuple[Cell, dict[str, Any]]]:
        found = []
        for source in cell.inputs:
            src = self.plan.cells[source]
            if src.verb == "train" or src.verb == "evaluate":
                found.append((src, self.outputs[source]))
        return found

    # ---- one cell

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        folder = self.folder(cell)
        record = {"pipeline": self.plan.spec.name, "stage": cell.stage, "cell": cell.id, "verb": cell.verb,
                  "fingerprint": self.prints[cell.id]["fingerprint"], "parts": self.prints[cell.id]["parts"],
                  "inputs": list(cell.inputs), "values": cell.values, "options": cell.options,
                  "status": "running", "started": time.time()}
        ps.write_record(folder, record)
        start = time.perf_counter()
        try:
            if cell.verb in OWN_RUNS:
                outputs = getattr(self, f"_{cell.verb}")(cell, folder)
            else:  # a child run of its own under the pipeline's, in the cell's folder
                config = config_for(self.cell_config(cell).to_dict(), {"run.storage": ps.stage_dir(self.plan, cell.stage),
                                                                       "run.name": folder.rsplit("/", 1)[-1]})
                uri = self.uri if config.tracking.enabled else None
                run_id = tracking.start_run(config, parent_run_id=self.parent_run_id, tags=self.tags(cell)) if uri else None
                with tracking.lifecycle(uri, run_id):
                    outputs = getattr(self, f"_{cell.verb}")(cell, folder)
                    if uri and run_id and not storage.is_remote(folder):  # the cell's results (comparison.md, figures)
                        tracking.log_artifacts(uri, run_id, folder)
        except BaseException as err:
            ps.write_record(folder, {**record, "status": "failed", "error": str(err).splitlines()[0][:500] if str(err)
                                     else type(err).__name__, "seconds": time.perf_counter() - start})
            raise
        seconds = time.perf_counter() - start
        ps.write_record(folder, {**record, "status": "finished", "outputs": outputs, "seconds": seconds})
        return {**outputs, "_seconds": seconds}

    def _prepare(self, cell: Cell, folder: str) -> dict[str, Any]:
        from avgk.data.prepare import ensure_shards

        config = cell.config
        ensure_shards(config)
        return {"shards": config.data.shards}

    def _train(self, cell: Cell, folder: str) -> dict[str, Any]:
        import ray

        from pipelines import job
        from pipelines.train import run_training

        config = self.cell_config(cell)
        prefix = f"{self.plan.spec.name}-{cell.name}"
        single = (config.train.num_workers == 1 and not config.train.use_gpu and not storage.is_remote(config.run_dir))
        if not single:
            run_training(config, parent_run_id=self.parent_run_id, log_prefix=prefix)
            run_id_file = storage.join(config.run_dir, tracking.RUN_ID_FILE)
            run_id = storage.read_bytes(run_id_file).decode().strip() if storage.exists(run_id_file) else None
            return {"run_dir": config.run_dir, "mlflow_run_id": run_id}
        config = job.start(config, cpus=config.train.cpus_per_worker, resume=True, data=True)
        task = ray.remote(num_cpus=config.train.cpus_per_worker, max_retries=0)(_train_task)
        result: dict[str, Any] = ray.get(task.remote(config.to_dict(), self.uri, self.parent_run_id, self.tags(cell),
                                                     prefix))
        return result

    def _train_config_of(self, train_cell: Cell, out: dict[str, Any]) -> Config:
        tree = yaml.safe_load(storage.read_bytes(storage.join(out["run_dir"], "config.yaml")))
        return Config.model_validate(tree)

    def _evaluate(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.evaluate import run_evaluate

        (src, out), = self.trained_inputs(cell)
        config = self._train_config_of(src, out)
        run_evaluate(config, run=out["run_dir"], checkpoint=cell.options["checkpoint"],
                     log=lambda line: self.log(f"[{cell.id}] {line}"))
        return {"run_dir": out["run_dir"], "mlflow_run_id": out.get("mlflow_run_id")}

    def _pseudolabel(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.pseudolabel import run_pseudolabel

        (src, out), = self.trained_inputs(cell)
        config = self._train_config_of(src, out)
        _, uri = run_pseudolabel(config, run=out["run_dir"], checkpoint=cell.options["checkpoint"],
                                 log=lambda line: self.log(f"[{cell.id}] {line}"))
        return {"run_dir": out["run_dir"], "pseudo_labels": uri}

    def _tune(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.tune import run_sweep

        sweep = load_stage_sweep(cell, self.spec_dir)
        config = config_for(self.cell_config(cell).to_dict(), {"run.storage": folder})
        sweep = sweep.model_copy(update={"name": "sweep"})
        result = run_sweep(sweep, config, log=lambda line: self.log(f"[{cell.id}] {line}"),
                           parent_run_id=self.parent_run_id)
        if result.best is None:
            raise RuntimeError(f"{cell.id}: no trial of the sweep finished ({result.root}/summary.md)")
        return {"values": dict(result.best.params), "sweep_dir": result.root, "best_run": result.best.run_dir}

    def _compare(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.compare import run_compare

        runs = []
        for src, out in self.trained_inputs(cell):
            method = next((lab for dim, lab in src.labels if dim != "seed"), src.name)
            runs.append((method, out["run_dir"]))
        result = run_compare(runs, reference=cell.options["reference"], out=folder, k=cell.options["k"],
                             log=lambda line: self.log(line))
        return {"out": folder, "winner": result.winner, "winner_run": result.winner_run,
                "runs": [[m, r] for m, r in runs]}

    def _register(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.compare import run_register

        run_dir = None
        for source in cell.inputs:
            out = self.outputs[source]
            run_dir = out.get("winner_run") or out.get("run_dir") or run_dir
        if run_dir is None:
            raise ValueError(f"{cell.id}: its inputs name no trained run")
        model_uri = run_register(run_dir, name=cell.options["name"], log=self.log)
        return {"model_uri": model_uri, "run_dir": run_dir}


def load_stage_sweep(cell: Cell, spec_dir: Path | None) -> Any:
    """The SweepConfig a tune stage names (with.sweep, relative to the spec), its space checked on the cell's config."""
    from pydantic import ValidationError

    from avgk.config import format_errors
    from avgk.experiments.sweep_config import SweepConfig, read_plan, validate_space

    raw = str(cell.options["sweep"])
    path = (spec_dir / raw) if spec_dir is not None and (spec_dir / raw).is_file() else Path(raw)
    if not path.is_file():
        raise PipelineSpecError(f"pipeline spec error: stages.{cell.stage}.with.sweep={raw!r}: no such file")
    tree, _ = read_plan(path, cell.options.get("num_samples") and [f"num_samples={cell.options['num_samples']}"],
                        kind="sweep", error=PipelineSpecError)
    tree.setdefault("base", "(the pipeline's config)")
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as err:
        raise PipelineSpecError(f"pipeline spec error: stages.{cell.stage}.with.sweep: {format_errors(err)}") from None
    validate_space(sweep, cell.config.to_dict())
    return sweep


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
    plan = _with_plan_paths(load_pipeline(path, overrides))
    spec_dir = Path(path).parent if Path(path).is_file() else None
    for cell in plan.cells.values():  # sweeps are files of their own: checked before anything starts
        if cell.verb == "tune":
            load_stage_sweep(cell, spec_dir)
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
    return _walk(plan, prints, states, selected, spec_dir=spec_dir, log=log, result=result)


def _walk(plan: Plan, prints: dict[str, dict[str, Any]], states: dict[str, ps.State], selected: set[str], *,
          spec_dir: Path | None, log: Callable[[str], None], result: PipelineResult) -> PipelineResult:
    from pipelines import job

    root = plan.root
    if not storage.is_remote(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    storage.write_bytes(storage.join(root, "pipeline.yaml"),
                        yaml.safe_dump({"spec": plan.spec.model_dump(mode="json", by_alias=True),
                                        "base": plan.base.to_dict()}, sort_keys=False).encode())
    parent_config = plan.base.model_copy(update={"run": plan.base.run.model_copy(update={"name": plan.spec.name})})
    with job.tracked(parent_config, tags={"avgk.kind": "pipeline", "avgk.pipeline": plan.spec.name}) as run:
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
            job.join_cluster(cpus=plan.spec.max_concurrent)
        _run_cells(runner, todo, result, log=log)
        if result.failed:
            run.outcome.status = "FAILED"
        final = {cid: (ps.State(ps.DONE, "ran") if cid in runner.outputs else states[cid]) for cid in plan.cells}
        lines = tree_lines(plan, final, prints, result.seconds, selected)
        storage.write_bytes(storage.join(root, "graph.txt"), ("\n".join(lines) + "\n").encode())
        from avgk.experiments.report import save_figure

        figure = storage.join(root, "graph.png")
        if not storage.is_remote(root):
            save_figure(graph_figure(plan, final, result.seconds, result.failed), figure)
        if run.uri and run.run_id:
            for name in ("graph.png", "graph.txt", "pipeline.yaml"):
                local = storage.join(root, name)
                if not storage.is_remote(local) and Path(local).is_file():
                    tracking.log_artifact(run.uri, run.run_id, local)
        result.parent_run_id = run.run_id
        log("\n".join(lines[1:]))
        if result.failed:
            log(f"pipeline {plan.spec.name}: {len(result.failed)} cell(s) failed: {', '.join(result.failed)}"
                + (f"; not run: {', '.join(result.skipped)}" if result.skipped else ""))
    return result


def _run_cells(runner: Runner, todo: list[str], result: PipelineResult, *, log: Callable[[str], None]) -> None:
    plan = runner.plan
    pending = list(todo)  # dependency order
    running: dict[Future[dict[str, Any]], str] = {}
    done, total, begun = 0, len(todo), time.perf_counter()
    failed: set[str] = set()
    with ThreadPoolExecutor(max_workers=plan.spec.max_concurrent, thread_name_prefix="avgk-cell") as pool:
        try:
            while pending or running:
                for cid in list(pending):
                    if len(running) >= plan.spec.max_concurrent:
                        break
                    inputs = plan.cells[cid].inputs
                    if any(i in failed or i in result.skipped for i in inputs):
                        pending.remove(cid)
                        result.skipped.append(cid)
                        done += 1
                        continue
                    if all(i in runner.outputs for i in inputs):
                        pending.remove(cid)
                        log(f"start {cid}")
                        running[pool.submit(runner.run_cell, plan.cells[cid])] = cid
                if not running:
                    break
                finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    cid = running.pop(future)
                    done += 1
                    try:
                        outputs = future.result()
                    except Exception as err:
                        failed.add(cid)
                        result.failed.append(cid)
                        message = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                        log(f"[{done}/{total}] {cid} FAILED: {message}")
                        continue
                    seconds = outputs.pop("_seconds")
                    runner.outputs[cid] = outputs
                    result.outputs[cid] = outputs
                    result.seconds[cid] = seconds
                    elapsed = time.perf_counter() - begun
                    left = elapsed / done * (total - done)
                    log(f"[{done}/{total}] {cid} finished in {seconds:.0f} s"
                        + (f"; about {_duration(left)} left" if done < total else ""))
        except BaseException:  # Ctrl-C or SIGTERM reach this thread: the cells' MLflow runs end KILLED here
            for future, cid in running.items():
                future.cancel()
                id_file = storage.join(runner.folder(plan.cells[cid]), tracking.RUN_ID_FILE)
                if runner.uri and storage.exists(id_file):
                    tracking.end_run(runner.uri, storage.read_bytes(id_file).decode().strip(), status="KILLED")
            raise


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
