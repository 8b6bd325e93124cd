"""The training-recipe knobs: per-group learning rates, the stop-gradient, AdamW, the prior-corrected
pseudo-label rule, fused scores, flips off, fine-tuning from an avgk run, safe checkpoint loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from avgk.config import ConfigError, LossConfig, ModelConfig, load_config
from avgk.data.transforms import build_transform
from avgk.method.losses import build_loss, head_scores, score_head_for
from avgk.method.losses.two_head import selection_scale
from avgk.method.pseudo_labels import batch_pseudo_labels
from avgk.models.networks import build_model
from avgk.training import checkpoints, engine
from tests.helpers.runs import ROOT

HEADS = ("softmax", "multilabel")


def smoke(smoke_shards, tmp_path, *overrides):
    return load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.shards={smoke_shards}", f"run.storage={tmp_path}", "tracking.enabled=false", *overrides,
    ])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_group_gets_its_learning_rate_multiplier(optimizer):
    config = load_config(None, [f"train.optimizer={optimizer}", "train.lr=0.5", "train.lr_scale.backbone=0.1",
                                "train.lr_scale.multilabel=20"])
    model = build_model(ModelConfig(width=4), num_classes=5, heads=HEADS)
    opt = engine.build_optimizer(model, config)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"backbone.decay": 0.05, "backbone.no_decay": 0.05, "softmax.decay": 0.5,
                                 "softmax.no_decay": 0.5, "multilabel.decay": 10.0, "multilabel.no_decay": 10.0})
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter once


def test_a_zero_backbone_multiplier_freezes_the_backbone():
    config = load_config(None, ["train.lr_scale.backbone=0", "train.weight_decay=0.1"])
    model = build_model(ModelConfig(width=4), num_classes=5, heads=HEADS)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    head_before = model.heads["softmax"].weight.detach().clone()
    opt = engine.build_optimizer(model, config)
    out = model(torch.randn(4, 3, 16, 16))
    (out["softmax"].sum() + out["multilabel"].sum()).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True))
    assert not torch.equal(head_before, model.heads["softmax"].weight)


def test_adamw_takes_its_betas():
    config = load_config(None, ["train.optimizer=adamw", "train.betas=[0.8, 0.99]"])
    opt = engine.build_optimizer(build_model(ModelConfig(width=4), num_classes=3, heads=HEADS), config)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.99)
    with pytest.raises(ConfigError, match=r"train.betas must both lie in \[0, 1\), got \[0.9, 1.0\]"):
        load_config(None, ["train.betas=[0.9, 1.0]"])


def test_stop_gradient_keeps_the_multilabel_loss_off_the_backbone():
    torch.manual_seed(0)
    for detached, reaches in (((), True), (("multilabel",), False)):
        model = build_model(ModelConfig(width=4), num_classes=5, heads=HEADS, detached_heads=detached)
        model(torch.randn(4, 3, 16, 16))["multilabel"].sum().backward()
        grads = [p.grad for p in model.backbone.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches
        assert model.heads["multilabel"].weight.grad.abs().sum() > 0  # the head itself still learns


def test_recipe_knobs_are_two_head_only():
    for key in ("loss.ml_stop_gradient=true", "loss.pseudo_prior_tau=1", "loss.score_head=fused"):
        with pytest.raises(ConfigError, match=r"applies to loss.name=two_head only, got loss.name='ce'"):
            load_config(None, ["loss.name=ce", key])
    with pytest.raises(ConfigError, match="online pseudo-labels only"):
        load_config(None, ["loss.pseudo_prior_tau=0.5", "loss.pseudo_labels=offline"])


def test_prior_corrected_selection_moves_extra_positives_to_rare_classes():
    # Sample 0 (label 0) is equally torn between a frequent class 1 and a rare class 2.
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05]])
    labels = torch.tensor([0, 0])
    counts = [100, 100, 5]
    paper = batch_pseudo_labels(probs=probs, labels=labels, k=1.5)  # 3 positives: both labels + one more
    assert paper[0].tolist() == [1, 1, 0]  # the tie goes to the lower index, the frequent class
    scale = selection_scale(counts, tau=1.0, num_classes=3)
    corrected = batch_pseudo_labels(probs=probs * scale, labels=labels, k=1.5)
    assert corrected[0].tolist() == [1, 0, 1]
    assert selection_scale(counts, tau=0.0, num_classes=3) is None
    assert float(scale.max()) == 1.0
    with pytest.raises(ValueError, match="needs the training class counts"):
        selection_scale(None, tau=1.0, num_classes=3)


def test_two_head_loss_uses_the_class_prior_when_tau_is_set():
    counts = [100, 100, 5]
    logits = {"softmax": torch.log(torch.tensor([[0.4, 0.3, 0.3]])), "multilabel": torch.zeros(1, 3)}
    labels = torch.tensor([0])
    losses = {
        tau: build_loss(LossConfig(name="two_head", k=2, pseudo_prior_tau=tau), num_classes=3, num_train=205,
                        class_counts=counts)
        for tau in (0.0, 1.0)
    }
    # The multi-label targets differ (class 1 vs class 2 picked), so the BCE gradients differ per class.
    grads = {}
    for tau, loss in losses.items():
        z = logits["multilabel"].clone().requires_grad_(True)
        loss(logits={"softmax": logits["softmax"], "multilabel": z}, labels=labels, idx=labels, epoch=0).total_sum.backward()
        grads[tau] = z.grad[0]
    assert grads[0.0][1] < 0 < grads[0.0][2]  # class 1 is a positive target under the paper's rule
    assert grads[1.0][2] < 0 < grads[1.0][1]  # class 2 is under the prior-corrected rule


def test_fused_scores_are_the_geometric_mean_of_both_heads():
    logits = {"softmax": torch.randn(3, 4), "multilabel": torch.randn(3, 4)}
    expected = torch.sqrt(torch.softmax(logits["softmax"], 1) * torch.sigmoid(logits["multilabel"]))
    assert torch.allclose(head_scores(logits, "fused"), expected, atol=1e-6)
    assert score_head_for(LossConfig(name="two_head", score_head="fused")) == "fused"


def _left_bright_image(size: int = 16) -> Image.Image:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("hflip", [True, False])
def test_hflip_off_never_mirrors_a_training_image(hflip):
    torch.manual_seed(0)
    transform = build_transform(train=True, resize=16, crop=16, hflip=hflip)
    image = _left_bright_image()
    mirrored = 0
    for _ in range(200):
        out = transform.geometry(image).float()
        mirrored += int(out[:, :, :6].mean() < out[:, :, -6:].mean())
    assert (mirrored > 0) == hflip


def test_fine_tuning_starts_from_an_avgk_run_with_fresh_heads(smoke_shards, tmp_path):
    source = smoke(smoke_shards, tmp_path, "run.name=source", "train.epochs=1")
    engine.fit(source, reporter=checkpoints.LocalReporter(source.run_dir), log=lambda _: None)
    state = checkpoints.load_checkpoint_file(tmp_path / "source" / "best" / "checkpoint.pt")
    for pretrained in (tmp_path / "source", tmp_path / "source" / "best" / "checkpoint.pt"):
        model = build_model(ModelConfig(width=8, pretrained=str(pretrained)), num_classes=7, heads=HEADS)
        for name, tensor in model.backbone.state_dict().items():
            assert torch.equal(tensor, state["model"][f"backbone.{name}"]), name
        assert model.heads["softmax"].weight.shape == (7, 32)  # a new label set: heads start fresh
    with pytest.raises(FileNotFoundError, match="not an avgk run directory"):
        build_model(ModelConfig(width=8, pretrained=str(tmp_path)), num_classes=7, heads=HEADS)
    # The fine-tuning run itself: a config naming the source run trains.
    tuned = smoke(smoke_shards, tmp_path, "run.name=tuned", "train.epochs=1", f"model.pretrained={tmp_path / 'source'}",
                  "train.lr_scale.backbone=0.1")
    result = engine.fit(tuned, reporter=checkpoints.LocalReporter(tuned.run_dir), log=lambda _: None)
    assert result.evaluation.metrics["test"]["avg_k_accuracy"]["2"] > 0.2


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['AVGK_PWNED']).write_text('x')",))


def test_checkpoints_load_weights_only_so_a_crafted_file_runs_no_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("AVGK_PWNED", str(marker))
    crafted = tmp_path / "checkpoint.pt"
    with open(crafted, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(ValueError, match=r"checkpoint.pt is not an avgk checkpoint that loads safely"):
        checkpoints.load_checkpoint_file(crafted)
    with pytest.raises(ValueError, match="is not a readable weights file"):
        build_model(ModelConfig(width=8, pretrained=str(crafted)), num_classes=3, heads=HEADS)
    assert not marker.exists()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="lacks model, config and num_classes"):
        checkpoints.load_checkpoint_file(tmp_path / "other.pt")
