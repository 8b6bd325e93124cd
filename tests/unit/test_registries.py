"""Losses, backbone families and data sources share one registry pattern: a torch-free table of
"module:attribute" paths in avgk.config.registry, resolved on first use, one decorator for names
added from outside avgk, and ValueErrors that name the key, the value and what is registered."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from avgk.config import BACKBONES, LOSSES, SOURCES, DataConfig, LossConfig, ModelConfig, Registry
from avgk.models import backbones


@pytest.mark.parametrize("registry", [LOSSES, BACKBONES, SOURCES], ids=lambda r: r.kind)
def test_every_name_in_a_table_resolves_to_what_its_path_says(registry):
    for name in registry.names:
        obj = registry.get(name)
        module, _, _attribute = registry.path(name).partition(":")
        assert obj.__module__ == module or getattr(obj, "name", None) == name, (name, obj)
        assert obj is registry.get(name)  # resolved once


def test_the_tables_are_what_configs_validate_against_without_importing_torch():
    code = ("import sys; from avgk.config import LossConfig, DataConfig; LossConfig(name='ce'); "
            "DataConfig(source='imagefolder', root='x');"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_name_the_key_the_value_and_what_is_registered():
    with pytest.raises(ValueError, match=re.escape("loss.name='nope' is not a registered loss; registered: two_head, ce, an")):
        LossConfig(name="nope")
    with pytest.raises(ValueError, match=re.escape("data.source='nope' is not a registered data source; registered: "
                                                   "synthetic, imagefolder, plantnet300k, cifar100")):
        DataConfig(source="nope")
    assert backbones.forms() == "'small_cnn', 'timm:<name>' or 'torchvision:<name>'"
    for bad in ("resnet18", "timm", "timm:", "small_cnn:x", "keras:resnet"):
        with pytest.raises(ValueError, match=f"model.backbone='{bad}' must be 'small_cnn', 'timm:<name>' or"):
            backbones.resolve(bad)


def test_a_name_registered_twice_is_refused_with_a_value_error():
    registry = Registry("thing", key="thing.name", table={"a": "math:pi"}, plugins="avgk.tests.none")
    with pytest.raises(ValueError, match="thing 'a' is registered already, by math:pi"):
        registry.register("a")(lambda: None)
    with pytest.raises(ValueError,
                       match=re.escape("loss 'ce' is registered already, by avgk.method.losses.two_head:CrossEntropyLoss")):
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
        with pytest.raises(ValueError, match=re.escape("backbone family 'mlp' is registered already, by "
                                                       "tests.unit.test_registries:mlp")):
            BACKBONES.register("mlp")(family)
    finally:
        BACKBONES.unregister("mlp")
    assert "mlp" not in BACKBONES


def test_an_installed_plugin_registers_its_names_in_every_process_that_meets_them(tmp_path):
    """A package naming a module under the `avgk.losses` entry-point group: a fresh process (a Ray worker
    validating a config, say) finds the name without importing the module itself."""
    (tmp_path / "my_losses.py").write_text(
        "from avgk.config import LOSSES\n"
        "@LOSSES.register('mine')\n"
        "class MyLoss:\n"
        "    heads = ('softmax',)\n"
    )
    dist = tmp_path / "my_losses-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-losses\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[avgk.losses]\nmine = my_losses\n")
    code = ("from avgk.config import LOSSES, LossConfig; LossConfig(name='mine'); "
            "assert LOSSES.path('mine') == 'my_losses:MyLoss', LOSSES.path('mine')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    with pytest.raises(ValueError, match=re.escape("loss.name='mine' is not a registered loss")):
        LossConfig(name="mine")  # this process has no such plugin
