"""The cells of a pipeline: each verb run for one cell of its stage, with its inputs' outputs.

pipelines.pipeline walks the graph; a Runner runs one cell in its folder and returns the outputs its
record keeps (a run directory, the tuned values, a comparison's winner). A single-worker CPU training
is one Ray task (_train_task); the other verbs run as their commands do.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from avgk.config import Config
from avgk.experiments import pipeline_state as ps
from avgk.experiments.pipeline_plan import Cell, Plan, compare_label
from avgk.experiments.pipeline_spec import PipelineSpecError
from avgk.experiments.sweep_config import config_for
from avgk.records import tracking
from avgk.runtime import storage


def _train_task(config_tree: dict[str, Any], uri: str | None, parent_run_id: str | None, tags: dict[str, str],
                log_prefix: str) -> dict[str, Any]:
    """One single-worker training inside a Ray task (pipelines.train.fit_in_process) in its own MLflow run."""
    from avgk.runtime.console import say as say_line
    from avgk.training import checkpoints
    from pipelines.train import fit_in_process

    config = Config.model_validate(config_tree)
    run_dir = config.run_dir
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_run(config, parent_run_id=parent_run_id, tags=tags) if uri else None

    def log(line: str) -> None:
        say_line(f"[{log_prefix}] {line}")

    start = time.perf_counter()
    with tracking.lifecycle(uri, run_id):
        result = fit_in_process(config, reporter=checkpoints.LocalReporter(run_dir), uri=uri, run_id=run_id, log=log)
        if uri and run_id:
            tracking.log_metrics(uri, run_id, {"cell_seconds": time.perf_counter() - start}, step=0)
    return {"run_dir": run_dir, "mlflow_run_id": run_id, "history": result.history,
            "seconds": time.perf_counter() - start}


OWN_RUNS = {"train", "tune", "evaluate", "pseudolabel"}
"""Verbs whose work opens its MLflow run itself (a training's run, a sweep's parent run; the scoring
jobs log into the run they score); the others get a child run of the pipeline's for their cell."""


SCORING_LOCK = threading.Lock()
"""One scoring job (evaluate, pseudolabel) at a time in a driver: each sizes its actor pool to half the
cluster's CPUs and leaves the rest to its read tasks (pipelines.scoring.plan_scoring); two side by side
held every CPU with actors, and their read tasks waited for ever (seen: four jobs of the smoke-size
PlantCLEF pipeline, no error)."""

TUNE_LOCK = threading.Lock()
"""One sweep at a time in a driver: Ray Tune keeps per-process state (the registry behind
tune.with_parameters names a trainable by its function), so two sweeps started side by side in one
process wrote their trials into one folder. A sweep runs its own trials side by side."""


class Runner:
    def __init__(self, plan: Plan, prints: dict[str, dict[str, Any]], *, uri: str | None, parent_run_id: str | None,
                 spec_dir: Path | None, log: Callable[[str], None]):
        self.plan, self.prints, self.uri, self.parent_run_id = plan, prints, uri, parent_run_id
        self.spec_dir, self.log = spec_dir, log
        self.outputs: dict[str, dict[str, Any]] = {}
        self.failed_inputs: dict[str, list[str]] = {}  # a tolerant cell's inputs that failed (pipelines.pipeline)
        self.stage_runs: dict[str, str] = {}  # a matrix stage's MLflow run, the parent of its cells' runs
        self._cell_runs: dict[str, tuple[str | None, str | None]] = {}

    def parent_of(self, cell: Cell) -> str | None:
        return self.stage_runs.get(cell.stage, self.parent_run_id)

    def artifacts(self, cell: Cell, local_dir: str) -> None:
        """A local folder's files into the cell's own MLflow run (prepare, compare, register, summarize)."""
        uri, run_id = self._cell_runs.get(cell.id, (None, None))
        if uri and run_id:
            tracking.log_artifacts(uri, run_id, local_dir)

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
            if cell.verb == "train" and self.plan.cells[source].verb == "train":
                values["model.pretrained"] = out["run_dir"]  # fine-tuning: its backbone, fresh heads
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
            if src.verb in ("train", "evaluate") and source in self.outputs:  # a tolerant cell skips failed inputs
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
                run_id = tracking.start_run(config, parent_run_id=self.parent_of(cell), tags=self.tags(cell)) if uri else None
                self._cell_runs[cell.id] = (uri, run_id)
                with tracking.lifecycle(uri, run_id):
                    outputs = getattr(self, f"_{cell.verb}")(cell, folder)
        except BaseException as err:
            ps.write_record(folder, {**record, "status": "failed", "error": str(err).splitlines()[0][:500] if str(err)
                                     else type(err).__name__, "seconds": time.perf_counter() - start})
            raise
        seconds = time.perf_counter() - start
        status = "partial" if self.failed_inputs.get(cell.id) else "finished"  # partial: run again next time
        ps.write_record(folder, {**record, "status": status, "outputs": outputs, "seconds": seconds,
                                 "failed_inputs": self.failed_inputs.get(cell.id, [])})
        return {**outputs, "_seconds": seconds}

    def _prepare(self, cell: Cell, folder: str) -> dict[str, Any]:
        from avgk.data.manifest import MANIFEST_NAME
        from avgk.data.prepare import ensure_shards

        config = cell.config
        ensure_shards(config)
        return {"shards": config.data.shards, "check": storage.join(config.data.shards, MANIFEST_NAME)}

    def _train(self, cell: Cell, folder: str) -> dict[str, Any]:
        import ray

        from pipelines import job
        from pipelines.train import run_training, runs_in_one_process

        config = self.cell_config(cell)
        prefix = f"{self.plan.spec.name}-{cell.name}"
        if not runs_in_one_process(config):
            run_training(config, parent_run_id=self.parent_of(cell), log_prefix=prefix, tags=self.tags(cell))
            run_id_file = storage.join(config.run_dir, tracking.RUN_ID_FILE)
            run_id = storage.read_bytes(run_id_file).decode().strip() if storage.exists(run_id_file) else None
            return {"run_dir": config.run_dir, "mlflow_run_id": run_id}
        config = job.start(config, cpus=config.train.cpus_per_worker, resume=True, data=True)
        task = ray.remote(num_cpus=config.train.cpus_per_worker, max_retries=0)(_train_task)
        result: dict[str, Any] = ray.get(task.remote(config.to_dict(), self.uri, self.parent_of(cell), self.tags(cell),
                                                     prefix))
        return result

    def _train_config_of(self, train_cell: Cell, out: dict[str, Any]) -> Config:
        tree = yaml.safe_load(storage.read_bytes(storage.join(out["run_dir"], "config.yaml")))
        return Config.model_validate(tree)

    def _evaluate(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.evaluate import run_evaluate

        (src, out), = self.trained_inputs(cell)
        config = self._train_config_of(src, out)
        with SCORING_LOCK:
            run_evaluate(config, run=out["run_dir"], checkpoint=cell.options["checkpoint"],
                         log=lambda line: self.log(f"[{cell.id}] {line}"))
        return {"run_dir": out["run_dir"], "mlflow_run_id": out.get("mlflow_run_id")}

    def _pseudolabel(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.pseudolabel import run_pseudolabel

        (src, out), = self.trained_inputs(cell)
        config = self._train_config_of(src, out)
        with SCORING_LOCK:
            _, uri = run_pseudolabel(config, run=out["run_dir"], checkpoint=cell.options["checkpoint"],
                                     log=lambda line: self.log(f"[{cell.id}] {line}"))
        return {"run_dir": out["run_dir"], "pseudo_labels": uri}

    def _tune(self, cell: Cell, folder: str) -> dict[str, Any]:
        with TUNE_LOCK:
            return self._tune_alone(cell, folder)

    def _tune_alone(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.tune import run_sweep

        sweep = load_stage_sweep(cell, self.spec_dir)
        config = config_for(self.cell_config(cell).to_dict(), {"run.storage": folder})
        sweep = sweep.model_copy(update={"name": "sweep"})
        result = run_sweep(sweep, config, log=lambda line: self.log(f"[{cell.id}] {line}"),
                           parent_run_id=self.parent_of(cell))
        if result.best is None:
            raise RuntimeError(f"{cell.id}: no trial of the sweep finished ({result.root}/summary.md)")
        return {"values": dict(result.best.params), "sweep_dir": result.root, "best_run": result.best.run_dir}

    def _compare(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.compare import run_compare

        runs = [(compare_label(cell, src), out["run_dir"]) for src, out in self.trained_inputs(cell)]
        with tempfile.TemporaryDirectory(prefix="avgk-compare-") as tmp:
            local = tmp if storage.is_remote(folder) else folder  # written here, then uploaded to a bucket
            result = run_compare(runs, reference=cell.options["reference"], out=local, k=cell.options["k"],
                                 log=lambda line: self.log(line))
            if local != folder:
                for path in Path(local).rglob("*"):
                    if path.is_file():
                        storage.upload_file(path, storage.join(folder, str(path.relative_to(local))))
            self.artifacts(cell, local)
        return {"out": folder, "winner": result.winner, "winner_run": result.winner_run,
                "runs": [[m, r] for m, r in runs]}

    def _summarize(self, cell: Cell, folder: str) -> dict[str, Any]:
        """A study's tables and figures over its trained cells, in the cell's folder and at the study's root."""
        import shutil

        from avgk.experiments.study_config import Cell as StudyCell
        from avgk.experiments.study_config import StudyConfig
        from avgk.experiments.study_summary import collect, write_summary

        study = StudyConfig.model_validate(cell.options["study"])
        cells, records = [], {}
        for src, out in self.trained_inputs(cell):
            config = self._train_config_of(src, out)
            study_cell = StudyCell(dict(src.labels)["method"], config.data.synthetic.ambiguity_rate, config.train.seed,
                                   config)
            cells.append(study_cell)
            records[study_cell.name] = {"seconds": out.get("seconds"), "history": out.get("history") or []}
        rows, per_class = collect(cells, records)
        failed = [self.plan.cells[i].name for i in self.failed_inputs.get(cell.id, [])]
        write_summary(study, self.plan.base, Path(folder), rows, per_class, failed=failed)
        self.artifacts(cell, folder)
        root = Path(self.plan.root)
        for name in ("summary.md", "results.csv", "per_class.parquet"):  # the study's documented layout
            shutil.copy2(Path(folder) / name, root / name)
        shutil.copytree(Path(folder) / "plots", root / "plots", dirs_exist_ok=True)
        self.log(f"study summary: {root}/summary.md")
        return {"out": folder, "root": str(root)}

    TOLERANT = frozenset({"summarize"})
    """Verbs that run on the inputs that finished when others failed (a study's summary lists the failed
    cells); their record says "partial", so the next run makes them again."""

    def _predict(self, cell: Cell, folder: str) -> dict[str, Any]:
        """The prediction job (pipelines.predict_job) with the model it needs, its parts in the cell's folder."""
        from pipelines.predict_job import run_predict_job

        run_dir = self.model_run(cell)
        config = self._train_config_of(cell, {"run_dir": run_dir})
        k = float(cell.options["k"]) if cell.options["k"] is not None else config.loss.k
        summary = run_predict_job(run=run_dir, k=k, inputs=list(cell.options["inputs"]), out=folder,
                                  split=str(cell.options["split"]), top_k=bool(cell.options["top_k"]),
                                  log=lambda line: self.log(f"[{cell.id}] {line}"))
        uri, run_id = self._cell_runs.get(cell.id, (None, None))
        if uri and run_id:
            scored = summary.images - summary.failed
            tracking.log_metrics(uri, run_id, {"predict_images": summary.images, "predict_failed": summary.failed,
                                               "predict_mean_set_size": summary.set_sizes / scored if scored else 0.0},
                                 step=0)
        return {"out": folder, "run_dir": run_dir, "k": k, "labelled_now": summary.images, "failed_now": summary.failed}

    def model_run(self, cell: Cell) -> str:
        """The run a register or predict cell uses: its compare's winner, or the one trained run it needs."""
        run_dir = None
        for source in cell.inputs:
            out = self.outputs[source]
            run_dir = out.get("winner_run") or out.get("run_dir") or run_dir
        if run_dir is None:
            raise ValueError(f"{cell.id}: its inputs name no trained run")
        return str(run_dir)

    def _register(self, cell: Cell, folder: str) -> dict[str, Any]:
        from pipelines.compare import run_register

        run_dir = self.model_run(cell)
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
    # The stages after a tune stage retrain the chosen values: its best trial needs no test evaluation of
    # its own (with.sweep_overrides: {evaluate_best: true} asks for one).
    changes = {"evaluate_best": False, **(cell.options.get("sweep_overrides") or {})}
    if cell.options.get("num_samples") is not None:
        changes["num_samples"] = cell.options["num_samples"]
    tree, config_keys = read_plan(path, [f"{key}={json.dumps(value)}" for key, value in changes.items()],
                                  kind="sweep", error=PipelineSpecError)
    if config_keys:
        raise PipelineSpecError(f"pipeline spec error: stages.{cell.stage}.with.sweep_overrides sets config keys "
                                f"{[k.partition('=')[0] for k in config_keys]}: those go in the stage's overrides")
    tree.setdefault("base", "(the pipeline's config)")
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as err:
        raise PipelineSpecError(f"pipeline spec error: stages.{cell.stage}.with.sweep: {format_errors(err)}") from None
    validate_space(sweep, cell.config.to_dict())
    return sweep
