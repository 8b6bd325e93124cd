"""The two-head loss, CE and the model: values, gradients, registry errors."""


import re

import pytest
import torch
import torch.nn.functional as F

from avgk.config import LOSSES, LossConfig, ModelConfig
from avgk.method.losses import build_loss, head_scores, score_head_for
from avgk.method.pseudo_labels import batch_pseudo_labels
from avgk.models.networks import build_model


def _batch(batch_size=6, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        {"softmax": torch.randn(batch_size, num_classes, generator=g),
         "multilabel": torch.randn(batch_size, num_classes, generator=g)},
        torch.randint(num_classes, (batch_size,), generator=g),
    )


@pytest.mark.parametrize("reduction, mu", [("sum", 1.0), ("mean", 0.5)])
def test_two_head_value_matches_formula(reduction, mu):
    logits, labels = _batch()
    loss = build_loss(LossConfig(name="two_head", k=2, ml_weight=mu, ml_reduction=reduction), num_classes=5, num_train=100)
    out = loss(logits=logits, labels=labels, idx=torch.arange(6), epoch=0)
    targets = batch_pseudo_labels(probs=torch.softmax(logits["softmax"], 1), labels=labels, k=2)
    bce = F.binary_cross_entropy_with_logits(logits["multilabel"], targets, reduction="none")
    expected_bce = bce.sum() if reduction == "sum" else bce.sum() / 5
    expected = F.cross_entropy(logits["softmax"], labels, reduction="sum") + mu * expected_bce
    assert torch.allclose(out.total_sum, expected)


def test_warmup_switches_the_multilabel_term_off():
    logits, labels = _batch()
    loss = build_loss(LossConfig(name="two_head", pseudo_warmup_epochs=2), num_classes=5, num_train=100)
    warm = loss(logits=logits, labels=labels, idx=torch.arange(6), epoch=1).total_sum
    after = loss(logits=logits, labels=labels, idx=torch.arange(6), epoch=2).total_sum
    assert torch.allclose(warm, F.cross_entropy(logits["softmax"], labels, reduction="sum"))
    assert after > warm


def test_gradients_reach_both_heads_and_backbone():
    model = build_model(ModelConfig(width=8), num_classes=5, heads=("softmax", "multilabel"))
    loss = build_loss(LossConfig(name="two_head"), num_classes=5, num_train=10)
    out = loss(logits=model(torch.randn(4, 3, 16, 16)), labels=torch.tensor([0, 1, 2, 3]), idx=torch.arange(4), epoch=0)
    out.total_sum.backward()
    for name in ("heads.softmax.weight", "heads.multilabel.weight", "backbone.features.0.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_pseudo_labels_carry_no_gradient_into_softmax_head():
    logits, labels = _batch()
    z_s = logits["softmax"].clone().requires_grad_(True)
    loss = build_loss(LossConfig(name="two_head", ml_weight=1.0), num_classes=5, num_train=10)
    both = {"softmax": z_s, "multilabel": logits["multilabel"]}
    loss(logits=both, labels=labels, idx=torch.arange(6), epoch=0).total_sum.backward()
    ce_only = z_s.detach().clone().requires_grad_(True)
    F.cross_entropy(ce_only, labels, reduction="sum").backward()
    assert torch.allclose(z_s.grad, ce_only.grad)  # the BCE term adds nothing through the pseudo-labels


def test_ce_builds_only_softmax_head_and_scores_softmax():
    cfg = LossConfig(name="ce")
    assert score_head_for(cfg) == "softmax"
    model = build_model(ModelConfig(width=8), num_classes=5, heads=LOSSES.get("ce").heads)
    out = model(torch.randn(2, 3, 16, 16))
    assert set(out) == {"softmax"}
    assert torch.allclose(head_scores(out, "softmax").sum(1), torch.ones(2))


def test_registry_and_head_errors():
    with pytest.raises(ValueError, match=re.escape("loss.name='nope' is not a registered loss; registered: two_head")):
        LossConfig(name="nope")  # the config refuses it before any loss is built
    with pytest.raises(ValueError, match="trains only"):
        score_head_for(LossConfig(name="ce", score_head="multilabel"))
    with pytest.raises(ValueError, match="more than"):
        build_loss(LossConfig(name="two_head", k=2, pseudo_k=6), num_classes=5, num_train=10)


@pytest.mark.parametrize("backbone", ["torchvision:resnet18", "timm:resnet18"])
def test_library_backbones_without_download(backbone):
    model = build_model(ModelConfig(backbone=backbone), num_classes=7, heads=("softmax", "multilabel"))
    out = model(torch.randn(2, 3, 32, 32))
    assert out["softmax"].shape == (2, 7) and out["multilabel"].shape == (2, 7)


def test_pretrained_weights_only_from_local_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model(ModelConfig(pretrained=str(tmp_path / "missing.pt")), num_classes=3, heads=("softmax",))
    source = build_model(ModelConfig(width=8), num_classes=3, heads=("softmax",))
    torch.save(source.backbone.state_dict(), tmp_path / "w.pt")
    loaded = build_model(ModelConfig(width=8, pretrained=str(tmp_path / "w.pt")), num_classes=3, heads=("softmax",))
    assert torch.equal(loaded.backbone.features[0][0].weight, source.backbone.features[0][0].weight)
    with pytest.raises(ValueError, match=re.escape("must be 'small_cnn', 'timm:<name>' or 'torchvision:<name>'")):
        build_model(ModelConfig(backbone="resnet18"), num_classes=3, heads=("softmax",))
    with pytest.raises(ValueError, match="timm has no model"):
        build_model(ModelConfig(backbone="timm:not_a_net"), num_classes=3, heads=("softmax",))
