"""`avgk evaluate`: a trained checkpoint -> val thresholds for every K -> every test metric, on Ray.

The model runs once per split (Ray Data actor pool, scores kept in the object store: by
default only each sample's top-T form, eval.score_rows=top); lambda_K for all of eval.ks
comes from one two-pass streamed selection over the val scores, and the test metrics from
one counting pass; only int64 states reach the driver. When top-T rows cannot prove a result
the job says so and scores both splits again with full rows.
Val is scored first: the set rules (eval.set_rules) are calibrated on a few numbers per val row,
gathered exactly; then test is scored, and its scorers count each row's set for every calibrated
coverage target from the full row they hold, so those metrics are exact however large the sets.
The result has the schema of the training's own final evaluation (avgk.evaluation.passes.evaluate)
and, for the same checkpoint, the same numbers bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from avgk.config import Config
from avgk.evaluation import passes, set_rules, top_scores
from avgk.evaluation.accounting import account_samples, shortfall_warning
from avgk.evaluation.passes import Evaluation
from avgk.evaluation.set_rules import CalibratedRule
from avgk.method.losses import score_head_for
from avgk.records import tracking
from avgk.runtime import storage
from avgk.runtime.console import say
from avgk.training import evaluation
from pipelines import job
from pipelines.reduction import ray_runner
from pipelines.scoring import SetColumns, quiet_ray_data, score_dataset, top_t_for
from pipelines.scoring_inputs import load_job_inputs

if TYPE_CHECKING:
    import ray.data


def log_to_run(
    config: Config, run_dir: str, result: Evaluation, *, checkpoint: str, log: Callable[[str], None]
) -> None:
    """Test metrics and result files into the run's MLflow run (RUN_DIR/mlflow_run_id.txt), unless tracking is off."""
    if not config.tracking.enabled:
        return
    id_file = storage.join(run_dir, tracking.RUN_ID_FILE)
    if not storage.exists(id_file):
        log(f"no {tracking.RUN_ID_FILE} in {run_dir}: the training was not tracked, nothing logged to MLflow")
        return
    run_id = storage.read_bytes(id_file).decode().strip()
    parent, _, name = run_dir.rstrip("/").rpartition("/")
    # The default store is sqlite:///<run.storage>/mlflow.db: the run directory's parent.
    located = config.model_copy(update={"run": config.run.model_copy(update={"storage": parent, "name": name})})
    uri = tracking.tracking_uri(located)
    tracking.log_evaluation(uri, run_id, metrics=result.metrics, run_dir=run_dir)
    tracking.set_tags(uri, run_id, {"avgk.evaluated_checkpoint": checkpoint})


def run_evaluate(
    config: Config,
    *,
    run: str | None = None,
    checkpoint: str | None = None,
    num_actors: int | None = None,
    log: Callable[[str], None] = say,
) -> Evaluation:
    """Scores val and test with a run's checkpoint, writes thresholds.json, metrics.json, per_class.parquet.

    `config` gives the data location, eval.ks, eval.freq_bins, the device (train.use_gpu)
    and tracking; the model, its score head, transform, precision and batching come from
    the checkpoint's own config, so the scores are those of the training's evaluation.
    """
    config, run_dir, scoring, manifest = load_job_inputs(config, run=run, checkpoint=checkpoint)
    head = score_head_for(scoring.config.loss)
    rules = config.eval.set_rules
    set_rules.check_heads(rules, heads=scoring.heads, loss=scoring.config.loss.name)  # the checkpoint's, before Ray
    config = job.start(config, cpus=0, resume=None, data=False)  # the inputs were checked above
    quiet_ray_data()
    with_posterior = manifest.source == "synthetic"
    log(f"evaluating {scoring.uri} ({head} head) on {config.data.shards}")
    note = set_rules.head_note(rules, score_head=head)
    if note:
        log(note)
    groups = set_rules.by_column(rules, score_head=head) | ({"posterior": list(rules)} if with_posterior else {})
    calibration = SetColumns.calibrating(groups) if rules else None
    samples: dict[str, dict[str, int]] = {}

    def score(split: str, top_t: int | None, set_columns: SetColumns | None) -> ray.data.Dataset:
        start = time.perf_counter()
        scored: ray.data.Dataset = score_dataset(
            scoring, manifest=manifest, split=split, head=head, with_posterior=with_posterior,
            use_gpu=config.train.use_gpu, num_actors=num_actors or config.eval.num_actors,
            gpu_wait_seconds=config.eval.gpu_wait_seconds, top_t=top_t, set_columns=set_columns,
        ).materialize()
        rows = "full rows" if top_t is None else f"top-{top_t} rows"
        log(f"scored {split}: {scored.count()} samples in {time.perf_counter() - start:.1f} s ({rows})")
        return scored

    def evaluate(top_t: int | None) -> Evaluation:
        """val scored, its thresholds and set rules calibrated, then test scored with each row's sets."""
        splits = {"val": score("val", top_t, calibration)}

        def score_test(calibrated: dict[str, list[CalibratedRule]]) -> None:
            splits["test"] = score("test", top_t, SetColumns.counting(calibrated) if calibrated else None)
            samples.update(account_samples(
                read={split: splits[split].count() for split in ("val", "test")},
                expected={split: manifest.split(split).num_samples for split in ("val", "test")},
                strict=config.eval.strict, shards=config.data.shards,
            ))

        try:
            return passes.evaluate(
                ray_runner(splits, log=log), ks=config.eval.ks, num_classes=manifest.num_classes,
                train_class_counts=np.asarray(manifest.split("train").class_counts, dtype=np.int64),
                freq_bins=config.eval.freq_bins, score_head=head, with_posterior=with_posterior,
                top=top_t is not None, set_rules=rules, num_val_samples=manifest.split("val").num_samples,
                on_calibrated=score_test,
            )
        finally:
            splits.clear()  # these blocks leave the object store before any others arrive

    top_t = top_t_for(config, max_k=max(config.eval.ks))
    start = time.perf_counter()
    if top_t is None:
        result = evaluate(None)
    else:
        result = top_scores.exact_or_full(lambda: evaluate(top_t), lambda: evaluate(None), log=log, what="evaluate")
    result.metrics["samples"] = samples
    log(f"scored, calibrated and counted in {time.perf_counter() - start:.1f} s")
    warning = shortfall_warning(samples, shards=config.data.shards)
    if warning:
        log(warning)
    evaluation.write_evaluation(result, run_dir)
    log_to_run(config, run_dir, result, checkpoint=scoring.uri, log=log)
    return result
