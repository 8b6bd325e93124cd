"""Ray Train entry: a TorchTrainer (DDP over N workers) whose worker loop is avgk.training.engine.fit; a
single CPU worker with a local run directory runs engine.fit in the calling task or trial instead."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from avgk.config import Config
from avgk.evaluation.passes import Evaluation
from avgk.inference.serving import log_pyfunc_model_or_queue
from avgk.records import tracking
from avgk.records.runs import CHECKPOINT_FILE, resolve_checkpoint
from avgk.runtime import outbox, provenance, safe_fs, storage
from avgk.runtime.console import say
from avgk.training import checkpoints, engine, preflight
from pipelines import job, ray_private
from pipelines.process_group import OwnAddressTorchConfig


class RayReporter:
    """checkpoints.Reporter over ray.train: every rank reports, rank 0 attaches the checkpoint."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint_state(self) -> dict[str, Any] | None:
        # Each rank downloads into its own folder and removes it: Checkpoint.to_directory()
        # without a path shares one folder per checkpoint between the ranks of a node, where one
        # rank's download overwrote the file another was reading after a driver kill.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        rank = ray.train.get_context().get_world_rank()
        with tempfile.TemporaryDirectory(prefix=f"avgk-restore-rank{rank}-") as folder:
            checkpoint.to_directory(folder)
            return checkpoints.load_checkpoint_file(Path(folder) / CHECKPOINT_FILE)



def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    # Ray Train logs every report at INFO on the workers; the engine prints its own progress.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ray_private.set_train_context_log_level(logging.WARNING)  # outside the ray.train hierarchy (ray 2.60)
    if loop_config.get("code_fingerprint"):
        provenance.check_same_code(loop_config["code_fingerprint"],
                                   where=f"Ray Train worker rank {ray.train.get_context().get_world_rank()}")
    config = Config.model_validate(loop_config["config"])
    run_id: str | None = loop_config.get("mlflow_run_id")
    uri: str | None = loop_config.get("tracking_uri")  # set whenever run_id is
    os.environ[safe_fs.BUDGET_ENV] = f"{config.run.object_store_retry_s:g}"  # a joined cluster's workers too
    if run_id:  # records the server cannot take wait in the run directory, delivered by the driver
        outbox.attach(run_id, config.run_dir)
    prefix = loop_config.get("log_prefix")
    log = (lambda line: say(f"[{prefix}] {line}")) if prefix else say
    rank = ray.train.get_context().get_world_rank()

    def on_epoch_end(metrics: dict[str, float], epoch: int) -> None:
        if uri and run_id:
            tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)

    result = engine.fit(
        config,
        reporter=RayReporter(),
        device=ray.train.torch.get_device(),
        wrap_model=ray.train.torch.prepare_model,
        on_epoch_end=on_epoch_end,
        log=log,
    )
    if rank == 0 and result.evaluation is not None:
        record_results(config, result.evaluation, uri=uri, run_id=run_id, log=log)


def record_results(config: Config, evaluation: Evaluation, *, uri: str | None, run_id: str | None,
                   log: Callable[[str], None]) -> None:
    """What a finished training leaves besides its run directory: the evaluation in MLflow, the plots, the
    pyfunc model (rank 0 of a TorchTrainer run, or a pipeline's single-worker training task)."""
    run_dir = storage.absolute(config.run_dir)
    if uri and run_id:
        tracking.log_evaluation(uri, run_id, metrics=evaluation.metrics, run_dir=run_dir)
    from avgk.experiments.report import log_run_plots  # matplotlib: only once there is a finished run

    log_run_plots(uri, run_id, run_dir)  # <run_dir>/plots/, and the MLflow run's plots/
    if uri and run_id and config.tracking.log_model:
        # The checkpoint the final evaluation used, so the model matches thresholds.json.
        checkpoint = resolve_checkpoint(run_dir, None, default=config.eval.checkpoint)
        model_uri = log_pyfunc_model_or_queue(
            uri, run_id, run_dir, checkpoint=checkpoint, register_as=config.tracking.register_model
        )
        registered = f" (registered as {config.tracking.register_model})" if config.tracking.register_model else ""
        log(f"pyfunc model logged: {model_uri}{registered}" if model_uri else
            f"pyfunc model queued{registered.replace('registered', 'to be registered')}: the tracking server does not answer")


def runs_in_one_process(config: Config) -> bool:
    """A training that needs no Train worker group: one CPU worker writing to a local run directory.

    It runs in the process of a Ray task (a pipeline's train cell) or of a Tune trial, saving the
    TorchTrainer's controller, its helper actors and a worker process, each importing torch.
    """
    return config.train.num_workers == 1 and not config.train.use_gpu and not storage.is_remote(config.run_dir)


def fit_in_process(config: Config, *, reporter: checkpoints.Reporter, uri: str | None, run_id: str | None,
                   log: Callable[[str], None]) -> engine.FitResult:
    """engine.fit in this process (see runs_in_one_process), then what rank 0 of a TorchTrainer run does
    at the end: the evaluation, plots and model into the MLflow run `run_id`, opened by the caller."""
    torch.set_num_threads(max(1, math.ceil(config.train.cpus_per_worker)))  # the CPUs its task or trial holds
    Path(storage.absolute(config.run_dir)).mkdir(parents=True, exist_ok=True)

    def on_epoch_end(metrics: dict[str, float], epoch: int) -> None:
        if uri and run_id:
            tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)

    result = engine.fit(config, reporter=reporter, on_epoch_end=on_epoch_end, log=log)
    if result.evaluation is not None:
        record_results(config, result.evaluation, uri=uri, run_id=run_id, log=log)
    return result


def check_resources(config: Config) -> None:
    """GPUs asked for must exist in the cluster now: Ray Train would otherwise wait for them without end."""
    if config.train.use_gpu:
        preflight.require_gpus(config, found=ray.cluster_resources().get("GPU", 0), where="the Ray cluster has")


def build_trainer(
    config: Config,
    *,
    mlflow_run_id: str | None,
    tracking_uri: str | None,
    callbacks: list[UserCallback] | None = None,
    log_prefix: str | None = None,
) -> TorchTrainer:
    storage_path = storage.absolute(config.run.storage)
    if "://" not in storage_path:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        # Ray Train writes its checkpoint index in place: on a full disk it was left empty and the run could
        # not resume. Through this filesystem every file is published by a rename (avgk.runtime.safe_fs).
        storage_filesystem = safe_fs.atomic_local()
    else:  # checkpoints through avgk's filesystem: its retries ride out a blip of the store (avgk.runtime.safe_fs)
        storage_filesystem, storage_path = storage.resolve(storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
                           "log_prefix": log_prefix, "code_fingerprint": provenance.code_fingerprint()},
        torch_config=OwnAddressTorchConfig(),  # the rendezvous store on the node's address, not all interfaces
        scaling_config=ScalingConfig(
            num_workers=config.train.num_workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={
                "CPU": config.train.cpus_per_worker,
                **({"GPU": 1} if config.train.use_gpu else {}),
                **config.train.extra_resources,
            },
        ),
        # The two ignores: ray.train hands out Train v2's RunConfig (ray 2.60's default, which takes
        # logging_config and Train callbacks), or v1's under RAY_TRAIN_V2_ENABLED=0; mypy reads v1's.
        run_config=RunConfig(  # type: ignore[call-arg]  # v2's logging_config (see above)
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            # The last checkpoint is what resumes; the best model is kept apart in <run_dir>/best.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # the engine prints its own progress
            # e.g. Tune's TuneReportCallback when a sweep runs this trainer
            callbacks=callbacks or [],  # type: ignore[arg-type]  # v2's UserCallback list (see above)
        ),
    )


def run_training(
    config: Config, *, parent_run_id: str | None = None, log_prefix: str | None = None,
    tags: dict[str, str] | None = None,
) -> Evaluation | None:
    """Train through Ray, log to MLflow, return the final evaluation (also in the run directory).

    log_prefix starts every progress line of the workers (`avgk demo` runs two trainings at once).
    """
    config = job.start(config, cpus=config.train.num_workers * config.train.cpus_per_worker)
    check_resources(config)
    with job.tracked(config, parent_run_id=parent_run_id, tags=tags) as run:
        try:
            build_trainer(config, mlflow_run_id=run.run_id, tracking_uri=run.uri, log_prefix=log_prefix).fit()
        except Exception as err:
            if safe_fs.is_disk_full(err) or "No space left on device" in str(err):
                raise safe_fs.DiskFullError(storage.display(config.run_dir)) from None
            raise
    metrics_file = storage.join(storage.absolute(config.run_dir), "metrics.json")
    if not storage.exists(metrics_file):
        return None
    return Evaluation(metrics=storage.read_json(metrics_file), per_class={}, thresholds={})
