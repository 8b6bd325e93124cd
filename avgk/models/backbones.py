"""Backbone families by name: `model.backbone` is `small_cnn`, `timm:<name>` or `torchvision:<name>`.

Each family has a check (on the driver, before any work: is the architecture known to its
library?) and a builder (a feature extractor returning B x D, and D). A new family is a `Family`
here and its line in avgk.config.registry.BACKBONES. Importing this module imports no torch: a
config error must answer at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from avgk.config import BACKBONES, ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    form: str
    """How model.backbone names one, for errors and --help: 'small_cnn', 'timm:<name>'."""
    check: Callable[[str], None]
    """The architecture name ("" for a family without one) -> None, or ValueError naming what is wrong."""
    build: Callable[[str, ModelConfig], tuple[Any, int]]
    """(architecture, model config) -> (torch module returning B x D features, D); no weights loaded."""

    @property
    def takes_architecture(self) -> bool:
        return ":" in self.form


def family_of(name: str) -> Family:
    """The family registered as `name` (avgk.config.registry.BACKBONES)."""
    family: Family = BACKBONES.get(name)
    return family


def forms() -> str:
    """"'small_cnn', 'timm:<name>' or 'torchvision:<name>'": every registered way to name a backbone."""
    quoted = [f"'{family_of(name).form}'" for name in BACKBONES.names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def resolve(name: str) -> tuple[Family, str]:
    """(family, architecture) of a model.backbone value; ValueError if no family takes it in that form."""
    family_name, sep, arch = name.partition(":")
    family = family_of(family_name) if family_name in BACKBONES else None
    if family is None or family.takes_architecture != bool(sep and arch):
        raise ValueError(f"model.backbone={name!r} must be {forms()}")
    return family, arch


def check(name: str) -> None:
    """The backbone exists (its library knows the architecture); builds nothing."""
    family, arch = resolve(name)
    family.check(arch)


def build(config: ModelConfig) -> tuple[Any, int]:
    """(feature extractor, feature dimension) of config.backbone, randomly initialised."""
    family, arch = resolve(config.backbone)
    family.check(arch)
    return family.build(arch, config)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ---- the families

def _build_small_cnn(arch: str, config: ModelConfig) -> tuple[Any, int]:
    from avgk.models.small_cnn import SmallCNN

    net = SmallCNN(width=config.width)
    return net, net.num_features


def _check_timm(arch: str) -> None:
    import timm

    if not timm.is_model(arch):  # accepts pretrained tags: resnet18.a1_in1k
        raise ValueError(f"model.backbone='timm:{arch}': timm has no model {arch!r}"
                         + _suggest(arch.split(".")[0], timm.list_models()))


def _build_timm(arch: str, config: ModelConfig) -> tuple[Any, int]:
    import timm

    # pretrained=False: timm would download; local weights (model.pretrained) are loaded by avgk.models.networks.
    net = timm.create_model(arch, pretrained=False, num_classes=0)
    return net, cast(int, net.num_features)  # timm's feature width, an int attribute of every model


def _check_torchvision(arch: str) -> None:
    import torchvision

    known = torchvision.models.list_models()
    if arch not in known:
        raise ValueError(f"model.backbone='torchvision:{arch}': torchvision has no model {arch!r}" + _suggest(arch, known))


def _build_torchvision(arch: str, config: ModelConfig) -> tuple[Any, int]:
    import torchvision
    from torch import nn

    net = torchvision.models.get_model(arch, weights=None)
    for attr in ("fc", "classifier", "head", "heads"):  # the classifier becomes the identity: features out
        layer = getattr(net, attr, None)
        if layer is None:
            continue
        linear = layer if isinstance(layer, nn.Linear) else next(
            (m for m in reversed(list(layer.modules())) if isinstance(m, nn.Linear)), None
        )
        if linear is not None:
            setattr(net, attr, nn.Identity())
            return net, linear.in_features
    raise ValueError(f"model.backbone='torchvision:{arch}': cannot find its classifier layer to replace")


SMALL_CNN = Family("small_cnn", "small_cnn", check=lambda arch: None, build=_build_small_cnn)
TIMM = Family("timm", "timm:<name>", check=_check_timm, build=_build_timm)
TORCHVISION = Family("torchvision", "torchvision:<name>", check=_check_torchvision, build=_build_torchvision)
