"""Losses, backbone families and data sources share one registry pattern: a torch-free table of
"module:attribute" paths in avgk.config.registry, resolved on first use, one decorator for names
added from outside avgk, and ValueErrors that name the key, the value and what is registered."""

from __future__ import annotations

import subprocess
import sys

import pytest

from avgk.config import BACKBONES, LOSSES, SOURCES, DataConfig, LossConfig, ModelConfig, Registry
from avgk.models import backbones


@pytest.mark.parametrize("registry", [LOSSES, BACKBONES, SOURCES], ids=lambda r: r.kind)
def test_every_name_in_a_table_resolves_to_what_its_path_says(registry):
    for name in registry.names:
        obj = registry.get(name)
        module, _, attribute = registry.path(name).partition(":")
        assert obj.__module__ == module or getattr(obj, "name", None) == name, (name, obj)
        assert obj is registry.get(name)  # resolved once


def test_the_tables_are_what_configs_validate_against_without_importing_torch():
    code = ("import sys; from avgk.config import LossConfig, DataConfig; LossConfig(name='ce'); "
            "DataConfig(source='imagefolder', root='x');"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_name_the_key_the_value_and_what_is_registered():
    with pytest.raises(ValueError, match="loss.name='nope' is not a registered loss; registered: two_head, ce, an"):
        LossConfig(name="nope")
    with pytest.raises(ValueError, match="data.source='nope' is not a registered data source; registered: synthetic, "
                                         "imagefolder, plantnet300k, cifar100"):
        DataConfig(source="nope")
    assert backbones.forms() == "'small_cnn', 'timm:<name>' or 'torchvision:<name>'"
    for bad in ("resnet18", "timm", "timm:", "small_cnn:x", "keras:resnet"):
        with pytest.raises(ValueError, match=f"model.backbone='{bad}' must be 'small_cnn', 'timm:<name>' or"):
            backbones.resolve(bad)


def test_a_name_registered_twice_is_refused_with_a_value_error():
    registry = Registry("thing", key="thing.name", table={"a": "math:pi"})
    with pytest.raises(ValueError, match="thing 'a' is registered already, by math:pi"):
        registry.register("a")(lambda: None)
    with pytest.raises(ValueError, match="loss 'ce' is registered already, by avgk.method.losses.two_head:CrossEntropyLoss"):
        LOSSES.register("ce")(object)


def test_a_new_backbone_family_is_one_decorator():
    import torch
    from torch import nn

    from avgk.models.networks import build_model

    def check(arch: str) -> None:
        if not arch.isdigit():
            raise ValueError(f"model.backbone='mlp:{arch}': the width must be a number")

    family = backbones.Family("mlp", "mlp:<width>", check=check,
                              build=lambda arch, config: (nn.Sequential(nn.Flatten(), nn.LazyLinear(int(arch))), int(arch)))
    BACKBONES.register("mlp")(family)
    try:
        assert backbones.forms().endswith("'torchvision:<name>' or 'mlp:<width>'")
        model = build_model(ModelConfig(backbone="mlp:7"), num_classes=3, heads=("softmax", "multilabel"))
        assert model(torch.zeros(2, 3, 8, 8))["softmax"].shape == (2, 3)
        with pytest.raises(ValueError, match="the width must be a number"):
            backbones.check("mlp:wide")
    finally:
        BACKBONES.unregister("mlp")
    assert "mlp" not in BACKBONES
