"""The single-process engine: schedules, a whole CPU training with every metric, AMP, NaN stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avgk.config import load_config
from avgk.evaluation import passes
from avgk.method.thresholds import reference_thresholds
from avgk.models import inputs
from avgk.training import checkpoints, engine, evaluation
from tests.helpers.runs import ROOT


def smoke(smoke_shards, tmp_path, *overrides):
    return load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.shards={smoke_shards}", f"run.storage={tmp_path}", "tracking.enabled=false", *overrides,
    ])


@pytest.mark.parametrize(
    "overrides, step, expected",
    [
        (["train.schedule=constant", "train.warmup_epochs=1"], 4, 0.5),  # 10 steps/epoch: (4+1)/10
        (["train.schedule=constant", "train.warmup_epochs=0"], 7, 1.0),
        (["train.schedule=step", "train.milestones=[1, 2]", "train.epochs=3", "train.warmup_epochs=0"], 15, 0.1),
        (["train.schedule=step", "train.milestones=[1, 2]", "train.epochs=3", "train.warmup_epochs=0"], 25, 0.01),
        (["train.schedule=cosine", "train.epochs=2", "train.warmup_epochs=0"], 10, 0.5),
        (["train.schedule=cosine", "train.epochs=2", "train.warmup_epochs=0"], 20, 0.0),
        (["train.schedule=cosine", "train.epochs=3"], 20, 0.5),  # the default 1-epoch warm-up, then cosine
    ],
)
def test_lr_schedules(overrides, step, expected):
    config = load_config(None, overrides)
    assert engine.lr_factor(step=step, steps_per_epoch=10, config=config) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("loss", ["two_head", "ce"])
def test_cpu_training_reports_every_metric(loss, smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, f"loss.name={loss}", f"run.name={loss}")
    lines: list[str] = []
    result = engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lines.append)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert any("img/s" in line for line in lines)
    doc = json.loads((tmp_path / loss / "metrics.json").read_text())
    test = doc["test"]
    for name in ("avg_k_accuracy", "macro_avg_k_accuracy", "avg_set_size", "top_k_accuracy",
                 "macro_top_k_accuracy", "oracle_avg_k_accuracy", "gap_to_oracle", "empty_set_fraction",
                 "set_size_histogram"):
        assert set(test[name]) == {"1", "2", "3"}, name
    assert set(test["by_frequency"]) == {"few", "medium", "many"}
    assert test["num_samples"] == 400
    # Learned something: well above the 1/20 chance level, below the Bayes ceiling.
    assert 0.2 < test["avg_k_accuracy"]["2"] <= test["oracle_avg_k_accuracy"]["2"] + 0.05
    thresholds = json.loads((tmp_path / loss / "thresholds.json").read_text())
    assert thresholds["thresholds"] == doc["val"]["thresholds"]


def test_thresholds_equal_the_full_sort_of_val_scores(smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, "run.name=calib")
    parts = engine.build_parts(config, device=torch.device("cpu"))
    chunks = evaluation.score_split(parts, "val")
    run = evaluation.local_runner({"val": chunks}, reduce=lambda a: a)
    calibrated = passes.calibrate(run, "val", ks=[1, 1.5, 2, 3])
    scores = np.concatenate([c.scores_NL for c in chunks])
    assert calibrated == reference_thresholds(scores, [1, 1.5, 2, 3])


def test_bf16_autocast_trains_on_cpu(smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, "train.amp=bf16", "train.epochs=1", "run.name=bf16")
    result = engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
    assert np.isfinite(result.history[0]["train_loss"])


def test_non_finite_loss_stops_with_step_and_keys(smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, "train.lr=1e30", "train.schedule=constant", "run.name=nan",
                   "train.optimizer=sgd", "train.momentum=0")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at epoch 0 step \d+; batch keys \['train-"):
        engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)


def test_resume_continues_from_the_latest_checkpoint(smoke_shards, tmp_path):
    config = smoke(smoke_shards, tmp_path, "train.epochs=1", "run.name=resume")
    engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
    longer = smoke(smoke_shards, tmp_path, "train.epochs=2", "run.name=resume")
    lines: list[str] = []
    result = engine.fit(longer, reporter=checkpoints.LocalReporter(longer.run_dir), log=lines.append)
    assert any("resuming resume from epoch 2" in line for line in lines)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_loaders_normalise_in_workers_on_cpu_and_on_the_device_elsewhere():
    assert inputs.normalize_in_loader(torch.device("cpu"))
    assert not inputs.normalize_in_loader(torch.device("cuda", 0))
    assert inputs.model_input(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), device=torch.device("cpu"),
                              config=load_config(None)).dtype == torch.float32


@pytest.mark.parametrize("channels_last", ["true", "false"])
def test_uint8_batches_normalised_by_the_engine_score_as_loader_normalised_ones(
    smoke_shards, tmp_path, monkeypatch, channels_last
):
    # On a GPU the loaders leave images uint8 and model_input normalises them on the device:
    # the scores must equal those of the CPU path (normalised in the loader), as predict sees.
    config = smoke(smoke_shards, tmp_path, "run.name=uint8", f"model.channels_last={channels_last}")
    parts = engine.build_parts(config, device=torch.device("cpu"))
    float_chunks = evaluation.score_split(parts, "val")
    monkeypatch.setattr(evaluation, "normalize_in_loader", lambda device: False)
    uint8_chunks = evaluation.score_split(parts, "val")
    assert len(uint8_chunks) == len(float_chunks) > 0
    for u, f in zip(uint8_chunks, float_chunks, strict=True):
        np.testing.assert_array_equal(u.labels_N, f.labels_N)
        np.testing.assert_array_equal(u.scores_NL, f.scores_NL)


def test_training_on_uint8_batches_follows_the_same_path(smoke_shards, tmp_path, monkeypatch):
    histories = []
    for in_loader in (True, False):
        for module in (engine, evaluation):  # the training loader and the validation loaders
            monkeypatch.setattr(module, "normalize_in_loader", lambda device, flag=in_loader: flag)
        config = smoke(smoke_shards, tmp_path, "train.epochs=1", f"run.name=in_loader_{in_loader}")
        result = engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
        histories.append([(h["train_loss"], h["val_avg_k_accuracy"]) for h in result.history])
    assert histories[0] == histories[1]
