"""The two-head network over a backbone (avgk.models.backbones), pretrained weights, and running a model."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from avgk.config import Config, ModelConfig
from avgk.models import backbones
from avgk.records.runs import resolve_checkpoint
from avgk.runtime import storage


def pretrained_file(path: str) -> str:
    """The weights file that `model.pretrained` names (a local path or a filesystem URI such as
    s3://bucket/weights.pt): the file itself, or an avgk run directory's checkpoint (its best, else
    its newest), found as `avgk evaluate --run` finds it."""
    where = storage.absolute(path)
    kind = storage.file_info(where).type
    if kind == pafs.FileType.File:
        return where
    if kind == pafs.FileType.Directory:
        try:
            return resolve_checkpoint(where, None)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"model.pretrained={path!r} is a folder without an avgk checkpoint (best/ or checkpoint_*/): "
                "not an avgk run directory"
            ) from None
    raise FileNotFoundError(
        f"model.pretrained={path!r} does not exist; weights are read from disk or object storage, never downloaded"
    )


def backbone_state(state: object, *, path: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors out of a loaded weights file: an avgk checkpoint (its model's
    `backbone.*` entries, heads dropped), a `{"state_dict": ...}` wrapper, or a plain state dict."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "num_classes" in state:
        return {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained={path!r} holds no state dict of tensors")
    return state


def _load_weights(backbone: nn.Module, path: str) -> None:
    file = pretrained_file(path)
    try:
        source = io.BytesIO(storage.read_bytes(file)) if storage.is_remote(file) else file
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.pretrained={path!r}: {file} is not a readable weights file ({first_line})") from None
    state = backbone_state(loaded, path=path)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    # Classifier weights of the source model are expected to be left out; anything else is a mismatch.
    real_missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))]
    if real_missing:
        raise ValueError(f"model.pretrained={path!r} lacks backbone weights, e.g. {real_missing[:5]}")
    if not set(state) - set(unexpected):
        raise ValueError(f"model.pretrained={path!r} matches none of the backbone's weights, e.g. {sorted(state)[:3]}")


def build_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """(feature extractor returning B x D, D) for `model.backbone` (avgk.models.backbones), with model.pretrained's weights."""
    net, dim = backbones.build(config)
    if config.pretrained:
        _load_weights(net, config.pretrained)
    return net, dim


class TwoHeadNet(nn.Module):
    """Shared backbone, a softmax head and a multi-label (sigmoid) head; builds only the heads asked for."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        heads: tuple[str, ...],
        detached_heads: tuple[str, ...] = (),
    ):
        super().__init__()
        unknown = set(heads) - {"softmax", "multilabel"}
        if unknown or not heads:
            raise ValueError(f"heads must be a non-empty subset of (softmax, multilabel), got {heads}")
        if not set(detached_heads) <= set(heads):
            raise ValueError(f"detached_heads must be among the heads {heads}, got {detached_heads}")
        self.backbone = backbone
        # Heads trained on detached features: their loss never reaches the backbone (loss.ml_stop_gradient).
        self.detached_heads = tuple(detached_heads)
        linear_heads = {h: nn.Linear(num_features, num_classes) for h in heads}
        self.heads = nn.ModuleDict(linear_heads)
        if "multilabel" in linear_heads:
            # Start every sigmoid at the prior 1/L instead of 1/2: with a zero bias the summed BCE
            # opens at ~L*log(2) per sample and its gradient swamps the shared backbone for the
            # first epochs (it held val avg-2 back for 3 epochs on the demo data, commit e2a2056).
            nn.init.constant_(linear_heads["multilabel"].bias, -math.log(max(num_classes - 1, 1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {
            name: head(features.detach() if name in self.detached_heads else features)
            for name, head in self.heads.items()
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group name (backbone and each head), for per-group learning rates."""
        groups = {"backbone": [p for p in self.backbone.parameters() if p.requires_grad]}
        groups.update({name: [p for p in head.parameters() if p.requires_grad] for name, head in self.heads.items()})
        return groups


def build_model(
    config: ModelConfig, *, num_classes: int, heads: tuple[str, ...], detached_heads: tuple[str, ...] = ()
) -> TwoHeadNet:
    backbone, dim = build_backbone(config)
    return TwoHeadNet(
        backbone=backbone, num_features=dim, num_classes=num_classes, heads=heads, detached_heads=detached_heads
    )


# ---------------------------------------------------------------- running a model


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def autocast(config: Config, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if config.train.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.train.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
