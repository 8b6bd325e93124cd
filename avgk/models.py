"""Backbones by name (small CNN, timm, torchvision) and the two-head network over them."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from avgk.config import ModelConfig


class SmallCNN(nn.Module):
    """A CPU-friendly conv net for small images (tests, demo, synthetic data)."""

    def __init__(self, *, width: int = 64):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def _load_local_weights(backbone: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"model.pretrained={path!r} is not a file; weights are only read from local disk, never downloaded"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    # Classifier weights of the source model are expected to be left out; anything else is a mismatch.
    real_missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))]
    if real_missing:
        raise ValueError(f"model.pretrained={path!r} lacks backbone weights, e.g. {real_missing[:5]}")


def build_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """(feature extractor returning B x D, D) for `model.backbone`."""
    name = config.backbone
    if name == "small_cnn":
        net = SmallCNN(width=config.width)
        if config.pretrained:
            _load_local_weights(net, config.pretrained)
        return net, net.num_features
    library, sep, arch = name.partition(":")
    if not sep or library not in {"timm", "torchvision"} or not arch:
        raise ValueError(f"model.backbone must be 'small_cnn', 'timm:<name>' or 'torchvision:<name>', got {name!r}")
    if library == "timm":
        import timm

        if arch not in timm.list_models():
            raise ValueError(f"model.backbone={name!r}: timm has no model {arch!r}")
        # pretrained=False: timm would download; local weights are loaded below instead.
        net = timm.create_model(arch, pretrained=False, num_classes=0)
        dim = net.num_features
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ValueError(f"model.backbone={name!r}: torchvision has no model {arch!r}")
        net = torchvision.models.get_model(arch, weights=None)
        dim = _strip_torchvision_classifier(net, name)
    if config.pretrained:
        _load_local_weights(net, config.pretrained)
    return net, dim


def _strip_torchvision_classifier(net: nn.Module, name: str) -> int:
    for attr in ("fc", "classifier", "head", "heads"):
        layer = getattr(net, attr, None)
        if layer is None:
            continue
        linear = layer if isinstance(layer, nn.Linear) else next(
            (m for m in reversed(list(layer.modules())) if isinstance(m, nn.Linear)), None
        )
        if linear is not None:
            setattr(net, attr, nn.Identity())
            return linear.in_features
    raise ValueError(f"model.backbone={name!r}: cannot find its classifier layer to replace")


class TwoHeadNet(nn.Module):
    """Shared backbone, a softmax head and a multi-label (sigmoid) head; builds only the heads asked for."""

    def __init__(self, *, backbone: nn.Module, num_features: int, num_classes: int, heads: tuple[str, ...]):
        super().__init__()
        unknown = set(heads) - {"softmax", "multilabel"}
        if unknown or not heads:
            raise ValueError(f"heads must be a non-empty subset of (softmax, multilabel), got {heads}")
        self.backbone = backbone
        self.heads = nn.ModuleDict({h: nn.Linear(num_features, num_classes) for h in heads})
        if "multilabel" in self.heads:
            # Start every sigmoid at the prior 1/L instead of 1/2: with a zero bias the summed BCE
            # opens at ~L*log(2) per sample and its gradient swamps the shared backbone for the
            # first epochs (measured: val avg-2 0.43 -> 0.57 after 3 epochs on the demo data).
            nn.init.constant_(self.heads["multilabel"].bias, -math.log(max(num_classes - 1, 1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {name: head(features) for name, head in self.heads.items()}


def build_model(config: ModelConfig, *, num_classes: int, heads: tuple[str, ...]) -> TwoHeadNet:
    backbone, dim = build_backbone(config)
    return TwoHeadNet(backbone=backbone, num_features=dim, num_classes=num_classes, heads=heads)
