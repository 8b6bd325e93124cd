"""The bad-input suite: every case is one `avgk` command as a user types it, run through the CLI's
own entry point in this process. Each must exit 2 with one line naming the value and the rule,
before anything is written or started: no run folder, no new data, no Ray, no child process."""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import SMOKE

S = str(SMOKE)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """Prepared smoke shards and the bad files the cases point at."""
    from avgk.config import load_config
    from avgk.data.prepare import prepare

    root = tmp_path_factory.mktemp("bad")
    prepare(load_config(SMOKE, [f"data.shards={root / 'shards'}"]), progress=False)
    (root / "afile").write_text("x")
    (root / "notckpt.pt").write_text("not a checkpoint")
    (root / "bad.yaml").write_text("data: [1,\n")
    (root / "cfgdir").mkdir()
    (root / "badmanifest").mkdir()
    (root / "badmanifest" / "manifest.json").write_text('{"splits": ')
    (root / "sweep.yaml").write_text("base: configs/smoke.yaml\nsearch: {train.lr: {bogus: [1]}}\n")
    return root


def _train(*overrides: str) -> list[str]:
    return ["train", S, "data.shards={T}/shards", "run.storage={T}/runs", "tracking.enabled=false", *overrides]


CASES = {
    # config values: type, range, choice
    "k at least the class count": (_train("loss.k=40"), "loss.k must be < number of classes 20, got 40"),
    "unknown key": (_train("loss.nope=1"), "unknown key 'loss.nope'"),
    "negative lr": (_train("train.lr=-0.1"), "train.lr=-0.1: Input should be greater than 0"),
    "negative K": (_train("loss.k=-1"), "loss.k=-1"),
    "zero epochs": (_train("train.epochs=0"), "train.epochs=0"),
    "zero workers": (_train("train.num_workers=0"), "train.num_workers=0"),
    "batch not divisible by workers": (_train("train.num_workers=3"), "must be divisible by train.num_workers (3)"),
    "K of zero in eval.ks": (_train("eval.ks=[0]"), "every K in eval.ks must be > 0"),
    "duplicate eval.ks": (_train("eval.ks=[2,2]"), "eval.ks has duplicates"),
    "unknown optimizer": (_train("train.optimizer=rmsprop"), "train.optimizer='rmsprop'"),
    "crop too small": (_train("data.crop=0"), "data.crop=0"),
    "crop above resize": (_train("data.crop=32"), "data.crop must be <= data.resize"),
    "unknown amp dtype": (_train("train.amp=fp8"), "train.amp='fp8'"),
    "unknown loss": (_train("loss.name=nope"), "loss.name='nope' is not a registered loss"),
    "mean of one number": (_train("data.mean=[0.5]"), "data.mean must be 3 numbers (R, G, B), got [0.5]"),
    "std not positive": (_train("data.std=[0.2,0,0.2]"), "data.std values must all be > 0"),
    "crop scale reversed": (_train("data.crop_scale=[0.9,0.1]"), "data.crop_scale must be (min, max)"),
    "unknown auto augment": (_train("data.auto_augment=bogus"), "data.auto_augment='bogus'"),
    "mixup with two_head": (_train("train.mixup_alpha=0.2"), "need loss.name=ce"),
    "label smoothing of 1.5": (_train("loss.label_smoothing=1.5"), "loss.label_smoothing=1.5"),
    "EMA decay of 1.5": (_train("train.ema_decay=1.5"), "train.ema_decay=1.5"),
    "negative head lr scale": (_train("train.lr_scale.multilabel=-1"), "train.lr_scale.multilabel=-1"),
    "warm-up longer than training": (_train("train.warmup_epochs=10"), "train.warmup_epochs=10 must be <= train.epochs=2"),
    "milestones past the end": (_train("train.schedule=step", "train.milestones=[5]"), "train.milestones must be"),
    "unknown checkpoint choice": (_train("eval.checkpoint=worst"), "eval.checkpoint='worst'"),
    "negative loader workers": (_train("data.loader_workers=-1"), "data.loader_workers=-1"),
    "run name with a slash": (_train("run.name=a/b"), "run.name must be a plain folder name"),
    "unknown resume mode": (_train("run.resume=bogus"), "run.resume='bogus'"),
    "malformed override value": (_train("data.crop_scale=[0.5,"), "the value is not valid YAML"),
    # the config file itself
    "config is a folder": (["train", "{T}/cfgdir"], "is a directory"),
    "config does not exist": (["train", "{T}/nope.yaml"], "does not exist"),
    "config is not YAML": (["train", "{T}/bad.yaml"], "is not valid YAML"),
    # checks against the data, on the driver
    "K x N below one": (_train("loss.k=0.0001"), "K x N must be >= 1"),
    "batch larger than the data": (_train("train.batch_size=100000"), "exceeds the 1000 training samples"),
    "accumulation beyond the data": (_train("train.grad_accumulation=1000"), "train.grad_accumulation=1000"),
    "corrupt manifest": (["train", S, "data.shards={T}/badmanifest", "run.storage={T}/runs"], "is not valid JSON"),
    "shards path is a file": (["train", S, "data.shards={T}/afile", "run.storage={T}/runs"], "is a file, not a folder"),
    # the model
    "backbone name form": (_train("model.backbone=foo"), "model.backbone='foo' must be"),
    "unknown timm backbone": (_train("model.backbone=timm:nonexistent_net"), "timm has no model 'nonexistent_net'"),
    "pretrained weights missing": (_train("model.pretrained={T}/nope.pt"), "model.pretrained='{T}/nope.pt' does not exist"),
    "pretrained file not weights": (_train("model.pretrained={T}/notckpt.pt"), "is not a readable weights file"),
    "pretrained folder not a run": (_train("model.pretrained={T}/cfgdir"), "not an avgk run directory"),
    # where the run goes and what it needs
    "run storage under a file": (["train", S, "data.shards={T}/shards", "run.storage={T}/afile/runs"],
                                 "a file: run.storage must be a folder"),
    "tracking server unreachable": (["train", S, "data.shards={T}/shards", "run.storage={T}/runs",
                                     "tracking.uri=http://127.0.0.1:9"], "is not reachable"),
    "GPU without a GPU": (_train("train.use_gpu=true"),
                          "needs that many GPUs, RAY_ADDRESS names no cluster and this machine has 0"),
    # avgk prepare
    "one class": (["prepare", S, "data.shards={T}/new", "data.synthetic.num_classes=1"], "data.synthetic.num_classes=1"),
    "unknown source": (["prepare", S, "data.shards={T}/new", "data.source=bogus"], "data.source='bogus'"),
    "source without root": (["prepare", S, "data.shards={T}/new", "data.source=imagefolder"], "data.root is required"),
    "image root missing": (["prepare", S, "data.shards={T}/new", "data.source=imagefolder", "data.root={T}/noroot"],
                           "data.root='{T}/noroot' does not exist"),
    "prepare over a file": (["prepare", S, "data.shards={T}/afile"], "is a file, not a folder"),
    # the other commands
    "evaluate a missing run": (["evaluate", S, "data.shards={T}/shards", "--run", "{T}/runs/none"],
                               "does not exist: train it first"),
    "predict with a missing run": (["predict", "--run", "{T}/runs/none", "--k", "2", "{T}"], "does not exist: train it first"),
    "sweep file missing": (["tune", "{T}/nope.yaml"], "sweep config file '{T}/nope.yaml' does not exist"),
    "study file missing": (["study", "{T}/nope.yaml"], "study config file '{T}/nope.yaml' does not exist"),
}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_any_work(case, place, capsys, monkeypatch):
    from pipelines import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv, message = CASES[case]
    argv = [a.replace("{T}", str(place)) for a in argv]
    message = message.replace("{T}", str(place))
    before = _digest(place)
    children = set(multiprocessing.active_children())

    code = cli.main(argv)

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("avgk: error: "), err
    assert message in err[0], err[0]
    assert _digest(place) == before, "the command wrote or changed files"
    assert set(multiprocessing.active_children()) == children
    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized(), "Ray was started"


def test_the_suite_holds_at_least_45_cases():
    assert len(CASES) >= 45, len(CASES)
