"""Backbone families and data sources are registries: a new one is one registration, listed in errors."""

from __future__ import annotations

import pytest

from avgk import backbones
from avgk.config import BACKBONE_FAMILIES, SOURCE_NAMES, ModelConfig
from avgk.data import sources


def test_every_listed_name_is_registered_and_nothing_else():
    assert tuple(backbones.BACKBONES) == BACKBONE_FAMILIES
    assert set(sources.SOURCES) == set(SOURCE_NAMES)


def test_errors_list_the_registered_forms():
    assert backbones.forms() == "'small_cnn', 'timm:<name>' or 'torchvision:<name>'"
    for bad in ("resnet18", "timm", "timm:", "small_cnn:x", "keras:resnet"):
        with pytest.raises(ValueError, match=f"model.backbone='{bad}' must be 'small_cnn', 'timm:<name>' or"):
            backbones.resolve(bad)
    with pytest.raises(ValueError, match="data.source='nope' has no converter; known: cifar100, imagefolder, plantnet300k, "
                                         "synthetic"):
        sources.converter_for("nope")


def test_a_name_missing_from_the_config_list_or_registered_twice_is_refused():
    family = backbones.Family("mine", "mine", check=lambda arch: None, build=lambda arch, config: (None, 0))
    with pytest.raises(ValueError, match="'mine' is not in avgk.config.BACKBONE_FAMILIES"):
        backbones.register_backbone(family)
    with pytest.raises(ValueError, match="'timm' is registered twice"):
        backbones.register_backbone(backbones.BACKBONES["timm"])
    with pytest.raises(ValueError, match="source 'mine' is not in avgk.config.SOURCE_NAMES"):
        sources.register_source("mine")(lambda data, options: None)
    with pytest.raises(ValueError, match="source 'cifar100' is registered twice"):
        sources.register_source("cifar100")(lambda data, options: None)


def test_a_new_family_is_one_registration(monkeypatch):
    import torch
    from torch import nn

    from avgk.models import build_model

    monkeypatch.setattr(backbones, "BACKBONE_FAMILIES", (*BACKBONE_FAMILIES, "mlp"))
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))

    def check(arch: str) -> None:
        if not arch.isdigit():
            raise ValueError(f"model.backbone='mlp:{arch}': the width must be a number")

    backbones.register_backbone(backbones.Family(
        "mlp", "mlp:<width>", check=check,
        build=lambda arch, config: (nn.Sequential(nn.Flatten(), nn.LazyLinear(int(arch))), int(arch))))
    assert backbones.forms().endswith("'torchvision:<name>' or 'mlp:<width>'")
    model = build_model(ModelConfig(backbone="mlp:7"), num_classes=3, heads=("softmax", "multilabel"))
    out = model(torch.zeros(2, 3, 8, 8))
    assert out["softmax"].shape == (2, 3)
    with pytest.raises(ValueError, match="the width must be a number"):
        backbones.check("mlp:wide")
