"""Scoring a split on the training ranks, and the metrics document from those scores.

The reductions (thresholds calibrated on val, test metrics as summed counts, the Bayes oracle on
synthetic data) are avgk.evaluation.passes', driven here over the ranks' scored chunks with states summed by
avgk.runtime.distributed.all_reduce_sum (the identity in one process); `avgk evaluate` drives the same
passes over Ray tasks. Legend: N samples, L classes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from avgk.config import Config
from avgk.evaluation import passes, set_rules
from avgk.evaluation.accounting import account_samples
from avgk.evaluation.metrics import format_k
from avgk.evaluation.passes import Evaluation
from avgk.method.losses import head_scores
from avgk.models.inputs import image_transform, model_input, normalize_in_loader
from avgk.models.networks import autocast
from avgk.runtime import distributed as dist
from avgk.runtime import storage
from avgk.training.parts import Parts

# ---------------------------------------------------------------- scoring and evaluation


@dataclass
class ScoredChunk:
    """One batch of scores with its labels (and true posteriors on synthetic data)."""

    scores_NL: np.ndarray
    labels_N: np.ndarray
    posterior_NL: np.ndarray | None = None
    idx_N: np.ndarray | None = None
    """The samples' indices in their split (set rules gather val numbers by them)."""
    heads_NL: dict[str, np.ndarray] = field(default_factory=dict)
    """Other heads' scores, by head name (the set rules that threshold another head: eval.set_rules[].head)."""


@torch.inference_mode()
def score_batches(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, head: str, device: torch.device, config: Config,
    extra_heads: Iterable[str] = (),
) -> Iterator[ScoredChunk]:
    """Scores of one head for each batch (and of `extra_heads`, from the same forward pass), as float32 numpy
    on the CPU."""
    extra_heads = tuple(extra_heads)
    model.eval()
    for batch in batches:
        images = model_input(batch["image"], device=device, config=config)
        with autocast(config, device):
            logits = model(images)
        scores = head_scores(logits, head).float().cpu().numpy()
        posterior = batch.get("posterior")
        yield ScoredChunk(
            scores_NL=scores,
            labels_N=batch["label"].numpy(),
            posterior_NL=None if posterior is None else np.asarray(posterior, dtype=np.float32),
            idx_N=None if "idx" not in batch else np.asarray(batch["idx"], dtype=np.int64),
            heads_NL={h: head_scores(logits, h).float().cpu().numpy() for h in extra_heads},
        )


def chunk_batches(chunks: list[ScoredChunk]) -> Iterator[passes.Batch]:
    """Scored chunks as the batches avgk.evaluation.passes' specs read."""
    for chunk in chunks:
        batch = {"scores": chunk.scores_NL, "label": chunk.labels_N}
        if chunk.posterior_NL is not None:
            batch["posterior"] = chunk.posterior_NL
        if chunk.idx_N is not None:
            batch["idx"] = chunk.idx_N
        batch.update(chunk.heads_NL)
        yield batch


def local_runner(scored: dict[str, list[ScoredChunk]], *, reduce: passes.Reduce) -> passes.RunPasses:
    """The DDP driver of avgk.evaluation.passes: each pass over this rank's chunks of a split, states summed
    over the ranks with `reduce` (the identity in one process)."""
    return lambda spec, split: passes.run_passes_local(spec, lambda: chunk_batches(scored[split]), reduce=reduce)


def split_loader(parts: Parts, split: str, *, with_posterior: bool) -> Iterable[dict[str, Any]]:
    cfg = parts.config
    from avgk.data.loaders import eval_loader  # torchvision's decoders: not for processes that only score

    loader: Iterable[dict[str, Any]] = eval_loader(
        shards_dir=parts.manifest,
        split=split,
        batch_size=cfg.eval.batch_size,
        rank=dist.rank(),
        world_size=dist.world_size(),
        num_workers=cfg.data.loader_workers,
        transform=image_transform(cfg, train=False),
        num_classes=parts.num_classes,
        with_posterior=with_posterior,
        normalize=normalize_in_loader(parts.device),
    )
    return loader


def score_split(parts: Parts, split: str, *, with_posterior: bool = False, extra_heads: Iterable[str] = ()) -> list[ScoredChunk]:
    """This rank's share of a split, scored (each sample on exactly one rank)."""
    batches = split_loader(parts, split, with_posterior=with_posterior)
    return list(score_batches(parts.eval_model, batches, head=parts.score_head, device=parts.device, config=parts.config,
                              extra_heads=extra_heads))


def validate(parts: Parts) -> dict[str, float]:
    """Val avg-K accuracy for every K in eval.ks, thresholds calibrated on the whole val set."""
    cfg = parts.config
    chunks = score_split(parts, "val")
    ks = cfg.eval.ks if cfg.loss.k in cfg.eval.ks else sorted({*cfg.eval.ks, cfg.loss.k})
    run = local_runner({"val": chunks}, reduce=dist.all_reduce_sum)
    thresholds = passes.calibrate(run, "val", ks=ks)
    metrics = passes.count_metrics(
        run, "val", num_classes=parts.num_classes, ks=ks, thresholds=thresholds,
        train_class_counts=None, freq_bins=cfg.eval.freq_bins,
    ).compute()
    out = {f"val_avg_k_accuracy_k{key}": value for key, value in metrics["avg_k_accuracy"].items()}
    out.update({f"val_macro_avg_k_accuracy_k{key}": v for key, v in metrics["macro_avg_k_accuracy"].items()})
    out["val_avg_k_accuracy"] = metrics["avg_k_accuracy"][format_k(cfg.loss.k)]
    return out


def final_evaluation(parts: Parts) -> Evaluation:
    """Val thresholds and test metrics, with each split's sample count checked against the manifest."""
    cfg = parts.config
    with_posterior = parts.manifest.source == "synthetic"
    extra_heads = [c for c in set_rules.by_column(cfg.eval.set_rules, score_head=parts.score_head) if c != "scores"]
    scored = {split: score_split(parts, split, with_posterior=with_posterior, extra_heads=extra_heads)
              for split in ("val", "test")}
    counts = dist.all_reduce_sum(np.array([sum(len(c.labels_N) for c in scored[s]) for s in scored], dtype=np.int64))
    samples = account_samples(
        read=dict(zip(scored, counts.tolist(), strict=True)),
        expected={s: parts.manifest.split(s).num_samples for s in scored},
        strict=cfg.eval.strict, shards=str(cfg.data.shards),
    )
    # Every rank must take the same branch: posteriors are present on all ranks or none.
    local = int(bool(scored["val"]) and scored["val"][0].posterior_NL is not None)
    has_posterior = bool(dist.all_reduce_sum(np.array([local]))[0])
    evaluation = passes.evaluate(
        local_runner(scored, reduce=dist.all_reduce_sum), ks=cfg.eval.ks, num_classes=parts.num_classes,
        train_class_counts=parts.train_class_counts, freq_bins=cfg.eval.freq_bins,
        score_head=parts.score_head, with_posterior=has_posterior,
        set_rules=cfg.eval.set_rules, num_val_samples=parts.manifest.split("val").num_samples,
    )
    evaluation.metrics["samples"] = samples
    return evaluation


def write_evaluation(evaluation: Evaluation, run_dir: str) -> None:
    """thresholds.json, metrics.json and per_class.parquet into the run directory (rank 0 only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.write_json(storage.join(run_dir, "metrics.json"), evaluation.metrics)
    storage.write_json(
        storage.join(run_dir, "thresholds.json"),
        {"score_head": evaluation.metrics["score_head"], "thresholds": evaluation.metrics["val"]["thresholds"],
         "set_rules": set_rules.rules_to_json(evaluation.set_rules)},
    )
    sink = io.BytesIO()
    pq.write_table(pa.table({k: np.asarray(v) for k, v in evaluation.per_class.items()}), sink)
    storage.write_bytes(storage.join(run_dir, "per_class.parquet"), sink.getvalue())


