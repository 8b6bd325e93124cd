"""The default recipe of each loss trains on every learnable data set of the suite: its val
average-K accuracy leaves the class-prior level (what a model that ignores the image gets).

The data sets: avgk's synthetic data (smoke size) and pairs of real handwritten digits
(avgk/data/sources/digits.py: 100 long-tailed classes, images avgk did not generate, no flips since
a mirrored digit is another digit). Only the data size and the number of epochs are set here;
everything else is each loss's default recipe.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from avgk.config import load_config
from avgk.data.manifest import read_manifest
from avgk.data.sources.digits import write_digit_pairs
from avgk.training import checkpoints, engine
from tests.helpers.prior import prior_avg_k_accuracy

pytestmark = pytest.mark.slow

# Margin over the prior level, as a share of what is left above it: a model at the prior scores 0.
MIN_SHARE_ABOVE_PRIOR = 0.3


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    from avgk.data.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    write_digit_pairs(root / "images", num_train=2000, num_val=500, num_test=200, ambiguity=0.3, seed=0)
    prepare(load_config(None, ["data.source=imagefolder", f"data.root={root / 'images'}",
                               f"data.shards={root / 'shards'}", "data.resize=16", "data.crop=16"]), progress=False)
    return root / "shards"


DATA = {
    "synthetic": lambda shards, digits: [f"data.shards={shards}", "data.resize=16", "data.crop=16"],
    # A prepared folder needs no source keys: its manifest says what it holds.
    "digits": lambda shards, digits: [f"data.shards={digits}", "data.resize=16", "data.crop=16", "data.hflip=false"],
}


# The paper's loss as specified, under SGD: what the default recipe replaced.
PAPER_RECIPE = ["train.optimizer=sgd", "train.warmup_epochs=0", "loss.ml_reduction=sum", "train.lr_scale.multilabel=1"]


def share_above_prior(overrides: list[str]) -> tuple[float, float, float]:
    """(best val avg-2, prior level, share of the way from the prior level to 1) of a 4-epoch run."""
    config = load_config(None, [*overrides, "train.epochs=4", "train.batch_size=64", "eval.ks=[2]",
                                "data.loader_workers=0", "run.name=run", "tracking.enabled=false"])
    manifest = read_manifest(config.data.shards)
    prior = prior_avg_k_accuracy(train_counts=manifest.split("train").class_counts,
                                 eval_counts=manifest.split("val").class_counts, k=2)
    result = engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
    best = max(h["val_avg_k_accuracy"] for h in result.history)
    return best, prior, (best - prior) / (1 - prior)


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("loss", ["two_head", "ce"])
def test_the_default_recipe_leaves_the_class_prior(data, loss, smoke_shards, digit_shards, tmp_path):
    best, prior, share = share_above_prior(
        [*DATA[data](smoke_shards, digit_shards), f"loss.name={loss}", f"run.storage={tmp_path}"]
    )
    assert share >= MIN_SHARE_ABOVE_PRIOR, (
        f"{loss} on {data}: best val avg-2 {best:.3f} against the prior level {prior:.3f} "
        f"({share:.2f} of the way to 1, needs {MIN_SHARE_ABOVE_PRIOR})"
    )


def test_the_check_catches_the_papers_recipe_on_real_digits(smoke_shards, digit_shards, tmp_path):
    """The same check fails the recipe the defaults replaced: it tells a starved model from a trained one."""
    best, prior, share = share_above_prior(
        [*DATA["digits"](smoke_shards, digit_shards), "loss.name=two_head", *PAPER_RECIPE, f"run.storage={tmp_path}"]
    )
    assert share < MIN_SHARE_ABOVE_PRIOR, f"best val avg-2 {best:.3f}, prior level {prior:.3f}, share {share:.2f}"


def test_the_prior_level_is_the_accuracy_of_the_k_most_frequent_classes():
    assert prior_avg_k_accuracy(train_counts=[5, 50, 20], eval_counts=[10, 60, 30], k=1) == pytest.approx(0.6)
    assert prior_avg_k_accuracy(train_counts=[5, 50, 20], eval_counts=[10, 60, 30], k=2) == pytest.approx(0.9)
    assert prior_avg_k_accuracy(train_counts=[5, 50, 20], eval_counts=[10, 60, 30], k=1.5) == pytest.approx(0.75)
