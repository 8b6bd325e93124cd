"""Checkpoints: what a training checkpoint holds, loading it safely (weights only), restoring a
run from it, building the trained model from it, and the reporters that keep the latest one.
"""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from avgk.config import Config
from avgk.method.losses import loss_class
from avgk.models.networks import build_model, unwrap
from avgk.records.runs import CHECKPOINT_FILE
from avgk.runtime import safe_fs, storage
from avgk.training.parts import Parts

# ---------------------------------------------------------------- reporting hooks


class Reporter(Protocol):
    """What wraps the loop: where metrics and checkpoints go, and where a resumed run starts."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint_state(self) -> dict[str, Any] | None:
        """The newest reported checkpoint's state (load_checkpoint_file), None on a fresh run."""
        ...


class LocalReporter:
    """Single-process runs: the latest checkpoint lives in <run_dir>/checkpoints/latest."""

    def __init__(self, run_dir: str):
        if storage.is_remote(run_dir):
            # pathlib would turn s3://bucket/runs into a local folder named "s3:"
            raise ValueError(
                f"run directory {storage.display(run_dir)!r} is remote: single-process runs (avgk study cells) keep "
                "their checkpoints on local disk; set run.storage to a local folder"
            )
        self.dir = Path(storage.absolute(run_dir)) / "checkpoints" / "latest"
        self.history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        staging = self.dir.with_name("latest.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(checkpoint_dir, staging)
        except OSError as err:  # the previous checkpoint stays in latest/
            shutil.rmtree(staging, ignore_errors=True)
            if safe_fs.is_disk_full(err):
                raise safe_fs.DiskFullError(str(staging)) from None
            raise
        shutil.rmtree(self.dir, ignore_errors=True)
        staging.rename(self.dir)

    def latest_checkpoint_dir(self) -> str | None:
        return str(self.dir) if (self.dir / CHECKPOINT_FILE).is_file() else None

    def latest_checkpoint_state(self) -> dict[str, Any] | None:
        latest = self.latest_checkpoint_dir()
        return load_checkpoint_file(Path(latest) / CHECKPOINT_FILE) if latest else None


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(
    parts: Parts, *, epoch: int, best: float, history: list[dict[str, float]], scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "best": best,
        "history": history,
        # `model` is what is evaluated (the weights' moving average with train.ema_decay > 0);
        # the raw training weights then travel as `train_model`, for resuming.
        "model": unwrap(parts.eval_model).state_dict(),
        **({"train_model": unwrap(parts.model).state_dict(), "ema_n_averaged": int(parts.ema.n_averaged)}
           if parts.ema is not None else {}),
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
    state = np.random.get_state(legacy=True)  # legacy=True is the default (numpy's stub types the call without it as a dict)
    assert isinstance(state, tuple)  # the global RandomState is MT19937's
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def load_checkpoint_bytes(source: str | Path | io.BytesIO, *, name: str) -> dict[str, Any]:
    """An avgk checkpoint, loaded with weights_only=True: tensors and plain data only, so a crafted
    file cannot run code. Anything else fails in one line naming the file."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{name} is not an avgk checkpoint that loads safely (weights only): {detail}") from None
    if not isinstance(state, dict) or not {"model", "config", "num_classes"} <= set(state):
        raise ValueError(f"{name} is not an avgk checkpoint: it lacks model, config and num_classes")
    return state


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    return load_checkpoint_bytes(Path(path), name=str(path))


def load_checkpoint_file_uri(uri: str) -> dict[str, Any]:
    """load_checkpoint_file for a run-directory URI (local path or pyarrow filesystem)."""
    return load_checkpoint_bytes(io.BytesIO(storage.read_bytes(uri)), name=uri)


def restore(parts: Parts, state: dict[str, Any], scaler: torch.amp.GradScaler) -> None:
    if parts.ema is not None:
        if "train_model" not in state:
            raise ValueError("this checkpoint was trained without train.ema_decay; resume it with train.ema_decay=0")
        unwrap(parts.model).load_state_dict(state["train_model"])
        parts.ema.module.load_state_dict(state["model"])
        parts.ema.n_averaged.fill_(int(state["ema_n_averaged"]))
    else:
        unwrap(parts.model).load_state_dict(state.get("train_model", state["model"]))
    parts.loss.load_state_dict(state["loss"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    set_numpy_rng_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def build_trained_model(config: Config, *, num_classes: int, model_state: dict[str, Any]) -> torch.nn.Module:
    """The trained network of a checkpoint, on the CPU: the one builder used by training's best-model
    reload, the scoring actors and SetPredictor. model.pretrained is ignored: the checkpoint holds
    every weight, and the pretrained file may not exist where the model is loaded."""
    model_config = config.model.model_copy(update={"pretrained": None})
    model = build_model(model_config, num_classes=num_classes, heads=loss_class(config.loss.name).heads)
    model.load_state_dict(model_state)
    return model
