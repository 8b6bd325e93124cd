"""One trial of `avgk tune`, in its Tune trial actor: the trial's config, its training, its MLflow child run."""

from __future__ import annotations

import os
from typing import Any

from avgk.config import Config
from avgk.experiments.sweep_config import SweepConfig, config_for
from avgk.records import tracking
from avgk.runtime.console import say
from avgk.training import checkpoints
from pipelines import ray_private


def plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python values (pydantic and YAML want those)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def trial_config(base_tree: dict[str, Any], params: dict[str, Any], *, trials_dir: str, trial_id: str) -> Config:
    values = {key: plain(value) for key, value in params.items()}
    return config_for(base_tree, {**values, "run.storage": trials_dir, "run.name": trial_id})


def _let_train_find_this_cluster() -> None:
    """Give the trial's Train controller (and its placement-group cleaner) this cluster's address.

    A trial stopped by the scheduler is killed with its Train controller; the workers' placement
    group outlives them (its lifetime is the job's) unless Train's PlacementGroupCleaner removes it.
    The cleaner finds the cluster through RAY_ADDRESS, else by scanning the machine, which fails
    ("Found multiple active Ray instances") when another local Ray runs beside ours: the leaked
    group then holds the next trial's CPUs and its workers never start. Train copies the variables
    in its ENV_VARS_TO_PROPAGATE to the controller, whose child actors (the cleaner) inherit them.
    """
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ray_private.propagate_env_var_to_train("RAY_ADDRESS")


def run_trial(
    params: dict[str, Any],
    *,
    base_tree: dict[str, Any],
    trials_dir: str,
    parent_run_id: str | None,
    uri: str | None,
    sweep_name: str,
    in_trial: bool = False,
) -> None:
    """One trial: its training, whose epochs reach Tune, and the trial's MLflow child run.

    The training is a TorchTrainer, or with `in_trial` (trial_in_own_process: one CPU worker does it) engine.fit
    in this trial's own process, which then holds that worker's CPUs too.
    A resumed trial reopens its training's latest checkpoint (the same run directory) and its MLflow
    run (the run directory's mlflow_run_id.txt). A trial stopped by the scheduler is killed with its
    actor, so its `finally` may never run: the sweep driver settles every child's final status afterwards.
    """
    from ray import tune

    from pipelines.train import build_trainer, fit_in_process

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base_tree, params, trials_dir=trials_dir, trial_id=trial_id)
    run_id = None
    if config.tracking.enabled:
        run_id = tracking.start_run(
            config, parent_run_id=parent_run_id, tags={"avgk.sweep": sweep_name, "avgk.trial_id": trial_id}
        )
    if in_trial:
        with tracking.lifecycle(uri, run_id):
            fit_in_process(config, reporter=_TuneReporter(config.run_dir), uri=uri, run_id=run_id, log=say)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    _let_train_find_this_cluster()
    # TuneReportCallback forwards rank 0's per-epoch reports to Tune, so ASHA sees every epoch.
    trainer = build_trainer(config, mlflow_run_id=run_id, tracking_uri=uri, callbacks=[TuneReportCallback()])
    with tracking.lifecycle(uri, run_id):
        trainer.fit()


class _TuneReporter(checkpoints.LocalReporter):
    """A trial's own training: checkpoints in its run directory (where a resumed trial finds them),
    each epoch's metrics to Tune after the checkpoint is safe (the scheduler may stop the trial there)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        from ray import tune

        super().report(metrics, checkpoint_dir)
        tune.report(metrics)


def trial_in_own_process(sweep: SweepConfig, base: Config) -> bool:
    """Whether every trial trains in its own process (pipelines.train.runs_in_one_process): the base config
    allows it and no searched key changes that."""
    from pipelines.train import runs_in_one_process

    return runs_in_one_process(base) and not {"train.num_workers", "train.use_gpu"} & set(sweep.space)
