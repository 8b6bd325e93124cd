"""`avgk tune`: a Ray Tune sweep, one training per trial, ASHA on val avg-K, MLflow parent + child runs.

Wiring (ray 2.60, Train V2): the Tuner runs `run_trial` (a function trainable) per trial; it builds the
trial's TorchTrainer with pipelines.train.build_trainer and adds
`ray.tune.integration.ray_train.TuneReportCallback()` to the Train RunConfig's callbacks, which forwards
rank 0's per-epoch `ray.train.report` metrics to the trial, so ASHA sees every epoch. A sweep whose
trials train on one CPU worker each (pipelines.train.runs_in_one_process) runs engine.fit in the trial's
own process instead and reports each epoch to Tune itself (_TuneReporter): no Train controller, helper
actors or worker process per trial; such a trial holds trial_cpus + train.cpus_per_worker.

CPU accounting: the trial's driver function holds `trial_cpus` (a Tune resource request); the Train
controller it starts takes 0 CPUs and its workers take train.num_workers x train.cpus_per_worker *outside*
the trial's resources. Tune cannot see the workers, so more trials than the cluster fits would take every
CPU with driver functions and wait forever for workers: concurrency is capped at what fits.

Layout under <run.storage>/<sweep name>/:  sweep.yaml (the resolved sweep, checked on resume),
mlflow_run_id.txt (the parent run), tune/ (Tune's experiment: resumable), trials/<trial_id>/ (each
trial's run directory: checkpoints, config.yaml, metrics.json, mlflow_run_id.txt), summary.md/.csv.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from avgk.config import Config
from avgk.evaluation.metrics import format_k
from avgk.experiments.sweep_config import Domain, SweepConfig, SweepConfigError
from avgk.records import tracking
from avgk.runtime import storage
from avgk.runtime.console import say
from pipelines.tune_trial import plain, run_trial, trial_config, trial_in_own_process

if TYPE_CHECKING:  # for annotations: this module imports Ray inside the functions that use it
    import pandas as pd
    from ray.tune import ResultGrid
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search.sample import Domain as TuneDomain

SWEEP_FILE = "sweep.yaml"



@dataclass(frozen=True)
class SweepPaths:
    root: str

    @property
    def tune(self) -> str:
        return storage.join(self.root, "tune")

    @property
    def trials(self) -> str:
        return storage.join(self.root, "trials")

    def trial(self, trial_id: str) -> str:
        return storage.join(self.trials, trial_id)


# ---------------------------------------------------------------- the sweep driver


@dataclass
class TrialRow:
    trial_id: str
    status: str  # FINISHED | KILLED (stopped early) | FAILED
    params: dict[str, Any]
    epochs: int  # epochs reported
    best_val: float | None  # best value of the scheduler metric over the trial's epochs
    test_avg_k: float | None  # test avg-K accuracy at the trial's loss.k (metrics.json), if it completed
    run_dir: str
    mlflow_run_id: str | None = None


@dataclass
class SweepResult:
    root: str
    parent_run_id: str | None
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None


def _tune_domain(domain: Domain) -> TuneDomain | dict[str, Any]:
    """The Tune search-space entry of a sweep's space entry (grid_search gives a dict)."""
    from ray import tune

    v = domain.values
    makers: dict[str, Callable[[], TuneDomain | dict[str, Any]]] = {
        "choice": lambda: tune.choice(v),
        "grid": lambda: tune.grid_search(v),
        "uniform": lambda: tune.uniform(v[0], v[1]),
        "loguniform": lambda: tune.loguniform(v[0], v[1]),
        "quniform": lambda: tune.quniform(v[0], v[1], v[2]),
        "qloguniform": lambda: tune.qloguniform(v[0], v[1], v[2]),
        "randint": lambda: tune.randint(int(v[0]), int(v[1])),
        "lograndint": lambda: tune.lograndint(int(v[0]), int(v[1])),
    }
    return makers[domain.kind]()


def _check_resume(paths: SweepPaths, document: dict[str, Any], *, log: Callable[[str], None]) -> None:
    """A sweep folder belongs to one sweep: resuming it with a different sweep or base config is an error."""
    path = storage.join(paths.root, SWEEP_FILE)
    text = yaml.safe_dump(document, sort_keys=True)
    if storage.exists(path):
        if storage.read_bytes(path).decode() != text:
            raise SweepConfigError(
                f"sweep folder {paths.root} holds a sweep with a different configuration (see its {SWEEP_FILE}): "
                "choose another sweep name (name=...) or remove the folder"
            )
        log(f"resuming sweep in {paths.root}")
    else:
        storage.write_bytes(path, text.encode())


def _concurrency(sweep: SweepConfig, base: Config, *, log: Callable[[str], None]) -> int:
    """Trials at once: the sweep's max_concurrent_trials, capped at what the cluster's CPUs/GPUs fit."""
    import ray

    workers = base.train.num_workers
    per_trial_cpus = sweep.trial_cpus + workers * base.train.cpus_per_worker
    total: dict[str, float] = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 0) / per_trial_cpus + 1e-9)
    if base.train.use_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0) / workers + 1e-9))
    if fits < 1:
        raise ValueError(
            f"one trial needs {per_trial_cpus:g} CPUs (trial_cpus {sweep.trial_cpus:g} + train.num_workers {workers} x "
            f"train.cpus_per_worker {base.train.cpus_per_worker:g})"
            + (f" and {workers} GPUs" if base.train.use_gpu else "")
            + f", the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
        )
    wanted = sweep.max_concurrent_trials or fits
    if wanted > fits:
        log(f"max_concurrent_trials={wanted} capped at {fits}: more would hold every CPU with trial drivers "
            "and leave none for their Train workers")
    return min(wanted, fits)


def _best_of(frame: pd.DataFrame | None, metric: str, mode: str) -> tuple[float | None, int]:
    if frame is None or metric not in getattr(frame, "columns", []) or frame[metric].dropna().empty:
        return None, 0
    values = frame[metric].dropna()
    best = values.max() if mode == "max" else values.min()
    epochs = int(frame["epoch"].max()) if "epoch" in frame.columns else len(values)
    return float(best), epochs


def _test_avg_k(run_dir: str, k: float) -> float | None:
    path = storage.join(run_dir, "metrics.json")
    if not storage.exists(path):
        return None
    accuracy: float | None = storage.read_json(path)["test"]["avg_k_accuracy"].get(format_k(k))
    return accuracy


def _collect_rows(results: ResultGrid, sweep: SweepConfig, base_tree: dict[str, Any], paths: SweepPaths) -> list[TrialRow]:
    rows = []
    for index in range(len(results)):  # ResultGrid iterates through __getitem__, which mypy does not count
        result = results[index]
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id is None:  # a trial that failed before its first report: its own finally marked it FAILED
            continue
        trial_space = result.config
        assert trial_space is not None  # every trial's result holds its sampled config
        params = {key: plain(trial_space[key]) for key in sweep.space if key in trial_space}
        config = trial_config(base_tree, params, trials_dir=paths.trials, trial_id=trial_id)
        run_dir = paths.trial(trial_id)
        best_val, epochs = _best_of(result.metrics_dataframe, sweep.scheduler.metric, sweep.scheduler.mode)
        test = _test_avg_k(run_dir, config.loss.k)
        if result.error is not None:
            status = "FAILED"
        else:  # completed = trained every epoch *and* wrote its test evaluation; else the scheduler stopped it
            status = "FINISHED" if storage.exists(storage.join(run_dir, "metrics.json")) else "KILLED"
        id_file = storage.join(run_dir, tracking.RUN_ID_FILE)
        run_id = storage.read_bytes(id_file).decode().strip() if storage.exists(id_file) else None
        rows.append(TrialRow(trial_id, status, params, epochs, best_val, test, run_dir, run_id))
    sign = -1 if sweep.scheduler.mode == "max" else 1
    rows.sort(key=lambda r: (r.best_val is None, sign * (r.best_val or 0.0), r.trial_id))
    return rows


def _settle_children(uri: str, parent_run_id: str, rows: list[TrialRow]) -> None:
    """Every child ends FINISHED, KILLED (stopped early) or FAILED; none is left RUNNING."""
    from mlflow.tracking import MlflowClient

    for row in rows:
        if row.mlflow_run_id:
            tracking.end_run(uri, row.mlflow_run_id, status=row.status)
    client = MlflowClient(uri)
    experiment_ids = [client.get_run(parent_run_id).info.experiment_id]
    known = {row.mlflow_run_id for row in rows}
    for child in client.search_runs(experiment_ids, filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        if child.info.run_id not in known and child.info.status == "RUNNING":
            tracking.end_run(uri, child.info.run_id, status="FAILED")  # killed before it reported anything


def format_table(rows: list[TrialRow], sweep: SweepConfig, *, markdown: bool = False) -> str:
    keys = list(sweep.space)
    header = ["trial", "status", *keys, "epochs", sweep.scheduler.metric, "test avg-K"]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[r.trial_id, r.status, *(cell(r.params.get(k)) for k in keys), str(r.epochs), cell(r.best_val),
             cell(r.test_avg_k)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def _summary_csv(rows: list[TrialRow], sweep: SweepConfig) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "status", *sweep.space, "epochs", sweep.scheduler.metric, "test_avg_k_accuracy",
                     "mlflow_run_id"])
    for r in rows:
        writer.writerow([r.trial_id, r.status, *(r.params.get(k) for k in sweep.space), r.epochs, r.best_val,
                         r.test_avg_k, r.mlflow_run_id])
    return out.getvalue()


def run_sweep(sweep: SweepConfig, base: Config, *, log: Callable[[str], None] = say,
              parent_run_id: str | None = None) -> SweepResult:
    """Runs (or resumes) the sweep, evaluates the best trial on test, writes and logs the summary.

    `parent_run_id`: the sweep's own MLflow run opens as its child (a pipeline's tune stage)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines import job
    from pipelines.evaluate import run_evaluate

    scheduler_cfg = sweep.scheduler
    max_t = scheduler_cfg.max_t or base.train.epochs
    if scheduler_cfg.name == "asha" and scheduler_cfg.grace_period > max_t:
        raise SweepConfigError(
            f"sweep config error: scheduler.grace_period={scheduler_cfg.grace_period} must be <= max_t={max_t} "
            "(scheduler.max_t, default train.epochs)"
        )
    per_trial_cpus = sweep.trial_cpus + base.train.num_workers * base.train.cpus_per_worker
    # resume=False: trials resume through Tune (_check_resume below checks the sweep folder)
    base = job.start(base, cpus=per_trial_cpus, resume=False, join=False)
    paths = SweepPaths(storage.join(base.run.storage, sweep.name))
    parent_config = base.model_copy(update={"run": base.run.model_copy(update={"name": sweep.name})})
    job.claim_run_dir(parent_config)  # the sweep folder: a second `avgk tune` of this sweep stops in one line
    # What decides the trials; evaluate_best, max_concurrent_trials and trial_cpus may change on resume.
    trials_spec = sweep.model_dump(mode="json", include={"space", "overrides", "num_samples", "scheduler", "seed"})
    _check_resume(paths, {"sweep": trials_spec, "base": base.to_dict()}, log=log)  # before any Ray process starts
    job.join_cluster(cpus=per_trial_cpus)

    # The parent run's directory is the sweep folder (its mlflow_run_id.txt reopens it on resume).
    base_tree = base.to_dict()
    resumed = storage.exists(storage.join(paths.root, tracking.RUN_ID_FILE))
    with job.tracked(parent_config, parent_run_id=parent_run_id,
                     tags={"avgk.sweep": sweep.name, "avgk.kind": "sweep"}) as run:
        uri, parent_run_id = run.uri, run.run_id
        if uri and parent_run_id is not None:
            if not resumed:  # MLflow params are write-once; a resume may change evaluate_best or the concurrency
                tracking.log_params(uri, parent_run_id, sweep.flat())
            base_tree["tracking"]["uri"] = uri  # every trial logs where the parent is, whatever its run.storage
        concurrency = _concurrency(sweep, base, log=log)
        in_trial = trial_in_own_process(sweep, base)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base_tree=base_tree, trials_dir=paths.trials,
                                 parent_run_id=parent_run_id, uri=uri, sweep_name=sweep.name, in_trial=in_trial),
            # a trial training in its own process also holds its worker's CPUs
            {"cpu": sweep.trial_cpus + (base.train.cpus_per_worker if in_trial else 0)},
        )
        if tune.Tuner.can_restore(paths.tune):
            # Finished trials keep their results; unfinished and errored ones start again and their
            # TorchTrainer resumes from its own latest checkpoint (same storage + trial id).
            tuner = tune.Tuner.restore(paths.tune, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
        else:
            scheduler: TrialScheduler
            if scheduler_cfg.name == "asha":
                # stop_last_trials=False: a trial that reaches max_t ends by returning, after its
                # final test evaluation, instead of being killed at its last report.
                scheduler = ASHAScheduler(time_attr=scheduler_cfg.time_attr, max_t=max_t,
                                          grace_period=scheduler_cfg.grace_period,
                                          reduction_factor=scheduler_cfg.reduction_factor, stop_last_trials=False)
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                param_space={key: _tune_domain(domain) for key, domain in sweep.space.items()},
                tune_config=tune.TuneConfig(
                    metric=scheduler_cfg.metric, mode=scheduler_cfg.mode, scheduler=scheduler,
                    num_samples=sweep.num_samples,
                    search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=sweep.seed),
                ),
                run_config=tune.RunConfig(name="tune", storage_path=paths.root, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        results = tuner.fit()
        rows = _collect_rows(results, sweep, base_tree, paths)
        if uri and parent_run_id:
            _settle_children(uri, parent_run_id, rows)
        outcome = SweepResult(root=paths.root, parent_run_id=parent_run_id, rows=rows)
        candidates = [r for r in rows if r.best_val is not None and r.status != "FAILED"]
        outcome.best = candidates[0] if candidates else None
        if outcome.best is not None and sweep.evaluate_best:
            best = outcome.best
            best_config = trial_config(base_tree, best.params, trials_dir=paths.trials, trial_id=best.trial_id)
            log(f"evaluating the best trial {best.trial_id} on test")
            run_evaluate(best_config, run=best.run_dir, log=log)
            best.test_avg_k = _test_avg_k(best.run_dir, best_config.loss.k)
        _write_summary(outcome, sweep, uri=uri, log=log)
    return outcome


def _write_summary(outcome: SweepResult, sweep: SweepConfig, *, uri: str | None, log: Callable[[str], None]) -> None:
    table = format_table(outcome.rows, sweep)
    log(table)
    best = outcome.best
    lines = [f"# sweep {sweep.name}", ""]
    if best is not None:
        lines += [f"best trial: {best.trial_id} ({sweep.scheduler.metric} {best.best_val:.4f}"
                  + (f", test avg-K {best.test_avg_k:.4f})" if best.test_avg_k is not None else ")"), ""]
        log(lines[-2])
    lines += [format_table(outcome.rows, sweep, markdown=True), ""]
    storage.write_bytes(storage.join(outcome.root, "summary.md"), "\n".join(lines).encode())
    storage.write_bytes(storage.join(outcome.root, "summary.csv"), _summary_csv(outcome.rows, sweep).encode())
    if outcome.parent_run_id is None or uri is None:  # tracking off (a parent run comes with its uri)
        return
    import tempfile
    from pathlib import Path

    run_id = outcome.parent_run_id
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("summary.md", "summary.csv"):
            local = Path(tmp) / name
            local.write_bytes(storage.read_bytes(storage.join(outcome.root, name)))
            tracking.log_artifact(uri, run_id, local)
        if best is None:
            return
        tags = {"avgk.best_trial": best.trial_id, f"avgk.best_{sweep.scheduler.metric}": f"{best.best_val:.6f}",
                "avgk.best_run_dir": best.run_dir}
        if best.mlflow_run_id:
            tags["avgk.best_mlflow_run_id"] = best.mlflow_run_id
        if best.test_avg_k is not None:
            tags["avgk.best_test_avg_k_accuracy"] = f"{best.test_avg_k:.6f}"
        tracking.set_tags(uri, run_id, tags)
        assert best.best_val is not None  # the best trial is one with a value
        best_metrics = {f"best_{sweep.scheduler.metric}": best.best_val}
        if best.test_avg_k is not None:
            best_metrics["best_test_avg_k_accuracy"] = best.test_avg_k
        tracking.log_metrics(uri, run_id, best_metrics, step=0)
        for name in ("metrics.json", "thresholds.json"):
            path = storage.join(best.run_dir, name)
            if storage.exists(path):
                local = Path(tmp) / name
                local.write_bytes(storage.read_bytes(path))
                tracking.log_artifact(uri, run_id, local, artifact_path="best_trial")
        plots = Path(best.run_dir) / "plots"
        if "://" not in best.run_dir and plots.is_dir():
            tracking.log_artifacts(uri, run_id, plots, artifact_path="best_trial/plots")
