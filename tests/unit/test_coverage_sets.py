"""Coverage-guaranteed label sets (avgk.method.coverage_sets) against plain NumPy references, ties included,
and the coverage's finite-sample law over many random calibration sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avgk.method import coverage_sets as cs


def _probs(rng: np.random.Generator, n: int, num_labels: int, *, ties: bool = False) -> np.ndarray:
    logits = rng.normal(size=(n, num_labels)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:  # few distinct values: ties within rows and across samples
        probs = np.round(probs * 8) / 8 + 1e-3
        probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(np.float32)


@pytest.mark.parametrize(("n", "alpha", "m"), [(9, 0.1, 9), (10, 0.1, 10), (99, 0.05, 95), (5, 0.1, 6), (0, 0.5, 1)])
def test_the_conformal_rank_is_the_finite_sample_quantile(n, alpha, m):
    assert cs.conformal_rank(n=n, alpha=alpha) == m


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan")])
def test_a_coverage_target_outside_zero_one_is_one_line(alpha):
    with pytest.raises(ValueError, match=r"a coverage target must lie strictly between 0 and 1 \(alpha = 1 - coverage\)"):
        cs.conformal_rank(n=10, alpha=alpha)


@pytest.mark.parametrize("ties", [False, True])
def test_lac_threshold_matches_the_sorted_reference_and_covers_m_calibration_samples(ties):
    rng = np.random.default_rng(0)
    probs = _probs(rng, 500, 12, ties=ties)
    labels = rng.integers(0, 12, size=500)
    true = probs[np.arange(500), labels]
    for alpha in (0.01, 0.1, 0.3):
        m = math.ceil(501 * (1 - alpha))
        t = cs.lac_threshold(true_scores_N=true, alpha=alpha)
        assert t == np.sort(true)[::-1][m - 1]
        assert (true >= t).sum() >= m
    assert cs.lac_threshold(true_scores_N=true[:5], alpha=0.1) == cs.FULL  # m = 6 > 5: the full label set


@pytest.mark.parametrize(("penalty", "k_reg"), [(0.0, 0), (0.05, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_aps_and_raps_match_a_sample_by_sample_reference(penalty, k_reg, ties):
    rng = np.random.default_rng(1)
    probs = _probs(rng, 200, 7, ties=ties)
    labels = rng.integers(0, 7, size=200)

    def reference(row: np.ndarray, label: int) -> float:
        order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))  # decreasing, ties by label id
        rank = order.index(label) + 1
        return float(sum(float(row[j]) for j in order[:rank])) + penalty * max(rank - k_reg, 0)

    conformity = cs.aps_conformity(probs_NL=probs, labels_N=labels, penalty=penalty, k_reg=k_reg)
    expected = [reference(probs[i], int(labels[i])) for i in range(200)]
    np.testing.assert_allclose(conformity, expected, rtol=0, atol=1e-6)
    q = cs.conformity_quantile(conformity_N=conformity, alpha=0.1)
    members = cs.aps_sets(probs_NL=probs, q=q, penalty=penalty, k_reg=k_reg)
    for i in range(20):
        assert [bool(members[i, label]) for label in range(7)] == [reference(probs[i], label) <= q for label in range(7)]
    covered = members[np.arange(200), labels]
    assert np.array_equal(covered, conformity <= q)  # the true label is in its set exactly when its score is <= q
    assert covered.sum() >= math.ceil(201 * 0.9)


def test_class_thresholds_per_class_with_rare_classes_pooled():
    rng = np.random.default_rng(2)
    labels = np.concatenate([np.zeros(50, int), np.ones(40, int), np.full(3, 2), np.full(2, 3)])  # class 4: none
    true = rng.random(labels.size).astype(np.float32)
    result = cs.class_thresholds(true_scores_N=true, labels_N=labels, num_classes=5, alpha=0.1, min_count=10)
    assert result.pooled == (2, 3, 4)
    for c in (0, 1):
        assert result.thresholds_L[c] == cs.lac_threshold(true_scores_N=true[labels == c], alpha=0.1)
    pooled = cs.lac_threshold(true_scores_N=true[labels >= 2], alpha=0.1)  # 5 samples: m = 6 > 5
    assert pooled == cs.FULL and np.all(result.thresholds_L[2:] == cs.FULL)
    assert result.counts_L.tolist() == [50, 40, 3, 2, 0]


def test_lac_coverage_follows_its_beta_law_over_random_calibration_sets():
    """Continuous true-label scores, uniform: the coverage of the set rule given a calibration set is
    P(U >= t) = 1 - t exactly, Beta(m, n + 1 - m) distributed over calibration sets."""
    from scipy import stats

    rng = np.random.default_rng(3)
    n, alpha, trials = 200, 0.1, 3000
    m = cs.conformal_rank(n=n, alpha=alpha)
    coverages = np.array([1.0 - cs.lac_threshold(true_scores_N=rng.random(n), alpha=alpha) for _ in range(trials)])
    law = stats.beta(m, n + 1 - m)
    assert stats.kstest(coverages, law.cdf).pvalue > 0.01
    assert abs(coverages.mean() - m / (n + 1)) < 4 * law.std() / math.sqrt(trials)
    assert coverages.mean() >= 1 - alpha


@pytest.mark.parametrize(("coverage", "n"), [(0.9, 9), (0.95, 19), (0.99, 99), (0.5, 1)])
def test_min_samples_is_the_fewest_with_a_quantile_inside_the_data(coverage, n):
    alpha = cs.alpha_of(coverage)
    assert cs.min_samples(alpha=alpha) == n
    assert cs.conformal_rank(n=n, alpha=alpha) <= n < cs.conformal_rank(n=n - 1, alpha=alpha) + 1


def test_classes_too_small_for_the_target_are_pooled_not_given_every_set():
    """At coverage 0.95 a class of 12 calibration samples has no quantile of its own (m = 13 > 12): pooled."""
    rng = np.random.default_rng(5)
    labels = np.concatenate([np.zeros(40, np.int64), np.ones(12, np.int64), np.full(12, 2)])
    scores = rng.random(labels.size).astype(np.float32)
    found = cs.class_thresholds(true_scores_N=scores, labels_N=labels, num_classes=4, alpha=0.05, min_count=5)
    assert found.pooled == (1, 2, 3)  # 12, 12 and 0 samples: under 19
    pool = scores[labels > 0]
    assert found.thresholds_L[1] == found.thresholds_L[2] == cs.lac_threshold(true_scores_N=pool, alpha=0.05)
    assert found.thresholds_L[0] == cs.lac_threshold(true_scores_N=scores[:40], alpha=0.05) != cs.FULL


@pytest.mark.parametrize(("coverage", "n", "m"), [(0.9, 999, 900), (0.9, 9, 9), (0.95, 19, 19), (0.99, 99, 99)])
def test_a_coverage_target_gives_the_rank_of_its_decimal(coverage, n, m):
    """1 - 0.9 in floats is 0.09999999999999998: taken as is, m would be 901 of 999 samples, one too many."""
    assert cs.conformal_rank(n=n, alpha=cs.alpha_of(coverage)) == m
