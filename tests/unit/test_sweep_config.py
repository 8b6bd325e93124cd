"""Sweep configs: parsing, search-space validation against Config, and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from avgk.config import ConfigError
from avgk.experiments.sweep_config import Domain, SweepConfigError, check_key, load_sweep
from tests.helpers.runs import ROOT

SWEEPS = ROOT / "configs" / "sweeps"


def write_sweep(tmp_path: Path, **fields) -> Path:
    tree = {"name": "s", "base": str(ROOT / "configs" / "smoke.yaml"), "space": {"train.lr": {"choice": [0.01]}}}
    tree.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("name", ["smoke.yaml", "two_head.yaml"])
def test_shipped_sweeps_load(name):
    sweep, base = load_sweep(SWEEPS / name)
    assert sweep.space and sweep.num_samples >= 1
    assert base.train.epochs >= sweep.scheduler.grace_period


def test_smoke_sweep_resolves_base_relative_to_the_sweep_file_and_routes_overrides():
    sweep, base = load_sweep(SWEEPS / "smoke.yaml", ["num_samples=1", "scheduler.name=fifo", "train.batch_size=20"])
    assert sweep.num_samples == 1 and sweep.scheduler.name == "fifo"  # sweep keys
    assert base.train.batch_size == 20  # config keys change the base
    assert base.train.epochs == 3  # the sweep's own overrides
    assert base.data.synthetic.num_classes == 20  # from configs/smoke.yaml
    assert sweep.space["train.lr"] == Domain(kind="grid", values=[0.05, 0.002])


def test_base_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, base="configs/smoke.yaml")
    _, base = load_sweep(path)
    assert base.run.name == "smoke"


@pytest.mark.parametrize(
    "kind, values, probes",
    [
        ("choice", [1.5, 2, 3], [1.5, 2, 3]),
        ("grid", ["sum", "mean"], ["sum", "mean"]),
        ("uniform", [0.0, 1.0], [0.0, 1.0, 0.5]),
        ("loguniform", [0.1, 10], [0.1, 10.0, 1.0]),
        ("randint", [1, 5], [1, 4]),  # high excluded, as in ray.tune.randint
        ("quniform", [0.2, 1.0, 0.2], [0.2, 1.0]),
    ],
)
def test_probe_values(kind, values, probes):
    assert Domain(kind=kind, values=values).probe_values() == pytest.approx(probes)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"loss.ml_wieght": {"loguniform": [0.1, 10]}}, "unknown config key 'loss.ml_wieght'; did you mean 'loss.ml_weight'?"),
        ({"loss": {"choice": [1]}}, "'loss' is a config section"),
        ({"train.lr": {"loguniform": [0, 1]}}, "space['train.lr']: loguniform: [low, high] needs low > 0, got [0, 1]"),
        ({"train.lr": {"uniform": [1, 0.5]}}, "needs low < high, got [1, 0.5]"),
        ({"train.lr": {"uniform": [1]}}, "needs 2 numbers, got [1]"),
        ({"train.epochs": {"randint": [1, 2.5]}}, "needs integers"),
        ({"train.lr": {"normal": [0, 1]}}, "space['train.lr'] must be a mapping with exactly one of choice, grid"),
        ({"train.lr": 0.1}, "space['train.lr'] must be a mapping"),
        ({"train.lr": {"choice": []}}, "space['train.lr']"),
        ({"train.lr": {"uniform": [-1, 1]}}, "space['train.lr'] = -1.0 (from uniform [-1, 1]): train.lr=-1.0"),
        ({"loss.pseudo_k": {"choice": [2, 30]}},
         "space['loss.pseudo_k'] = 30 (from choice [2, 30]): loss.pseudo_k must be < number of classes 20"),
        ({"loss.ml_reduction": {"choice": ["sum", "max"]}}, "space['loss.ml_reduction'] = 'max'"),
        ({"train.optimizer": {"grid": ["sgd", "adam"]}}, "space['train.optimizer'] = 'adam'"),
    ],
)
def test_bad_space_is_one_line_naming_key_value_and_rule(tmp_path, space, message):
    with pytest.raises(SweepConfigError) as info:
        load_sweep(write_sweep(tmp_path, space=space))
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_space_values_are_checked_together(tmp_path):
    # Each value alone is valid; the last values together are not (batch 50 over 3 workers).
    space = {"train.batch_size": {"choice": [48, 50]}, "train.num_workers": {"choice": [1, 3]}}
    with pytest.raises(SweepConfigError, match=r"together: train: train.batch_size \(50\) must be divisible"):
        load_sweep(write_sweep(tmp_path, space=space))


@pytest.mark.parametrize(
    "fields, overrides, message",
    [
        ({"nme": "x"}, [], "unknown key 'nme'"),
        ({"name": "a/b"}, [], "name must be a plain folder name"),
        ({"num_samples": 0}, [], "num_samples=0"),
        ({"scheduler": {"name": "hyperband"}}, [], "scheduler.name='hyperband'"),
        ({"scheduler": {"reduction_factor": 1}}, [], "scheduler.reduction_factor=1"),
        ({"trial_cpus": 0}, [], "trial_cpus=0"),
        ({"base": "nope.yaml"}, [], "base='nope.yaml' is neither relative to"),
        ({"overrides": {"train.lr": 0.1}}, [], "keys both searched and fixed in overrides: ['train.lr']"),
        ({"overrides": {"train.epoch": 3}}, [], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
        ({"overrides": {"train.epochs": 0}}, [], "train.epochs=0"),
        ({}, ["train.lr"], "must look like key.sub=value"),
        ({}, ["train.nope=1"], "unknown key 'train.nope'"),
        ({}, ["schedular.name=fifo"], "unknown key 'schedular'"),
    ],
)
def test_bad_sweep_fields(tmp_path, fields, overrides, message):
    with pytest.raises(ConfigError) as info:  # SweepConfigError, or the base config's own error
        load_sweep(write_sweep(tmp_path, **fields), overrides)
    assert message in str(info.value), str(info.value)


def test_missing_file():
    with pytest.raises(SweepConfigError, match="does not exist"):
        load_sweep("nope/sweep.yaml")


@pytest.mark.parametrize("key", ["train.lr", "loss.pseudo_k", "data.synthetic.num_classes", "train.extra_resources.node"])
def test_known_keys(key):
    check_key(key)


def test_flat_params_for_the_parent_run():
    sweep, _ = load_sweep(SWEEPS / "smoke.yaml")
    flat = sweep.flat()
    assert flat["sweep.num_samples"] == 2
    assert flat["sweep.scheduler.name"] == "asha"
    assert flat["sweep.space.train.lr"] == "grid[0.05, 0.002]"
    assert flat["sweep.overrides.train.epochs"] == 3


def test_command_line_config_keys_win_over_the_sweep_files_overrides():
    # configs/sweeps/smoke.yaml fixes train.epochs: 3 in its overrides
    assert load_sweep(SWEEPS / "smoke.yaml")[1].train.epochs == 3
    assert load_sweep(SWEEPS / "smoke.yaml", ["train.epochs=1"])[1].train.epochs == 1
