"""The timm-style training options: each changes what it should and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from avgk.config import ConfigError, load_config
from avgk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from avgk.method.losses import build_loss
from avgk.models import inputs
from avgk.models.networks import TwoHeadNet
from avgk.training import checkpoints, engine
from tests.helpers.runs import SMOKE


def smoke(smoke_shards, tmp_path, *overrides):
    return load_config(SMOKE, [f"data.shards={smoke_shards}", f"run.storage={tmp_path}", "tracking.enabled=false",
                               *overrides])


def _image(size: int = 80, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- augmentation


def test_crop_scale_one_keeps_the_whole_image():
    image = _image()
    whole = build_transform(train=True, resize=64, crop=64, hflip=False, crop_scale=(1.0, 1.0))
    default = build_transform(train=True, resize=64, crop=64, hflip=False)
    expected = v2.Compose([v2.ToImage(), v2.Resize((64, 64), antialias=True)])(image)
    torch.manual_seed(0)
    assert torch.equal(whole.geometry(image), expected)
    torch.manual_seed(0)
    assert not torch.equal(default.geometry(image), expected)  # the default (0.35, 1) crops


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_auto_augment_changes_training_pixels_only(policy):
    image = _image()
    plain = build_transform(train=True, resize=64, crop=64, hflip=False, crop_scale=(1.0, 1.0))
    augmented = build_transform(train=True, resize=64, crop=64, hflip=False, crop_scale=(1.0, 1.0),
                                auto_augment=policy)
    differs = []
    for seed in range(8):
        torch.manual_seed(seed)
        a = augmented.geometry(image)
        assert a.dtype == torch.uint8 and a.shape == (3, 64, 64)
        differs.append(not torch.equal(a, plain.geometry(image)))
    assert sum(differs) >= 4
    config = load_config(None, [f"data.auto_augment={policy}"])
    eval_transform = inputs.image_transform(config, train=False)
    baseline = inputs.image_transform(load_config(None, []), train=False)
    assert torch.equal(eval_transform(image), baseline(image))  # evaluation never augments


@pytest.mark.parametrize("override, message", [
    ("data.crop_scale=[0.5,0.2]", r"data.crop_scale must be \(min, max\) with 0 < min <= max <= 1, got \[0.5, 0.2\]"),
    ("data.crop_scale=[0,1]", r"data.crop_scale must be"),
    ("data.std=[0.2,0,0.2]", r"data.std values must all be > 0"),
    ("data.auto_augment=autoaugment", r"data.auto_augment"),
    ("loss.label_smoothing=0.1 loss.name=an", r"loss.label_smoothing applies to .* got loss.name='an'"),
    ("train.mixup_alpha=0.2", r"train.mixup_alpha / train.cutmix_alpha need loss.name=ce"),
    ("train.cutmix_alpha=1 loss.name=role", r"need loss.name=ce"),
    ("train.ema_decay=1", r"train.ema_decay"),
    ("train.grad_accumulation=0", r"train.grad_accumulation"),
    ("data.crop_scale=[0.5,", r"override 'data.crop_scale=\[0.5,': the value is not valid YAML"),
])
def test_bad_training_options_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, override.split())
    assert "\n" not in str(err.value).strip()


# ---------------------------------------------------------------- normalisation


def test_mean_and_std_come_from_the_backbone_unless_set():
    clip = load_config(None, ["model.backbone=timm:vit_base_patch16_clip_224.openai"])
    mean, std = inputs.normalization(model=clip.model, data=clip.data)
    assert mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and std[0] == pytest.approx(0.26862954)
    default = load_config(None, [])
    assert inputs.normalization(model=default.model, data=default.data) == (IMAGENET_MEAN, IMAGENET_STD)
    tagged = load_config(None, ["model.backbone=timm:resnet18.a1_in1k"])
    assert inputs.normalization(model=tagged.model, data=tagged.data) == (IMAGENET_MEAN, IMAGENET_STD)
    own = load_config(None, ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"])
    assert inputs.normalization(model=own.model, data=own.data) == ((0.5,) * 3, (0.25,) * 3)
    # Both halves of the input path use it: the loader's transform and the device-side normalisation.
    batch = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(inputs.model_input(batch, device=torch.device("cpu"), config=own), torch.full((1, 3, 4, 4), 2.0))
    assert inputs.image_transform(own, train=False).mean == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- losses


def test_label_smoothing_changes_the_cross_entropy_and_nothing_else():
    torch.manual_seed(0)
    logits = {"softmax": torch.randn(6, 5), "multilabel": torch.randn(6, 5)}
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    for name in ("ce", "two_head"):
        plain = build_loss(load_config(None, [f"loss.name={name}"]).loss, num_classes=5, num_train=6)
        smooth = build_loss(load_config(None, [f"loss.name={name}", "loss.label_smoothing=0.2"]).loss,
                            num_classes=5, num_train=6)
        a = plain(logits=logits, labels=labels, idx=None, epoch=0)
        b = smooth(logits=logits, labels=labels, idx=None, epoch=0)
        expected = F.cross_entropy(logits["softmax"], labels, reduction="sum", label_smoothing=0.2)
        assert b.parts_sum["ce"] == pytest.approx(float(expected), rel=1e-6)
        assert a.parts_sum["ce"] != pytest.approx(float(b.parts_sum["ce"]))
        if name == "two_head":  # same pseudo-labels, same multi-label term
            assert b.parts_sum["bce"] == pytest.approx(float(a.parts_sum["bce"]), rel=1e-6)


def test_mixup_and_cutmix_give_soft_targets_the_cross_entropy_takes(smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, "loss.name=ce", "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0")
    mix = engine.build_mix(config, num_classes=20)
    assert isinstance(mix, v2.RandomChoice)
    assert engine.build_mix(smoke(smoke_shards, tmp_path, "loss.name=ce"), num_classes=20) is None
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed, soft = mix(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 20)
    assert torch.allclose(soft.sum(1), torch.ones(8)) and ((soft > 0).sum(1) <= 2).all()
    loss = build_loss(config.loss, num_classes=20, num_train=8)
    logits = {"softmax": torch.randn(8, 20)}
    out = loss(logits=logits, labels=soft, idx=None, epoch=0)
    expected = -(soft * torch.log_softmax(logits["softmax"], 1)).sum()
    assert out.total_sum == pytest.approx(float(expected), rel=1e-5)
    result = engine.fit(smoke(smoke_shards, tmp_path, "loss.name=ce", "train.mixup_alpha=0.4", "train.epochs=1",
                              "run.name=mixup"), reporter=checkpoints.LocalReporter(str(tmp_path / "mixup")),
                        log=lambda _: None)
    assert np.isfinite(result.history[-1]["train_loss"])


# ---------------------------------------------------------------- optimisation


def _linear_parts(smoke_shards, tmp_path, *overrides):
    """Parts over a BatchNorm-free network, so that a batch split in two has exactly the same gradient."""
    config = smoke(smoke_shards, tmp_path, "loss.name=ce", "train.optimizer=sgd", "train.momentum=0",
                   "train.weight_decay=0", "train.schedule=constant", "train.warmup_epochs=0", "train.lr=0.1",
                   *overrides)
    parts = engine.build_parts(config, device=torch.device("cpu"))
    torch.manual_seed(0)
    parts.model = TwoHeadNet(backbone=nn.Flatten(), num_features=3 * 16 * 16, num_classes=parts.num_classes,
                             heads=("softmax",))
    parts.optimizer = engine.build_optimizer(parts.model, config)
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, lambda step: 1.0)
    if parts.ema is not None:
        parts.ema = torch.optim.swa_utils.AveragedModel(
            parts.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.train.ema_decay),
            use_buffers=True)
    return parts


def _batches(sizes: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    images, labels = torch.randn(total, 3, 16, 16, generator=g), torch.randint(0, 20, (total,), generator=g)
    out, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        out.append({"image": images[part], "label": labels[part], "idx": torch.arange(start, start + size),
                    "key": [str(i) for i in range(start, start + size)]})
        start += size
    return out


def test_gradient_accumulation_steps_like_one_batch_of_the_total(smoke_shards, tmp_path):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    accumulated = _linear_parts(smoke_shards, tmp_path, "train.grad_accumulation=2")
    engine.train_epoch(accumulated, epoch=0, batches=_batches([8, 8, 8, 8]), scaler=scaler, log=lambda _: None)
    whole = _linear_parts(smoke_shards, tmp_path)
    engine.train_epoch(whole, epoch=0, batches=_batches([16, 16]), scaler=scaler, log=lambda _: None)
    assert accumulated.scheduler.last_epoch == whole.scheduler.last_epoch == 2  # two optimizer steps each
    for a, b in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The schedule counts optimizer steps, the loader batches.
    config_parts = engine.build_parts(smoke(smoke_shards, tmp_path, "train.grad_accumulation=3"), device=torch.device("cpu"))
    plain_parts = engine.build_parts(smoke(smoke_shards, tmp_path), device=torch.device("cpu"))
    assert config_parts.steps_per_epoch == plain_parts.steps_per_epoch // 3
    assert config_parts.batches_per_epoch == 3 * config_parts.steps_per_epoch


def test_more_accumulation_than_batches_is_one_line(smoke_shards, tmp_path):
    with pytest.raises(ValueError, match=r"train.grad_accumulation=99 exceeds the \d+ batches"):
        engine.build_parts(smoke(smoke_shards, tmp_path, "train.grad_accumulation=99"), device=torch.device("cpu"))


def test_ema_averages_the_weights_and_is_what_is_evaluated_and_checkpointed(smoke_shards, tmp_path):
    decay = 0.75
    parts = _linear_parts(smoke_shards, tmp_path, f"train.ema_decay={decay}")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    after = []
    for epoch, batch in enumerate(_batches([8, 8])):
        engine.train_epoch(parts, epoch=epoch, batches=[batch], scaler=scaler, log=lambda _: None)
        after.append([p.detach().clone() for p in parts.model.parameters()])
    for ema, first, second in zip(parts.ema.module.parameters(), *after, strict=True):
        torch.testing.assert_close(ema, decay * first + (1 - decay) * second)
    assert parts.eval_model is parts.ema.module

    state = checkpoints.checkpoint_state(parts, epoch=1, best=0.0, history=[], scaler=scaler)
    for ema, saved in zip(parts.ema.module.state_dict().values(), state["model"].values(), strict=True):
        torch.testing.assert_close(ema, saved)  # scoring, predict and fine-tuning read `model`: the average
    for raw, saved in zip(parts.model.state_dict().values(), state["train_model"].values(), strict=True):
        torch.testing.assert_close(raw, saved)
    resumed = _linear_parts(smoke_shards, tmp_path, f"train.ema_decay={decay}")
    checkpoints.restore(resumed, state, scaler)
    assert int(resumed.ema.n_averaged) == 2
    for a, b in zip(resumed.model.parameters(), parts.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(resumed.ema.module.parameters(), parts.ema.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_set_rule_on_a_head_the_loss_lacks_stops_the_training_before_any_epoch(smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, "loss.name=ce", "run.name=no-head",
                   "eval.set_rules=[{rule: aps, name: aps_ml, head: multilabel}]")
    with pytest.raises(ValueError, match=r"^eval.set_rules 'aps_ml' has head='multilabel', but loss 'ce' trains only "
                                         r"\['softmax'\]$"):
        engine.fit(config, reporter=checkpoints.LocalReporter(str(tmp_path / "no-head")), log=lambda _: None)
    assert not list((tmp_path / "no-head").glob("**/checkpoint*"))  # stopped before any epoch
