"""Average-K / top-K metrics: reference formulas, a hand-computed example, and merging."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from avgk.evaluation.metrics import SetMetrics, average_k_accuracy, format_k
from avgk.method.thresholds import calibrate_thresholds


def reference_average_k_accuracy(probas: torch.Tensor, labels: torch.Tensor, lmbda: float) -> float:
    """The Pl@ntNet-300K count_correct_avgk, divided by N."""
    return torch.ge(torch.gather(probas, 1, labels.unsqueeze(1)), lmbda).sum().item() / labels.numel()


def softmax(rng: np.random.Generator, num_samples: int, num_classes: int) -> np.ndarray:
    logits_NL = rng.standard_normal((num_samples, num_classes)) * 2.0
    exp_NL = np.exp(logits_NL - logits_NL.max(axis=1, keepdims=True))
    return (exp_NL / exp_NL.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("k", "expected"), [(1, "1"), (1.0, "1"), (1.5, "1.5"), (10, "10"), (0.25, "0.25")])
def test_format_k(k: float, expected: str) -> None:
    assert format_k(k) == expected


def test_average_k_accuracy_equals_reference_formula() -> None:
    rng = np.random.default_rng(0)
    scores_NL = softmax(rng, 500, 30)
    # Few distinct values, so that thresholds land exactly on scores.
    tied_NL = rng.integers(0, 4, (500, 30)).astype(np.float32) / 4
    labels_N = rng.integers(0, 30, 500)
    for scores in (scores_NL, tied_NL):
        candidates = [float(scores[3, 4]), 0.1, 0.25, 0.5, 0.0, 1.0, *calibrate_thresholds(scores, [1, 2, 5]).values()]
        for threshold in candidates:
            expected = reference_average_k_accuracy(torch.from_numpy(scores), torch.from_numpy(labels_N), threshold)
            assert average_k_accuracy(scores=scores, labels=labels_N, threshold=threshold) == expected
            assert (
                average_k_accuracy(scores=torch.from_numpy(scores), labels=torch.from_numpy(labels_N), threshold=threshold)
                == expected
            )


# ---------------------------------------------------------------- hand-computed example

TINY_SCORES = np.array(
    [
        [0.5, 0.3, 0.1, 0.1],
        [0.2, 0.2, 0.4, 0.2],
        [0.7, 0.1, 0.1, 0.1],
    ],
    dtype=np.float32,
)
TINY_LABELS = np.array([1, 0, 0])
# Given directly (not calibrated) so that every set is easy to list by hand.
TINY_THRESHOLDS = {1: 0.375, 2: 0.15625, 1.5: 0.25, 3: 0.6}
TINY_TRAIN_COUNTS = np.array([5, 50, 500, 7])


def tiny_metrics() -> SetMetrics:
    metrics = SetMetrics(
        num_classes=4, ks=[1, 2, 1.5, 3], thresholds=TINY_THRESHOLDS, train_class_counts=TINY_TRAIN_COUNTS
    )
    metrics.update(scores_NL=TINY_SCORES, labels_N=TINY_LABELS)
    return metrics


def test_tiny_example_every_number() -> None:
    # Sets (K: rows 0, 1, 2), true label marked *:
    #   1   (0.375):   {0}, {2}, {0*}               in-set 0,0,1  sizes 1,1,1
    #   2   (0.15625): {0,1*}, {0*,1,2,3}, {0*}     in-set 1,1,1  sizes 2,4,1
    #   1.5 (0.25):    {0,1*}, {2}, {0*}            in-set 1,0,1  sizes 2,1,1
    #   3   (0.6):     {}, {}, {0*}                 in-set 0,0,1  sizes 0,0,1
    # Scores strictly above the true one: 1, 1 (ties with 0.2 do not count), 0.
    # Classes: 0 holds rows 1, 2; 1 holds row 0; 2 and 3 are absent.
    result = tiny_metrics().compute()
    by_frequency = result.pop("by_frequency")
    assert result == {
        "num_samples": 3,
        "avg_k_accuracy": {"1": 1 / 3, "2": 1.0, "1.5": 2 / 3, "3": 1 / 3},
        "macro_avg_k_accuracy": {"1": 0.25, "2": 1.0, "1.5": 0.75, "3": 0.25},
        "avg_set_size": {"1": 1.0, "2": 7 / 3, "1.5": 4 / 3, "3": 1 / 3},
        "top_k_accuracy": {"1": 1 / 3, "2": 1.0, "3": 1.0},
        "macro_top_k_accuracy": {"1": 0.25, "2": 1.0, "3": 1.0},
        "empty_set_fraction": {"1": 0.0, "2": 0.0, "1.5": 0.0, "3": 2 / 3},
        "set_size_histogram": {
            "1": {"1": 3},
            "2": {"1": 1, "2": 1, "4": 1},
            "1.5": {"1": 2, "2": 1},
            "3": {"0": 2, "1": 1},
        },
    }
    # Train counts 5, 50, 500, 7: few = classes 0 and 3 (3 absent), medium = 1, many = 2 (absent).
    assert by_frequency == {
        "few": {
            "num_classes": 1,
            "num_samples": 2,
            "avg_k_accuracy": {"1": 0.5, "2": 1.0, "1.5": 0.5, "3": 0.5},
            "macro_avg_k_accuracy": {"1": 0.5, "2": 1.0, "1.5": 0.5, "3": 0.5},
            "top_k_accuracy": {"1": 0.5, "2": 1.0, "3": 1.0},
            "macro_top_k_accuracy": {"1": 0.5, "2": 1.0, "3": 1.0},
        },
        "medium": {
            "num_classes": 1,
            "num_samples": 1,
            "avg_k_accuracy": {"1": 0.0, "2": 1.0, "1.5": 1.0, "3": 0.0},
            "macro_avg_k_accuracy": {"1": 0.0, "2": 1.0, "1.5": 1.0, "3": 0.0},
            "top_k_accuracy": {"1": 0.0, "2": 1.0, "3": 1.0},
            "macro_top_k_accuracy": {"1": 0.0, "2": 1.0, "3": 1.0},
        },
        "many": {
            "num_classes": 0,
            "num_samples": 0,
            "avg_k_accuracy": {},
            "macro_avg_k_accuracy": {},
            "top_k_accuracy": {},
            "macro_top_k_accuracy": {},
        },
    }


def test_tiny_example_per_class() -> None:
    columns = tiny_metrics().per_class()
    nan = math.nan
    expected = {
        "class_id": [0, 1, 2, 3],
        "num_samples": [2, 1, 0, 0],
        "train_count": [5, 50, 500, 7],
        "avg_k_accuracy@1": [0.5, 0.0, nan, nan],
        "avg_k_accuracy@2": [1.0, 1.0, nan, nan],
        "avg_k_accuracy@1.5": [0.5, 1.0, nan, nan],
        "avg_k_accuracy@3": [0.5, 0.0, nan, nan],
        "top_k_accuracy@1": [0.5, 0.0, nan, nan],
        "top_k_accuracy@2": [1.0, 1.0, nan, nan],
        "top_k_accuracy@3": [1.0, 1.0, nan, nan],
    }
    assert list(columns) == list(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(columns[name], np.array(values), err_msg=name)


def test_tiny_example_matches_average_k_accuracy() -> None:
    result = tiny_metrics().compute()
    for k, threshold in TINY_THRESHOLDS.items():
        direct = average_k_accuracy(scores=TINY_SCORES, labels=TINY_LABELS, threshold=threshold)
        assert result["avg_k_accuracy"][format_k(k)] == direct


# ---------------------------------------------------------------- merging


def assert_same_results(actual: SetMetrics, expected: SetMetrics) -> None:
    assert actual.compute() == expected.compute()
    actual_columns, expected_columns = actual.per_class(), expected.per_class()
    assert list(actual_columns) == list(expected_columns)
    for name in expected_columns:
        np.testing.assert_array_equal(actual_columns[name], expected_columns[name], err_msg=name)


def test_merged_partitions_equal_whole() -> None:
    rng = np.random.default_rng(1)
    num_classes = 25
    scores_NL = softmax(rng, 900, num_classes)
    labels_N = rng.integers(0, num_classes - 3, 900)  # the last three classes are absent
    ks = [1, 2, 3, 1.5]
    config = dict(
        num_classes=num_classes,
        ks=ks,
        thresholds=calibrate_thresholds(scores_NL, ks),
        train_class_counts=rng.integers(0, 200, num_classes),
        freq_bins=(20, 100),
    )
    whole = SetMetrics(**config)
    whole.update(scores_NL=scores_NL, labels_N=labels_N)

    bounds = [0, 100, 101, 640, 900]
    parts = []
    for start, stop in itertools.pairwise(bounds):
        part = SetMetrics(**config)
        # Batches inside a partition, one of them as torch tensors.
        part.update(scores_NL=torch.from_numpy(scores_NL[start:stop]), labels_N=torch.from_numpy(labels_N[start:stop]))
        part.update(scores_NL=scores_NL[:0], labels_N=labels_N[:0])
        parts.append(part)

    merged = SetMetrics(**config)
    for part in parts:
        merged.merge(part)
    assert_same_results(merged, whole)

    summed = {name: sum(part.state()[name] for part in parts) for name in whole.state()}
    loaded = SetMetrics(**config)
    loaded.load_state(summed)
    assert_same_results(loaded, whole)
    assert all(counts.dtype == np.int64 for counts in whole.state().values())


def test_merge_and_load_state_reject_mismatches() -> None:
    config = dict(num_classes=4, ks=[1, 2], thresholds={1: 0.5, 2: 0.25})
    metrics = SetMetrics(**config)
    with pytest.raises(ValueError, match="same num_classes, ks, thresholds"):
        metrics.merge(SetMetrics(**{**config, "thresholds": {1: 0.5, 2: 0.2}}))
    state = metrics.state()
    with pytest.raises(ValueError, match=r"missing \['num_in_set_L@2'\]"):
        metrics.load_state({name: v for name, v in state.items() if name != "num_in_set_L@2"})
    with pytest.raises(ValueError, match=r"state\['num_samples_L'\] must be an integer array of shape \(4,\)"):
        metrics.load_state({**state, "num_samples_L": np.zeros(5, dtype=np.int64)})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bad_label", [4, -1, 17])
def test_labels_outside_range_raise(bad_label: int) -> None:
    metrics = SetMetrics(num_classes=4, ks=[1], thresholds={1: 0.5})
    labels_N = np.array([0, bad_label, 2])
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 4\), got {bad_label}"):
        metrics.update(scores_NL=TINY_SCORES, labels_N=labels_N)
    with pytest.raises(ValueError, match=rf"got {bad_label}"):
        average_k_accuracy(scores=TINY_SCORES, labels=labels_N, threshold=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(freq_bins=(100, 20)), "freq_bins must be two increasing positive counts"),
        (dict(freq_bins=(0, 20)), "freq_bins must be two increasing positive counts"),
        (dict(freq_bins=(20, 20)), "freq_bins must be two increasing positive counts"),
        (dict(thresholds={1: 0.5}), r"thresholds has no entry for K=\[2.0\]"),
        (dict(train_class_counts=np.array([1, 2, 3])), r"train_class_counts must have shape \(4,\)"),
        (dict(train_class_counts=np.array([1, 2, 3, -1])), "non-negative integers"),
        (dict(num_classes=0), "num_classes must be >= 1, got 0"),
        (dict(ks=[1, 2, -1]), "got -1.0"),
    ],
)
def test_bad_configuration_raises(kwargs: dict, message: str) -> None:
    config = dict(num_classes=4, ks=[1, 2], thresholds={1: 0.5, 2: 0.25}, train_class_counts=np.arange(4))
    with pytest.raises(ValueError, match=message):
        SetMetrics(**{**config, **kwargs})


def test_bad_batches_raise() -> None:
    metrics = SetMetrics(num_classes=4, ks=[1], thresholds={1: 0.5})
    with pytest.raises(ValueError, match=r"must have L=4 columns, got shape \(3, 5\)"):
        metrics.update(scores_NL=np.zeros((3, 5)), labels_N=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        metrics.update(scores_NL=TINY_SCORES, labels_N=np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="labels must be integers"):
        metrics.update(scores_NL=TINY_SCORES, labels_N=np.zeros(3))
    with pytest.raises(ValueError, match="needs at least one sample"):
        metrics.compute()


def test_no_train_counts_means_no_frequency_bins() -> None:
    metrics = SetMetrics(num_classes=4, ks=[1], thresholds={1: 0.375})
    metrics.update(scores_NL=TINY_SCORES, labels_N=TINY_LABELS)
    assert "by_frequency" not in metrics.compute()
    assert "train_count" not in metrics.per_class()


def test_non_integer_k_has_no_top_k_entries() -> None:
    metrics = SetMetrics(num_classes=4, ks=[1.5], thresholds={1.5: 0.25})
    metrics.update(scores_NL=TINY_SCORES, labels_N=TINY_LABELS)
    result = metrics.compute()
    assert result["top_k_accuracy"] == {} and result["macro_top_k_accuracy"] == {}
    assert [name for name in metrics.per_class() if name.startswith("top_k")] == []


# ---------------------------------------------------------------- oracle


def test_oracle_on_true_posteriors_beats_a_noisy_model() -> None:
    """The oracle: SetMetrics on true posteriors, thresholds calibrated on validation posteriors."""
    rng = np.random.default_rng(2)
    num_classes, ks = 20, [1, 2, 3]

    def split(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        posterior_NL = rng.dirichlet(np.full(num_classes, 0.3), size=num_samples).astype(np.float32)
        labels_N = (posterior_NL.cumsum(axis=1) < rng.random((num_samples, 1))).sum(axis=1)
        labels_N = np.minimum(labels_N, num_classes - 1)
        # A model that sees the posterior through noise: consistent but not Bayes-optimal.
        noisy_NL = np.log(posterior_NL + 1e-6) + rng.standard_normal(posterior_NL.shape) * 1.5
        return posterior_NL, labels_N, noisy_NL.astype(np.float32)

    val_posterior, _, val_model = split(4000)
    test_posterior, test_labels, test_model = split(4000)

    oracle = SetMetrics(num_classes=num_classes, ks=ks, thresholds=calibrate_thresholds(val_posterior, ks))
    oracle.update(scores_NL=test_posterior, labels_N=test_labels)
    model = SetMetrics(num_classes=num_classes, ks=ks, thresholds=calibrate_thresholds(val_model, ks))
    model.update(scores_NL=test_model, labels_N=test_labels)
    oracle_result, model_result = oracle.compute(), model.compute()

    oracle_thresholds = calibrate_thresholds(val_posterior, ks)
    for k in ks:
        key = format_k(k)
        assert oracle_result["avg_k_accuracy"][key] > model_result["avg_k_accuracy"][key] + 0.02
        assert abs(oracle_result["avg_set_size"][key] - k) < 0.15
        # With labels drawn from the posterior, accuracy estimates the posterior mass inside the sets.
        in_set_mass = np.where(test_posterior >= oracle_thresholds[float(k)], test_posterior, 0).sum(axis=1).mean()
        assert abs(oracle_result["avg_k_accuracy"][key] - in_set_mass) < 0.03
