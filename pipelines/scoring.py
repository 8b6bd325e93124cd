"""Ray Data batch inference over a split's shards: how many scorers, and what each row holds.

Legend: N samples, L classes, B model batch.

Read tasks decode the shards into model batches, scorers run the model, and the output
holds one row per sample: idx (int64), label (int64), scores (float32 L-vector) and, on synthetic
data, posterior (float32 L-vector). With `top_t` (the jobs' default, eval.score_rows=top) the actor
keeps only each row's top-T form instead of the L-vectors (avgk.evaluation.top_scores: the T
largest scores, the largest one not kept, the true label's score and rank), a few percent of the
bytes at Pl@ntNet or PlantCLEF sizes; the reductions (pipelines.reduction) then prove every result
exact or raise NotExact, and the jobs score again with full rows (`exact_or_full`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import ray
import ray.data
import torch

from avgk.config import Config
from avgk.config.evaluation import SetRuleConfig
from avgk.config.model import scoreable_heads
from avgk.data.manifest import Manifest
from avgk.evaluation import set_rules, top_scores
from avgk.evaluation.set_rules import CalibratedRule
from avgk.models.inputs import image_transform
from avgk.training import checkpoints, evaluation
from pipelines.scoring_inputs import ScoringModel


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """Resources of the read tasks and of the scoring actor pool (min_actors..num_actors actors)."""

    num_actors: int
    min_actors: int
    actor_cpus: float
    actor_gpus: float
    read_cpus: float


def wait_for_gpus(*, count: int, timeout_s: float, poll_s: float = 5.0, log: Callable[[str], None] = print) -> int:
    """GPUs in the cluster, after asking the autoscaler for `count` and waiting up to timeout_s.

    A cluster whose GPU workers scaled down to zero after training has no GPU when a scoring job
    starts; request_resources makes the autoscaler bring them back (a fixed cluster ignores it).
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus >= 1 or timeout_s <= 0:
        return gpus
    from ray.autoscaler.sdk import request_resources

    log(f"no GPU in the Ray cluster yet: asked the autoscaler for {count}, waiting up to {timeout_s:.0f} s")
    request_resources(bundles=[{"GPU": 1}] * count)
    deadline = time.monotonic() + timeout_s
    try:
        while gpus < 1 and time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            gpus = int(ray.cluster_resources().get("GPU", 0))
    finally:
        request_resources(bundles=[])  # the request would otherwise keep the GPUs up after the job
    return gpus


def plan_scoring(*, use_gpu: bool, num_actors: int | None = None, actor_cpus: float | None = None,
                 gpu_wait_seconds: float = 0.0) -> ScoringPlan:
    """Sizes the actor pool so that read tasks always find a CPU.

    `num_actors` scorers: on GPU an actor pool (one actor per GPU by default), on CPU that many
    scoring tasks at once (one per CPU by default; see ScoringActor). Actors hold their CPUs for
    the whole job; if they held every CPU, the read tasks would wait forever and Ray Data would
    hang without an error. So the scorers reserve at most half of the cluster's CPUs, and a read
    task asks for at most one CPU of the other half. On CPU each scorer reserves half a CPU (and
    runs one torch thread: cores are shared with the read tasks, not reserved); on GPU each actor
    takes one GPU and up to one CPU. A read task's request differs from a scorer's, which also
    keeps Ray Data from fusing decoding into the scorers (decoding belongs on CPUs beside the
    GPUs, not in front of them).

    A GPU pool sized by default starts with one actor and grows up to its size while inputs wait
    (Ray Data's autoscaling actor pool): each actor imports torch and loads the model, which a split
    of a few blocks never repays; `num_actors` given fixes the size.
    """
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if use_gpu:
        gpus = wait_for_gpus(count=num_actors or 1, timeout_s=gpu_wait_seconds)
        if gpus < 1:
            raise ValueError(
                f"train.use_gpu=true but the Ray cluster has no GPU (waited eval.gpu_wait_seconds={gpu_wait_seconds:g} s "
                "for the autoscaler)"
            )
        size = num_actors or gpus
        default_cpus, actor_gpus = 1.0, 1.0
    else:
        size = num_actors or max(1, int(cpus))
        default_cpus, actor_gpus = 0.5, 0.0
    actor_cpus = actor_cpus if actor_cpus is not None else min(default_cpus, cpus / 2 / size)
    if size * actor_cpus >= cpus:
        raise ValueError(
            f"{size} scoring actors x {actor_cpus:g} CPUs would hold all {cpus:g} CPUs of the cluster "
            "and starve the read tasks"
        )
    read_cpus = min(1.0, cpus - size * actor_cpus)
    return ScoringPlan(num_actors=size, min_actors=num_actors or 1, actor_cpus=actor_cpus, actor_gpus=actor_gpus,
                       read_cpus=read_cpus)


def num_eval_streams(config: Config) -> int:
    """Streams of the training's final evaluation: one per (rank, loader worker)."""
    return config.train.num_workers * max(1, config.data.loader_workers)


def _read_stream(
    batch: dict[str, np.ndarray],
    *,
    manifest: Manifest,
    split: str,
    num_streams: int,
    batch_size: int,
    config_tree: dict[str, Any],
    num_classes: int,
    with_posterior: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read stage: each input row names a stream; yields one row per model batch of it.

    Stream s is exactly the sample stream of rank s % W, loader worker s // W of the training's
    evaluation (avgk.data.loaders.eval_loader with rank s of W x workers), batched the same
    way. The scores of a batch depend on its composition in the last float bits (CPU conv
    kernels differ with the batch size), so this is what makes the job's scores, thresholds
    and metrics bit-identical to the in-training evaluation, whatever the actor count.
    """
    from avgk.data.loaders import eval_loader  # torchvision's decoders: read tasks only, not the scoring actors

    transform = image_transform(Config.model_validate(config_tree), train=False)
    for stream in batch["stream"]:
        loader = eval_loader(
            shards_dir=manifest, split=split, batch_size=batch_size, rank=int(stream), world_size=num_streams,
            num_workers=0, transform=transform, num_classes=num_classes, with_posterior=with_posterior,
        )
        for model_batch in loader:
            row = {
                "image": model_batch["image"].numpy()[None],
                "label": model_batch["label"].numpy()[None],
                "idx": model_batch["idx"].numpy()[None],
            }
            if with_posterior:
                row["posterior"] = model_batch["posterior"].numpy()[None]
            yield row


@dataclasses.dataclass(frozen=True)
class SetColumns:
    """What a scorer adds per row for the set rules (avgk.evaluation.set_rules), from the full rows it holds:
    val's calibration columns, or test's set size and coverage for each calibrated target. Columns are named
    as the passes read them: "scores" (the score head), another head's name ("softmax"), or "posterior"."""

    calibration: tuple[tuple[str, bool], ...] = ()
    """(column, with mass): the columns whose calibration columns val rows get, and whether their rules (aps,
    raps) need the mass and rank of the true label too (a sort of each row: only where it is needed)."""
    rules: tuple[tuple[str, tuple[CalibratedRule, ...]], ...] = ()
    """(column, its calibrated targets): the targets whose set size and coverage test rows get."""

    @classmethod
    def calibrating(cls, groups: Mapping[str, Sequence[SetRuleConfig]]) -> SetColumns:
        """For the rules of each column (avgk.evaluation.set_rules.by_column, and "posterior": every rule)."""
        return cls(calibration=tuple((column, set_rules.needs_mass(rules)) for column, rules in groups.items()))

    @classmethod
    def counting(cls, calibrated: Mapping[str, Sequence[CalibratedRule]]) -> SetColumns:
        """For what avgk.evaluation.passes.evaluate calibrated, by column."""
        return cls(rules=tuple((column, tuple(rules)) for column, rules in calibrated.items() if rules))

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads besides the score head whose rows the scorer computes for these columns."""
        columns = [*(column for column, _ in self.calibration), *(column for column, _ in self.rules)]
        return tuple(dict.fromkeys(c for c in columns if c not in ("scores", "posterior")))

    def of(self, scores_NL: np.ndarray, *, labels_N: np.ndarray, column: str = "scores") -> dict[str, np.ndarray]:
        """The set columns of a batch's full rows of `column`."""
        columns = {}
        for calibrated_column, with_mass in self.calibration:
            if calibrated_column == column:
                columns.update(set_rules.calibration_columns(scores_NL, labels_N=labels_N, with_mass=with_mass,
                                                             column=column))
        for rules_column, rules in self.rules:
            if rules_column == column:
                columns.update(set_rules.rule_columns(scores_NL, labels_N=labels_N, rules=rules, column=column))
        return columns


class ScoringActor:
    """Runs the model on model batches: the same head, transform output and precision as evaluation.score_batches.

    On GPU, one Ray actor per GPU holds it. On CPU, Ray tasks do (_score_on_cpu): Ray reuses a
    job's task workers, which keep the last model they loaded, so the model loads once per worker
    process and a worker that already imported torch scores the next split or job at once; an
    actor's process, with its imports, is new for each job.
    """

    def __init__(
        self, *, model_box: tuple[Any], head: str, use_gpu: bool, num_threads: int, top_t: int | None = None,
        with_classes: bool = False, set_columns: SetColumns | None = None,
    ) -> None:
        # The weights travel through the object store (no shared filesystem needed); the box
        # keeps Ray from resolving the reference before this actor asks for it.
        scoring: ScoringModel = ray.get(model_box[0])
        torch.set_num_threads(num_threads)
        self.config = scoring.config
        self.device = torch.device("cuda") if use_gpu else torch.device("cpu")
        model_config = scoring.config.model
        model = checkpoints.build_trained_model(
            scoring.config, num_classes=scoring.num_classes, model_state=scoring.model_state
        ).to(self.device)
        if model_config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if model_config.compile:
            model = cast(torch.nn.Module, torch.compile(model))  # an OptimizedModule
        self.model = model
        self.head = head
        self.top_t = top_t
        self.with_classes = with_classes
        self.set_columns = set_columns

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs: dict[str, list[np.ndarray]] = {}
        for i in range(len(rows["idx"])):
            batch: dict[str, Any] = {"image": torch.from_numpy(np.asarray(rows["image"][i])),
                                     "label": torch.from_numpy(np.asarray(rows["label"][i]))}
            if "posterior" in rows:
                batch["posterior"] = np.asarray(rows["posterior"][i])
            heads = () if self.set_columns is None else self.set_columns.heads
            chunk = next(evaluation.score_batches(self.model, [batch], head=self.head, device=self.device,
                                                  config=self.config, extra_heads=heads))
            columns = {"idx": np.asarray(rows["idx"][i], dtype=np.int64), "label": chunk.labels_N.astype(np.int64)}
            columns.update(score_columns(chunk.scores_NL, labels_N=columns["label"], column="scores",
                                         top_t=self.top_t, with_classes=self.with_classes))
            if self.set_columns is not None:
                columns.update(self.set_columns.of(chunk.scores_NL, labels_N=columns["label"]))
                for head in heads:  # another head's rows give their set columns only, never kept whole
                    columns.update(self.set_columns.of(chunk.heads_NL[head], labels_N=columns["label"], column=head))
            if "posterior" in rows:
                assert chunk.posterior_NL is not None  # the batch had one
                columns.update(score_columns(chunk.posterior_NL, labels_N=columns["label"], column="posterior",
                                             top_t=self.top_t, with_classes=False))
                if self.set_columns is not None:
                    columns.update(self.set_columns.of(chunk.posterior_NL, labels_N=columns["label"], column="posterior"))
            for name, values in columns.items():
                outputs.setdefault(name, []).append(values)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}


_CPU_SCORER: tuple[tuple[Any, ...], ScoringActor] | None = None
"""This worker process's scorer: the model the last CPU scoring task loaded, and what it was built from."""


def _score_on_cpu(rows: dict[str, np.ndarray], **scorer: Any) -> dict[str, np.ndarray]:
    """A CPU scoring task: the rows through this worker's ScoringActor, built on the first task of a job."""
    global _CPU_SCORER
    key = (scorer["model_box"][0].hex(), *(scorer[name] for name in sorted(scorer) if name != "model_box"))
    if _CPU_SCORER is None or _CPU_SCORER[0] != key:
        _CPU_SCORER = None  # the last job's model goes before this one's loads
        _CPU_SCORER = (key, ScoringActor(**scorer))
    return _CPU_SCORER[1](rows)


def score_columns(
    scores_NL: np.ndarray, *, labels_N: np.ndarray, column: str, top_t: int | None, with_classes: bool
) -> dict[str, np.ndarray]:
    """A batch's `column` as a scoring job keeps it: the N x L scores, or their top-T form (top_t given)."""
    if top_t is None:
        return {column: scores_NL}
    return top_scores.top_rows(scores_NL=scores_NL, labels_N=labels_N, top_t=top_t, column=column,
                               with_classes=with_classes)


def top_t_for(config: Config, *, max_k: float) -> int | None:
    """Scores a job keeps per row: None (all, eval.score_rows=full), eval.top_t, or default_top_t(max_k)."""
    if config.eval.score_rows == "full":
        return None
    return config.eval.top_t or top_scores.default_top_t(max_k=max_k)


def score_dataset(
    scoring: ScoringModel,
    *,
    manifest: Manifest,
    split: str,
    head: str,
    with_posterior: bool,
    use_gpu: bool = False,
    num_actors: int | None = None,
    actor_cpus: float | None = None,
    gpu_wait_seconds: float = 0.0,
    top_t: int | None = None,
    with_classes: bool = False,
    actors: bool | None = None,
    set_columns: SetColumns | None = None,
) -> ray.data.Dataset:
    """A lazy Dataset of the split's scores: rows idx, label, scores (float32 L) [, posterior].

    `actors`: the model in an actor pool (the default on GPU) or in tasks on reused workers (the
    default on CPU; see ScoringActor); either gives the same rows.

    `manifest` is the data set's, read once by the caller; it travels to the read tasks with
    their arguments, so no task reads manifest.json again.

    Model batches follow the training's evaluation (see _read_stream); `head` is
    "multilabel" or "softmax". Call .materialize() to run the model once and keep the
    scores in the object store for several passes. With `top_t`, the rows hold the top-T
    columns of scores [and posterior] instead (avgk.evaluation.top_scores.top_rows; the scores' class
    ids too with `with_classes`, which global pseudo-labels need). `set_columns` adds the set rules' columns.
    """
    if head not in scoreable_heads(scoring.heads):
        raise ValueError(f"the checkpoint's model has heads {list(scoring.heads)}, not {head!r}")
    config = scoring.config
    num_streams = num_eval_streams(config)
    plan = plan_scoring(use_gpu=use_gpu, num_actors=num_actors, actor_cpus=actor_cpus, gpu_wait_seconds=gpu_wait_seconds)
    streams = ray.data.from_items([{"stream": s} for s in range(num_streams)], override_num_blocks=num_streams)
    batches = streams.map_batches(
        _read_stream,  # type: ignore[arg-type]  # Ray types a UDF over every batch format; batch_format="numpy" passes dicts
        batch_size=1,
        num_cpus=plan.read_cpus,
        fn_kwargs=dict(
            manifest=manifest, split=split, num_streams=num_streams,
            batch_size=config.eval.batch_size, config_tree=config.to_dict(),
            num_classes=scoring.num_classes, with_posterior=with_posterior,
        ),
    )
    scorer = dict(model_box=(ray.put(scoring),), head=head, use_gpu=use_gpu,
                  num_threads=max(1, int(plan.actor_cpus)), top_t=top_t, with_classes=with_classes,
                  set_columns=set_columns)
    if not (use_gpu if actors is None else actors):
        return batches.map_batches(
            _score_on_cpu,  # type: ignore[arg-type]  # as _read_stream's
            batch_size=1,  # one row is one model batch
            num_cpus=plan.actor_cpus,
            concurrency=plan.num_actors,
            fn_kwargs=scorer,
        )
    return batches.map_batches(
        ScoringActor,
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.num_actors,
                                           initial_size=plan.min_actors),
        batch_size=1,
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs=scorer,
    )


def quiet_ray_data() -> None:
    """Ray Data logs every operator start and a progress table; a person running a job wants our lines."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
