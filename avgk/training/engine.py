"""Training and evaluation loops in plain torch, rank-agnostic: Ray Train (or nothing) wraps them.

Legend: B batch, L classes, N samples. Everything distributed goes through avgk.runtime.distributed
(sums of counts and histograms); the loops never ask which rank they are on except to print
and write files from rank 0.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from avgk.config import Config, save_config
from avgk.data.loaders import num_train_batches, train_loader
from avgk.data.manifest import read_manifest
from avgk.evaluation import set_rules
from avgk.evaluation.accounting import shortfall_warning
from avgk.evaluation.metrics import format_k
from avgk.evaluation.passes import Evaluation
from avgk.method.losses import build_loss, score_head_for
from avgk.models.inputs import image_transform, model_input, normalize_in_loader
from avgk.models.networks import TwoHeadNet, autocast, build_model, unwrap
from avgk.records.runs import CHECKPOINT_FILE
from avgk.runtime import distributed as dist
from avgk.runtime import storage
from avgk.training.checkpoints import Reporter, checkpoint_state, load_checkpoint_file_uri, restore
from avgk.training.evaluation import final_evaluation, validate, write_evaluation
from avgk.training.parts import Mix, Parts
from avgk.training.pseudo_refresh import OfflinePseudoLabels

# ---------------------------------------------------------------- building blocks


def build_mix(config: Config, *, num_classes: int) -> Mix | None:
    """train.mixup_alpha / cutmix_alpha as one torchvision v2 batch transform (None when both are 0)."""
    from torchvision.transforms import v2

    t = config.train
    choices = [v2.MixUp(alpha=t.mixup_alpha, num_classes=num_classes)] if t.mixup_alpha else []
    choices += [v2.CutMix(alpha=t.cutmix_alpha, num_classes=num_classes)] if t.cutmix_alpha else []
    if not choices:
        return None
    mix: Mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
    return mix


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


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
    for name, params in cast(TwoHeadNet, unwrap(model)).parameter_groups().items():
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
    set_rules.check_heads(config.eval.set_rules, heads=loss.heads, loss=config.loss.name)  # before any epoch
    detached = ("multilabel",) if config.loss.ml_stop_gradient else ()
    model: nn.Module = build_model(config.model, num_classes=num_classes, heads=loss.heads, detached_heads=detached).to(device)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss = loss.to(device)
    model = wrap_model(model)
    if config.model.compile:
        model = cast(nn.Module, torch.compile(model))  # an OptimizedModule
    batches = num_train_batches(
        num_samples=train_info.num_samples, batch_size=config.train.batch_size, world_size=1
    )  # global batch: the same step count whatever the number of ranks
    accumulation = config.train.grad_accumulation
    steps = batches // accumulation
    if steps < 1:
        raise ValueError(
            f"train.grad_accumulation={accumulation} exceeds the {batches} batches of "
            f"train.batch_size={config.train.batch_size} in the training split: no optimizer step per epoch"
        )
    ema = None
    if config.train.ema_decay:
        ema = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(config.train.ema_decay), use_buffers=True)
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
        batches_per_epoch=steps * accumulation,
        ema=ema,
        mix=build_mix(config, num_classes=num_classes),
    )

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
    """One pass over `batches`; returns loss sums and counts reduced over all ranks.

    With train.grad_accumulation = A, gradients of A consecutive batches are summed (DDP
    all-reduces only the last one's) and one optimizer step is taken: each batch's loss is
    divided by B x A, so the step follows the mean over the A x B samples.
    """
    cfg, model, device = parts.config, parts.model, parts.device
    model.train()
    world = dist.world_size()
    accumulation = cfg.train.grad_accumulation
    stats = EpochStats()
    local_loss = torch.zeros((), dtype=torch.float64)
    start = last = time.perf_counter()
    parts.optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(batches):
        images = model_input(batch["image"], device=device, config=cfg)
        labels = batch["label"].to(device, non_blocking=True)
        idx = batch["idx"].to(device, non_blocking=True)
        targets = pseudo_targets_fn(batch["idx"]).to(device) if pseudo_targets_fn else None
        loss_labels = labels
        if parts.mix is not None:
            images, loss_labels = parts.mix(images, labels)
        steps_now = (step + 1) % accumulation == 0
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if steps_now or no_sync is None else no_sync():
            with autocast(cfg, device):
                logits = model(images)
            out = parts.loss(logits=logits, labels=loss_labels, idx=idx, epoch=epoch, pseudo_targets=targets)
            if parts.loss.stateful and world > 1:
                # Per-sample tables (ROLE): each rank stepped its own rows; every rank takes all of
                # them so the tables stay identical (and rank 0's checkpoint holds every update).
                rows = parts.loss.read_rows(idx)
                parts.loss.write_rows(dist.all_gather_cat(idx), dist.all_gather_cat(rows))
            batch_size = labels.shape[0]
            # Ranks see equal batch sizes (the loaders drop partial batches), so the mean of
            # per-rank means that DDP's gradient averaging takes is the global mean.
            loss = out.total_sum / (batch_size * accumulation)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at epoch {epoch} step {step}; batch keys {batch['key'][:8]}"
                )
            scaler.scale(loss).backward()
        if steps_now:
            if cfg.train.grad_clip:
                scaler.unscale_(parts.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(parts.optimizer)
            scaler.update()
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scheduler.step()
            if parts.ema is not None:
                parts.ema.update_parameters(unwrap(model))
        local_loss += out.total_sum.detach().double().cpu()
        for name, value in out.parts_sum.items():
            stats.parts_sum[name] = stats.parts_sum.get(name, 0.0) + float(value)
        stats.num_samples += batch_size
        if dist.is_main() and (step + 1) % cfg.train.log_every == 0:
            now = time.perf_counter()
            rate = cfg.train.log_every * batch_size * world / (now - last)
            left = (now - start) / (step + 1) * (parts.batches_per_epoch - step - 1)
            log(
                f"epoch {epoch + 1}/{cfg.train.epochs} step {step + 1}/{parts.batches_per_epoch} "
                f"loss {loss.item() * accumulation:.4f} lr {parts.scheduler.get_last_lr()[0]:.4g} {rate:.0f} img/s, "
                f"epoch ends in {format_duration(left)}"
            )
            last = now
    stats.seconds = time.perf_counter() - start
    names = sorted(stats.parts_sum)
    sums = np.array([float(local_loss), stats.num_samples, *[stats.parts_sum[n] for n in names]], dtype=np.float64)
    sums = dist.all_reduce_sum(sums)
    stats.loss_sum, stats.num_samples = float(sums[0]), int(sums[1])
    stats.parts_sum = dict(zip(names, sums[2:].tolist(), strict=True))
    return stats


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
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train for config.train.epochs (resuming from the reporter's latest checkpoint), then evaluate on test.

    Rank 0 writes the resolved config, the best model and the final evaluation into the run
    directory; every rank reports each epoch's metrics (with a checkpoint from rank 0).
    """
    device = device or torch.device("cpu")
    run_dir = storage.absolute(config.run_dir)
    parts = build_parts(config, device=device, wrap_model=wrap_model)
    pseudo_targets_for_epoch = None
    if config.loss.pseudo_labels == "offline":
        # The global table, recomputed every loss.refresh_epochs by all ranks together.
        pseudo_targets_for_epoch = OfflinePseudoLabels(
            run_dir=run_dir, k=config.loss.effective_pseudo_k, refresh_epochs=config.loss.refresh_epochs, log=log
        )
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
    run_start = time.perf_counter()
    for epoch in range(start_epoch, config.train.epochs):
        # Different augmentation streams per rank and epoch, reproducible from the seed.
        torch.manual_seed(config.train.seed * 1_000_003 + epoch * 1009 + dist.rank())
        batches = train_loader(
            shards_dir=parts.manifest,
            split="train",
            batch_size=config.train.batch_size // world,
            rank=dist.rank(),
            world_size=world,
            num_workers=config.data.loader_workers,
            epoch=epoch,
            seed=config.train.seed,
            transform=image_transform(config, train=True),
            normalize=normalize_in_loader(parts.device),
            num_batches=parts.batches_per_epoch,
            shuffle_buffer=config.data.shuffle_buffer,
            resampled=config.data.resampled,
        )
        targets_fn = pseudo_targets_for_epoch(parts, epoch) if pseudo_targets_for_epoch else None
        stats = train_epoch(parts, epoch=epoch, batches=batches, scaler=scaler, pseudo_targets_fn=targets_fn, log=log)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": stats.loss_sum / max(1, stats.num_samples),
            "lr": float(parts.scheduler.get_last_lr()[0]),
            "samples_per_second": stats.num_samples / max(stats.seconds, 1e-9),
            **{f"train_{n}": v / max(1, stats.num_samples) for n, v in stats.parts_sum.items()},
            **validate(parts),
        }
        improved = metrics["val_avg_k_accuracy"] > best
        best = max(best, metrics["val_avg_k_accuracy"])
        metrics["best_val_avg_k_accuracy"] = best
        history.append(metrics)
        if dist.is_main():
            done = epoch + 1 - start_epoch
            left = (time.perf_counter() - run_start) / done * (config.train.epochs - epoch - 1)
            log(
                f"epoch {epoch + 1}/{config.train.epochs} train_loss {metrics['train_loss']:.4f} "
                f"val avg-{format_k(config.loss.k)} acc {metrics['val_avg_k_accuracy']:.4f} "
                f"(best {best:.4f}) {metrics['samples_per_second']:.0f} img/s"
                + (f", training ends in {format_duration(left)}" if epoch + 1 < config.train.epochs else "")
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
        unwrap(parts.eval_model).load_state_dict(state["model"])
    evaluation = final_evaluation(parts)
    warning = shortfall_warning(evaluation.metrics["samples"], shards=str(config.data.shards))
    if warning and dist.is_main():
        log(warning)
    if dist.is_main():
        write_evaluation(evaluation, run_dir)
        # the per-epoch metrics beside the final ones: `avgk compare` reads best epochs and val curves here
        storage.write_json(storage.join(run_dir, "history.json"), history)
    dist.barrier()
    return FitResult(history=history, evaluation=evaluation)
