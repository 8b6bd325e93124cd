"""Shared fixtures: tiny synthetic shards built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray resolves "127.0.0.1" in a cluster address to the machine's routable address unless told it
# runs single-host; tests must stay on loopback (a simulated multi-node cluster included).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # avgk.data.shards silences this for the process; pytest re-enables DeprecationWarnings per test.
    # torchvision 0.29 warns on every call of its (deprecated, still shipped) image decoders.
    config.addinivalue_line(
        "filterwarnings", "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
    )


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """Shards of configs/smoke.yaml's synthetic data, written once."""
    from avgk.config import load_config
    from pipelines.prepare import prepare

    shards = tmp_path_factory.mktemp("smoke") / "shards"
    config = load_config(ROOT / "configs" / "smoke.yaml", [f"data.shards={shards}"])
    prepare(config)
    return shards


@pytest.fixture(scope="session")
def predict_smoke_run(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, run directory) of one in-process smoke training: the prediction and pyfunc tests' model."""
    from tests.unit.test_predict import prepare_shards, train_smoke_run

    shards = prepare_shards(tmp_path_factory.mktemp("predict_data") / "shards")
    return shards, train_smoke_run(shards, tmp_path_factory.mktemp("predict_runs"))
