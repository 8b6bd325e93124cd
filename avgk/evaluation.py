"""Scoring a split and turning scores into the metrics document: thresholds calibrated on val
(exact, two streamed passes), test metrics as summed counts, the Bayes oracle on synthetic data.

Every function takes a `reduce` (a sum over ranks: avgk.distributed.all_reduce_sum under DDP,
the identity in one process), so the same code serves one process and many.
Legend: N samples, L classes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from avgk import distributed as dist
from avgk import storage
from avgk.config import Config
from avgk.data.loaders import eval_loader
from avgk.accounting import account_samples
from avgk.losses import head_scores
from avgk.metrics import SetMetrics, format_k
from avgk.thresholds import StreamingThresholds
from avgk.inputs import image_transform, model_input, normalize_in_loader
from avgk.models import autocast

if TYPE_CHECKING:
    from avgk.engine import Parts

# ---------------------------------------------------------------- scoring and evaluation


@dataclass
class ScoredChunk:
    """One batch of scores with its labels (and true posteriors on synthetic data)."""

    scores_NL: np.ndarray
    labels_N: np.ndarray
    posterior_NL: np.ndarray | None = None


@torch.inference_mode()
def score_batches(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, head: str, device: torch.device, config: Config
) -> Iterator[ScoredChunk]:
    """Scores of one head for each batch, as float32 numpy on the CPU."""
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
        )


Reduce = Callable[[np.ndarray], np.ndarray]


def calibrate(chunks: list[ScoredChunk], *, ks: list[float], reduce: Reduce, posterior: bool = False) -> dict[float, float]:
    """Exact lambda_K for every K over the union of all ranks' chunks (two streamed passes)."""
    calibrator = StreamingThresholds(ks=ks)
    for pass_number in (1, 2):
        for chunk in chunks:
            calibrator.update(chunk.posterior_NL if posterior else chunk.scores_NL)
        calibrator.load_state(reduce(calibrator.state()))
        if pass_number == 1:
            calibrator.next_pass()
    return calibrator.thresholds()


def accumulate(
    chunks: list[ScoredChunk],
    *,
    num_classes: int,
    ks: list[float],
    thresholds: dict[float, float],
    train_class_counts: np.ndarray | None,
    freq_bins: tuple[int, int],
    reduce: Reduce,
    posterior: bool = False,
) -> SetMetrics:
    """SetMetrics over the union of all ranks' chunks: counts summed, nothing averaged."""
    metrics = SetMetrics(
        num_classes=num_classes, ks=ks, thresholds=thresholds, train_class_counts=train_class_counts, freq_bins=freq_bins
    )
    for chunk in chunks:
        metrics.update(scores_NL=chunk.posterior_NL if posterior else chunk.scores_NL, labels_N=chunk.labels_N)
    metrics.load_state({key: reduce(value) for key, value in sorted(metrics.state().items())})
    return metrics


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # the metrics.json document
    per_class: dict[str, np.ndarray]
    thresholds: dict[float, float]


def metrics_document(
    *, ks: list[float], score_head: str, thresholds: dict[float, float], test: SetMetrics, oracle: dict[str, Any] | None
) -> dict[str, Any]:
    """The metrics.json document; `oracle` is the compute() of SetMetrics over the true posteriors."""
    test_doc = test.compute()
    if oracle is not None:
        test_doc["oracle_avg_k_accuracy"] = oracle["avg_k_accuracy"]
        test_doc["oracle_macro_avg_k_accuracy"] = oracle["macro_avg_k_accuracy"]
        test_doc["gap_to_oracle"] = {
            key: oracle["avg_k_accuracy"][key] - test_doc["avg_k_accuracy"][key] for key in test_doc["avg_k_accuracy"]
        }
    return {
        "ks": ks,
        "score_head": score_head,
        "val": {"thresholds": {format_k(k): v for k, v in thresholds.items()}},
        "test": test_doc,
    }


def evaluate_scores(
    *,
    val: list[ScoredChunk],
    test: list[ScoredChunk],
    ks: list[float],
    num_classes: int,
    train_class_counts: np.ndarray,
    freq_bins: tuple[int, int],
    score_head: str,
    reduce: Reduce,
) -> Evaluation:
    """Thresholds calibrated on val only, then every test metric; the Bayes oracle when posteriors are known."""
    thresholds = calibrate(val, ks=ks, reduce=reduce)
    test_metrics = accumulate(
        test, num_classes=num_classes, ks=ks, thresholds=thresholds,
        train_class_counts=train_class_counts, freq_bins=freq_bins, reduce=reduce,
    )
    # Every rank must take the same branch: posteriors are present on all ranks or none.
    has_posterior = bool(reduce(np.array([int(bool(val) and val[0].posterior_NL is not None)]))[0])
    oracle = None
    if has_posterior:
        oracle_thresholds = calibrate(val, ks=ks, reduce=reduce, posterior=True)
        oracle = accumulate(
            test, num_classes=num_classes, ks=ks, thresholds=oracle_thresholds,
            train_class_counts=None, freq_bins=freq_bins, reduce=reduce, posterior=True,
        ).compute()
    document = metrics_document(ks=ks, score_head=score_head, thresholds=thresholds, test=test_metrics, oracle=oracle)
    return Evaluation(metrics=document, per_class=test_metrics.per_class(), thresholds=thresholds)


def split_loader(parts: Parts, split: str, *, with_posterior: bool) -> Iterable[dict[str, Any]]:
    cfg = parts.config
    return eval_loader(
        shards_dir=cfg.data.shards,
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


def score_split(parts: Parts, split: str, *, with_posterior: bool = False) -> list[ScoredChunk]:
    """This rank's share of a split, scored (each sample on exactly one rank)."""
    batches = split_loader(parts, split, with_posterior=with_posterior)
    return list(score_batches(parts.eval_model, batches, head=parts.score_head, device=parts.device, config=parts.config))


def validate(parts: Parts) -> dict[str, float]:
    """Val avg-K accuracy for every K in eval.ks, thresholds calibrated on the whole val set."""
    cfg = parts.config
    chunks = score_split(parts, "val")
    ks = cfg.eval.ks if cfg.loss.k in cfg.eval.ks else sorted({*cfg.eval.ks, cfg.loss.k})
    thresholds = calibrate(chunks, ks=ks, reduce=dist.all_reduce_sum)
    metrics = accumulate(
        chunks, num_classes=parts.num_classes, ks=ks, thresholds=thresholds,
        train_class_counts=None, freq_bins=cfg.eval.freq_bins, reduce=dist.all_reduce_sum,
    ).compute()
    out = {f"val_avg_k_accuracy_k{key}": value for key, value in metrics["avg_k_accuracy"].items()}
    out.update({f"val_macro_avg_k_accuracy_k{key}": v for key, v in metrics["macro_avg_k_accuracy"].items()})
    out["val_avg_k_accuracy"] = metrics["avg_k_accuracy"][format_k(cfg.loss.k)]
    return out


def final_evaluation(parts: Parts) -> Evaluation:
    """Val thresholds and test metrics, with each split's sample count checked against the manifest."""
    cfg = parts.config
    with_posterior = parts.manifest.source == "synthetic"
    scored = {split: score_split(parts, split, with_posterior=with_posterior) for split in ("val", "test")}
    counts = dist.all_reduce_sum(np.array([sum(len(c.labels_N) for c in scored[s]) for s in scored], dtype=np.int64))
    samples = account_samples(
        read=dict(zip(scored, counts.tolist())), expected={s: parts.manifest.split(s).num_samples for s in scored},
        strict=cfg.eval.strict, shards=str(cfg.data.shards),
    )
    evaluation = evaluate_scores(
        val=scored["val"], test=scored["test"], ks=cfg.eval.ks, num_classes=parts.num_classes,
        train_class_counts=parts.train_class_counts, freq_bins=cfg.eval.freq_bins,
        score_head=parts.score_head, reduce=dist.all_reduce_sum,
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
        {"score_head": evaluation.metrics["score_head"], "thresholds": evaluation.metrics["val"]["thresholds"]},
    )
    sink = io.BytesIO()
    pq.write_table(pa.table({k: np.asarray(v) for k, v in evaluation.per_class.items()}), sink)
    storage.write_bytes(storage.join(run_dir, "per_class.parquet"), sink.getvalue())


