"""The start every Ray verb shares: absolute paths, the driver's checks, the data, the cluster, and
the MLflow run the job records itself under.

    config = job.start(config, cpus=...)                 # before any work
    with job.tracked(config, tags={...}) as run:         # run.uri, run.run_id (None: tracking off)
        ...                                              # ended FINISHED, FAILED or KILLED

`start` joins the cluster in RAY_ADDRESS or starts a local one, unless this process has joined one
already (a caller that runs several verbs in one cluster); `tracked` opens its run as a child of
`parent_run_id` when one is given, so a caller can hang several jobs under one parent run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from avgk.config import Config, ConfigError
from avgk.data.prepare import ensure_shards
from avgk.evaluation import set_rules
from avgk.records import tracking
from avgk.records.runs import with_absolute_paths
from avgk.runtime import locks, safe_fs
from avgk.runtime.console import say
from avgk.training import preflight
from pipelines import ray_env


def start(config: Config, *, cpus: float, resume: bool | None = True, data: bool = True, join: bool = True) -> Config:
    """The config with absolute paths, checked, its data ready and the cluster joined.

    `cpus`: the logical CPUs the job needs at once (a local cluster gets at least that many).
    `resume`: True checks that a run directory left by an earlier run may be resumed (run.resume);
    False skips that check (a sweep's trials resume through Tune); None runs no driver check (the
    caller's steps run them each). `data`: synthetic shards are generated on first use and the
    config is checked against the manifest (avgk.data.prepare.ensure_shards). `join`: False leaves
    the cluster to the caller's join_cluster, after checks of its own.
    """
    config = with_absolute_paths(config)
    use_retry_budget(config)
    rules = config.eval.set_rules
    if resume is not None and (set_rules.needs_mass(rules) or any(rule.head for rule in rules)):
        # a training's set rules against its loss's heads (a job on a checkpoint checks the checkpoint's)
        from avgk.method.losses import loss_class, score_head_for  # torch: only for the runs that ask for these

        set_rules.check_heads(rules, heads=loss_class(config.loss.name).heads, loss=config.loss.name)
        note = set_rules.head_note(rules, score_head=score_head_for(config.loss))
        if note:
            say(note)
    if resume:
        claim_run_dir(config)
    if resume is not None:
        preflight.check_before_start(config, resume=resume)
    if data:
        ensure_shards(config)
    if join:
        join_cluster(cpus=cpus)
    return config


def use_retry_budget(config: Config) -> None:
    """run.object_store_retry_s for this process and, through the environment, the Ray workers it starts."""
    os.environ[safe_fs.BUDGET_ENV] = f"{config.run.object_store_retry_s:g}"


def run_dir_lock(config: Config) -> str:
    return f"run directory {config.run_dir}"


def claim_run_dir(config: Config) -> None:
    """The run directory is this process's until it ends: a second command training the same run on this
    machine stops in one line before it touches anything (avgk.runtime.locks)."""
    holder = locks.claim(run_dir_lock(config))
    if holder:
        raise ConfigError(f"run error: run directory {config.run_dir} is in use by another command ({holder}): "
                          "wait for it to end, or choose another run.name")


def join_cluster(*, cpus: float = 0.0) -> None:
    """RAY_ADDRESS's cluster, else a local one of at least `cpus` logical CPUs; nothing if already joined."""
    ray_env.connect(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)))


@dataclass
class TrackedRun:
    uri: str | None
    run_id: str | None
    outcome: tracking.Outcome
    """Set `outcome.status` to end the run with another status than FINISHED (e.g. FAILED cells)."""


@contextlib.contextmanager
def tracked(
    config: Config, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[TrackedRun]:
    """The MLflow run of `config.run_dir` (reopened on resume), ended with the status the block earned."""
    uri = run_id = None
    if config.tracking.enabled:
        uri = tracking.tracking_uri(config)
        run_id = tracking.start_run(config, parent_run_id=parent_run_id, tags=tags)
    try:
        with tracking.lifecycle(uri, run_id) as outcome:
            yield TrackedRun(uri=uri, run_id=run_id, outcome=outcome)
    finally:
        locks.release(run_dir_lock(config))
