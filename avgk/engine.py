"""Training and evaluation loops in plain torch, rank-agnostic: Ray Train (or nothing) wraps them.

Legend: B batch, L classes, N samples. Everything distributed goes through avgk.distributed
(sums of counts and histograms); the loops never ask which rank they are on except to print
and write files from rank 0.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from avgk import distributed as dist
from avgk import storage
from avgk.config import Config, save_config
from avgk.data.shards import eval_loader, num_train_batches, read_manifest, train_loader
from avgk.data.transforms import build_transform, normalize_batch
from avgk.accounting import account_samples, shortfall_warning
from avgk.losses import Loss, build_loss, head_scores, score_head_for
from avgk.metrics import SetMetrics, format_k
from avgk.models import build_model
from avgk.runs import CHECKPOINT_FILE
from avgk.thresholds import StreamingThresholds


# ---------------------------------------------------------------- reporting hooks


class Reporter(Protocol):
    """What wraps the loop: where metrics and checkpoints go, and where a resumed run starts."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint_state(self) -> dict | None:
        """The newest reported checkpoint's state (engine.load_checkpoint_file), None on a fresh run."""
        ...


class LocalReporter:
    """Single-process runs: the latest checkpoint lives in <run_dir>/checkpoints/latest."""

    def __init__(self, run_dir: str):
        self.dir = Path(storage.absolute(run_dir)) / "checkpoints" / "latest"
        self.history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        staging = self.dir.with_name("latest.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        shutil.rmtree(self.dir, ignore_errors=True)
        staging.rename(self.dir)

    def latest_checkpoint_dir(self) -> str | None:
        return str(self.dir) if (self.dir / CHECKPOINT_FILE).is_file() else None

    def latest_checkpoint_state(self) -> dict | None:
        latest = self.latest_checkpoint_dir()
        return load_checkpoint_file(Path(latest) / CHECKPOINT_FILE) if latest else None


# ---------------------------------------------------------------- building blocks


@dataclass
class Parts:
    """Everything a run builds from its config and the shard manifest."""

    config: Config
    manifest: Any
    num_classes: int
    model: nn.Module
    loss: Loss
    score_head: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    device: torch.device
    train_class_counts: np.ndarray


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(*, step: int, steps_per_epoch: int, config: Config) -> float:
    """Multiplier of train.lr at a global step: linear warm-up, then constant, step decay or cosine."""
    t = config.train
    warmup_steps = int(t.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "step":
        epoch = step // steps_per_epoch
        return t.gamma ** sum(epoch >= m for m in t.milestones)
    total = t.epochs * steps_per_epoch - warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD or AdamW over one group per (backbone | head) x (decayed | not), each at train.lr times
    its train.lr_scale multiplier; the schedule then scales every group alike."""
    t = config.train
    groups = []
    for name, params in unwrap(model).parameter_groups().items():
        lr = t.lr * (config.multilabel_lr_scale if name == "multilabel" else getattr(t.lr_scale, name))
        # No weight decay on norms and biases (the usual recipe; decaying BN scales hurts small nets).
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "weight_decay": t.weight_decay, "lr": lr, "name": f"{name}.decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": f"{name}.no_decay"},
        ]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def build_parts(
    config: Config,
    *,
    device: torch.device,
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> Parts:
    manifest = read_manifest(config.data.shards)
    num_classes = manifest.num_classes
    config.validate_num_classes(num_classes)
    train_info = manifest.splits["train"]
    seed_everything(config.train.seed)  # identical initial weights on every rank
    loss_config = config.loss
    if loss_config.role_table_device == "memmap" and dist.world_size() > 1:
        # Each rank keeps its own copy of the table; they must not share one file.
        loss_config = loss_config.model_copy(update={"role_table_path": f"{loss_config.role_table_path}.rank{dist.rank()}"})
    loss = build_loss(
        loss_config, num_classes=num_classes, num_train=train_info.num_samples, class_counts=train_info.class_counts
    )
    score_head = score_head_for(config.loss)
    detached = ("multilabel",) if config.loss.ml_stop_gradient else ()
    model = build_model(config.model, num_classes=num_classes, heads=loss.heads, detached_heads=detached).to(device)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss = loss.to(device)
    model = wrap_model(model)
    if config.model.compile:
        model = torch.compile(model)
    steps = num_train_batches(
        num_samples=train_info.num_samples, batch_size=config.train.batch_size, world_size=1
    )  # global batch: the same step count whatever the number of ranks
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step=step, steps_per_epoch=steps, config=config)
    )
    return Parts(
        config=config,
        manifest=manifest,
        num_classes=num_classes,
        model=model,
        loss=loss,
        score_head=score_head,
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=steps,
        device=device,
        train_class_counts=np.asarray(train_info.class_counts, dtype=np.int64),
    )


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def autocast(config: Config, device: torch.device):
    if config.train.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.train.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- training


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    num_samples: int = 0
    parts_sum: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train_epoch(
    parts: Parts,
    *,
    epoch: int,
    batches: Iterable[dict[str, Any]],
    scaler: torch.amp.GradScaler,
    pseudo_targets_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
) -> EpochStats:
    """One pass over `batches`; returns loss sums and counts reduced over all ranks."""
    cfg, model, device = parts.config, parts.model, parts.device
    model.train()
    world = dist.world_size()
    stats = EpochStats()
    local_loss = torch.zeros((), dtype=torch.float64)
    start = last = time.perf_counter()
    for step, batch in enumerate(batches):
        images = model_input(batch["image"], device=device, config=cfg)
        labels = batch["label"].to(device, non_blocking=True)
        idx = batch["idx"].to(device, non_blocking=True)
        targets = pseudo_targets_fn(batch["idx"]).to(device) if pseudo_targets_fn else None
        with autocast(cfg, device):
            logits = model(images)
        out = parts.loss(logits=logits, labels=labels, idx=idx, epoch=epoch, pseudo_targets=targets)
        if parts.loss.stateful and world > 1:
            # Per-sample tables (ROLE): each rank stepped its own rows; every rank takes all of
            # them so the tables stay identical (and rank 0's checkpoint holds every update).
            rows = parts.loss.read_rows(idx)
            parts.loss.write_rows(dist.all_gather_cat(idx), dist.all_gather_cat(rows))
        batch_size = labels.shape[0]
        # Ranks see equal batch sizes (the loaders drop partial batches), so the mean of
        # per-rank means that DDP's gradient averaging takes is the global mean.
        loss = out.total_sum / batch_size
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at epoch {epoch} step {step}; batch keys {batch['key'][:8]}"
            )
        parts.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(parts.optimizer)
        scaler.update()
        parts.scheduler.step()
        local_loss += out.total_sum.detach().double().cpu()
        for name, value in out.parts_sum.items():
            stats.parts_sum[name] = stats.parts_sum.get(name, 0.0) + float(value)
        stats.num_samples += batch_size
        if dist.is_main() and (step + 1) % cfg.train.log_every == 0:
            now = time.perf_counter()
            rate = cfg.train.log_every * batch_size * world / (now - last)
            log(
                f"epoch {epoch + 1}/{cfg.train.epochs} step {step + 1}/{parts.steps_per_epoch} "
                f"loss {loss.item():.4f} lr {parts.scheduler.get_last_lr()[0]:.4g} {rate:.0f} img/s"
            )
            last = now
    stats.seconds = time.perf_counter() - start
    names = sorted(stats.parts_sum)
    sums = np.array([float(local_loss), stats.num_samples, *[stats.parts_sum[n] for n in names]], dtype=np.float64)
    sums = dist.all_reduce_sum(sums)
    stats.loss_sum, stats.num_samples = float(sums[0]), int(sums[1])
    stats.parts_sum = dict(zip(names, sums[2:].tolist()))
    return stats


# ---------------------------------------------------------------- scoring and evaluation


@dataclass
class ScoredChunk:
    """One batch of scores with its labels (and true posteriors on synthetic data)."""

    scores_NL: np.ndarray
    labels_N: np.ndarray
    posterior_NL: np.ndarray | None = None


def normalize_in_loader(device: torch.device) -> bool:
    """Where the engine's loaders normalise images: in their worker processes when the model runs
    on the CPU (off the training thread, which bounds CPU training), else on the device (uint8
    batches cross to a GPU at a quarter of float32's size and the GPU normalises them for free)."""
    return torch.device(device).type == "cpu"


def model_input(images: torch.Tensor, *, device: torch.device, config: Config) -> torch.Tensor:
    """A loader batch as the model takes it, on `device` and in the model's memory format.

    uint8 batches (loaders with normalize=False, see normalize_in_loader) are normalised on the
    device with build_transform's default mean/std, the ones the engine's loaders use.
    """
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return normalize_batch(images, memory_format=memory_format)
    return images.contiguous(memory_format=memory_format)


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
        transform=build_transform(train=False, resize=cfg.data.resize, crop=cfg.data.crop),
        num_classes=parts.num_classes,
        with_posterior=with_posterior,
        normalize=normalize_in_loader(parts.device),
    )


def score_split(parts: Parts, split: str, *, with_posterior: bool = False) -> list[ScoredChunk]:
    """This rank's share of a split, scored (each sample on exactly one rank)."""
    batches = split_loader(parts, split, with_posterior=with_posterior)
    return list(score_batches(parts.model, batches, head=parts.score_head, device=parts.device, config=parts.config))


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


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(parts: Parts, *, epoch: int, best: float, history: list[dict[str, float]], scaler) -> dict:
    return {
        "epoch": epoch,
        "best": best,
        "history": history,
        "model": unwrap(parts.model).state_dict(),
        "loss": parts.loss.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": numpy_rng_state(),
            "python": random.getstate(),
        },
        "config": parts.config.to_dict(),
        "num_classes": parts.num_classes,
    }


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and plain values, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def load_checkpoint_bytes(source: str | Path | io.BytesIO, *, name: str) -> dict:
    """An avgk checkpoint, loaded with weights_only=True: tensors and plain data only, so a crafted
    file cannot run code. Anything else fails in one line naming the file."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same one-line answer
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{name} is not an avgk checkpoint that loads safely (weights only): {detail}") from None
    if not isinstance(state, dict) or not {"model", "config", "num_classes"} <= set(state):
        raise ValueError(f"{name} is not an avgk checkpoint: it lacks model, config and num_classes")
    return state


def load_checkpoint_file(path: str | Path) -> dict:
    return load_checkpoint_bytes(Path(path), name=str(path))


def load_checkpoint_file_uri(uri: str) -> dict:
    """load_checkpoint_file for a run-directory URI (local path or pyarrow filesystem)."""
    return load_checkpoint_bytes(io.BytesIO(storage.read_bytes(uri)), name=uri)


def restore(parts: Parts, state: dict, scaler) -> None:
    unwrap(parts.model).load_state_dict(state["model"])
    parts.loss.load_state_dict(state["loss"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    set_numpy_rng_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


# ---------------------------------------------------------------- the whole run


@dataclass
class FitResult:
    history: list[dict[str, float]]
    evaluation: Evaluation | None


def fit(
    config: Config,
    *,
    reporter: Reporter,
    device: torch.device | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    on_epoch_end: Callable[[dict[str, float], int], None] | None = None,
    pseudo_targets_for_epoch: Callable[[Parts, int], Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train for config.train.epochs (resuming from the reporter's latest checkpoint), then evaluate on test.

    Rank 0 writes the resolved config, the best model and the final evaluation into the run
    directory; every rank reports each epoch's metrics (with a checkpoint from rank 0).
    """
    device = device or torch.device("cpu")
    run_dir = storage.absolute(config.run_dir)
    parts = build_parts(config, device=device, wrap_model=wrap_model)
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.amp == "fp16")
    start_epoch, best, history = 0, -math.inf, []
    state = reporter.latest_checkpoint_state()
    if state is not None:
        restore(parts, state, scaler)
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        if dist.is_main():
            where = f"from epoch {start_epoch + 1}" if start_epoch < config.train.epochs else "after its last epoch"
            log(f"resuming {config.run.name} {where} (best val avg-K so far {best:.4f})")
    if dist.is_main():
        with tempfile.TemporaryDirectory() as tmp:
            save_config(config, Path(tmp) / "config.yaml")
            storage.write_bytes(storage.join(run_dir, "config.yaml"), (Path(tmp) / "config.yaml").read_bytes())

    world = dist.world_size()
    for epoch in range(start_epoch, config.train.epochs):
        # Different augmentation streams per rank and epoch, reproducible from the seed.
        torch.manual_seed(config.train.seed * 1_000_003 + epoch * 1009 + dist.rank())
        batches = train_loader(
            shards_dir=config.data.shards,
            split="train",
            batch_size=config.train.batch_size // world,
            rank=dist.rank(),
            world_size=world,
            num_workers=config.data.loader_workers,
            epoch=epoch,
            seed=config.train.seed,
            transform=build_transform(
                train=True, resize=config.data.resize, crop=config.data.crop, hflip=config.data.hflip
            ),
            normalize=normalize_in_loader(parts.device),
            num_batches=parts.steps_per_epoch,
            shuffle_buffer=config.data.shuffle_buffer,
            resampled=config.data.resampled,
        )
        targets_fn = pseudo_targets_for_epoch(parts, epoch) if pseudo_targets_for_epoch else None
        stats = train_epoch(parts, epoch=epoch, batches=batches, scaler=scaler, pseudo_targets_fn=targets_fn, log=log)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": stats.loss_sum / max(1, stats.num_samples),
            "lr": parts.scheduler.get_last_lr()[0],
            "samples_per_second": stats.num_samples / max(stats.seconds, 1e-9),
            **{f"train_{n}": v / max(1, stats.num_samples) for n, v in stats.parts_sum.items()},
            **validate(parts),
        }
        improved = metrics["val_avg_k_accuracy"] > best
        best = max(best, metrics["val_avg_k_accuracy"])
        metrics["best_val_avg_k_accuracy"] = best
        history.append(metrics)
        if dist.is_main():
            log(
                f"epoch {epoch + 1}/{config.train.epochs} train_loss {metrics['train_loss']:.4f} "
                f"val avg-{format_k(config.loss.k)} acc {metrics['val_avg_k_accuracy']:.4f} "
                f"(best {best:.4f}) {metrics['samples_per_second']:.0f} img/s"
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = None
            if dist.is_main():
                state = checkpoint_state(parts, epoch=epoch, best=best, history=history, scaler=scaler)
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                if improved:
                    buffer = io.BytesIO()
                    torch.save(state, buffer)
                    storage.write_bytes(storage.join(run_dir, "best", CHECKPOINT_FILE), buffer.getvalue())
                checkpoint_dir = tmp
            if on_epoch_end is not None and dist.is_main():
                on_epoch_end(metrics, epoch)
            reporter.report(metrics, checkpoint_dir)

    dist.barrier()  # rank 0 may still be writing the best checkpoint
    if config.eval.checkpoint == "best" and storage.exists(storage.join(run_dir, "best", CHECKPOINT_FILE)):
        state = load_checkpoint_file_uri(storage.join(run_dir, "best", CHECKPOINT_FILE))
        unwrap(parts.model).load_state_dict(state["model"])
    evaluation = final_evaluation(parts)
    warning = shortfall_warning(evaluation.metrics["samples"], shards=str(config.data.shards))
    if warning and dist.is_main():
        log(warning)
    if dist.is_main():
        write_evaluation(evaluation, run_dir)
    dist.barrier()
    return FitResult(history=history, evaluation=evaluation)
