"""Top-T score rows give the full rows' thresholds, metrics and pseudo-labels bit for bit, or say they cannot.

Every case runs avgk.evaluation.passes' specs twice through run_passes_local, over the same rows split in
chunks: once on full N x L rows, once on their top-T form (avgk.evaluation.top_scores.top_rows), and
compares. Cases marked "fallback" are built so that the top-T rows cannot prove the result
(a row holding many of the top-m scores); they must raise NotExact, never return a wrong value.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from avgk.evaluation import passes, top_scores
from avgk.evaluation.top_scores import NotExact, exact_or_full, force_top_rows, select_top_rows, top_rows
from avgk.method.pseudo_label_table import positives_as_rows

KS = (1.0, 1.5, 2.0, 3.0)


def softmax(rng, n, num_classes, scale=3.0):
    logits = rng.standard_normal((n, num_classes)).astype(np.float32) * scale
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def distinct(rng):
    return softmax(rng, 300, 40)


def ties_below_lambda(rng):
    """Each row: 4 distinct high scores and 36 equal zeros: ties straddle every row's top-T boundary."""
    scores = np.zeros((300, 40), dtype=np.float32)
    scores[:, :4] = rng.random((300, 4), dtype=np.float32) + 0.5
    return rng.permuted(scores, axis=1)


def quantised(rng):
    """Scores on a 9-value grid with negatives and both zeros: ties everywhere, kept and not kept."""
    scores = (rng.integers(-4, 5, (300, 40)) / 4).astype(np.float32)
    scores[rng.random((300, 40)) < 0.05] = -0.0
    return scores


def negative(rng):
    return rng.standard_normal((300, 40)).astype(np.float32) - 3.0


def one_ambiguous_row(rng):
    """Row 7 is flat and high: it holds more of the top-m scores than top-T keeps (the fallback case)."""
    scores = softmax(rng, 300, 40, scale=6.0)
    scores[7] = 0.9 + rng.random(40, dtype=np.float32) * 0.05
    return scores


def ties_straddling_lambda(rng):
    """Each row: five scores of exactly 1.0 and lower distinct ones; the ties at lambda_K (1.0)
    straddle every row's cut (T=4): lambda_K is still provable (rank m+1 is 1.0 = the largest cut), the
    set sizes at lambda_K and the pseudo-label ties are not."""
    scores = rng.random((300, 40), dtype=np.float32) * 0.5
    scores[:, :5] = 1.0
    return rng.permuted(scores, axis=1)


# name: (scores maker, T, which reductions top-T rows prove: thresholds, metrics, pseudo-labels with K_pl > 1)
CASES = {
    "distinct": (distinct, 8, (True, True, True)),
    "ties at every row's cut": (ties_below_lambda, 6, (True, True, True)),
    "quantised with ties, negatives, -0.0": (quantised, 12, (True, True, True)),
    "quantised, T = L": (quantised, 40, (True, True, True)),  # nothing left out
    "negative normal": (negative, 12, (True, True, True)),
    "one ambiguous row": (one_ambiguous_row, 8, (False, False, False)),
    "ties straddling the cut at lambda": (ties_straddling_lambda, 4, (True, False, False)),
}


def chunks(columns: dict[str, np.ndarray], num_chunks: int = 4):
    """Rows in `num_chunks` uneven chunks, chunk order reversed (the passes must not depend on order)."""
    n = len(columns["label"])
    bounds = np.linspace(0, n, num_chunks + 1).astype(int)
    parts = [{key: value[a:b] for key, value in columns.items()} for a, b in itertools.pairwise(bounds)]
    return lambda: iter(parts[::-1])


def data(name: str, seed: int = 0):
    make, top_t, exact = CASES[name]
    rng = np.random.default_rng(seed)
    scores = make(rng)
    n, num_classes = scores.shape
    labels = rng.integers(0, num_classes, n)
    full = {"idx": np.arange(n), "label": labels, "scores": scores, "posterior": softmax(rng, n, num_classes)}
    top = {"idx": full["idx"], "label": labels}
    top.update(top_rows(scores_NL=scores, labels_N=labels, top_t=top_t, with_classes=True))
    top.update(top_rows(scores_NL=full["posterior"], labels_N=labels, top_t=16, column="posterior"))
    return full, top, exact


def runner(rows):
    identity = lambda state: state  # noqa: E731
    return lambda spec, split: passes.run_passes_local(spec, chunks(rows[split]), reduce=identity)


def assert_bits_equal(actual: dict[float, float], expected: dict[float, float]) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        assert np.float32(actual[k]).view(np.uint32) == np.float32(expected[k]).view(np.uint32), (k, actual, expected)


# ---------------------------------------------------------------- the rows


def test_top_rows_keep_the_largest_scores_and_the_largest_left_out():
    scores = np.array([[0.1, 0.5, -0.0, 0.0, 0.5], [3.0, 1.0, 2.0, 0.0, -1.0]], dtype=np.float32)
    rows = top_rows(scores_NL=scores, labels_N=np.array([2, 4]), top_t=2, with_classes=True)
    assert rows["scores_top"].tolist() == [[0.5, 0.5], [3.0, 2.0]]
    assert sorted(rows["scores_top_classes"][0].tolist()) == [1, 4] and rows["scores_top_classes"][1].tolist() == [0, 2]
    assert rows["scores_cut"].tolist() == np.float32([0.1, 1.0]).tolist()
    assert rows["scores_true"].tolist() == [0.0, -1.0] and rows["scores_above_true"].tolist() == [3, 4]
    # -0.0 ranks below +0.0 (the selection's key order): with T=3 of [0, -0, 0.1] the cut is -0.0
    rows = top_rows(scores_NL=np.array([[0.0, -0.0, 0.1, -1.0]], dtype=np.float32), labels_N=np.array([0]), top_t=2)
    assert rows["scores_cut"][0] == 0.0 and math.copysign(1, rows["scores_cut"][0]) == -1.0
    whole = top_rows(scores_NL=scores, labels_N=np.array([2, 4]), top_t=9)  # T >= L: every score, no cut
    assert whole["scores_top"].shape == (2, 5) and np.isneginf(whole["scores_cut"]).all()


def test_forced_rows_bring_a_label_that_was_not_kept():
    top = np.array([[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]], dtype=np.float32)
    classes = np.array([[1, 2, 3], [1, 2, 3]])
    values, forced_classes, cut = force_top_rows(top_NT=top, classes_NT=classes, cut_N=np.float32([0.2, 0.2]),
                                                 labels_N=np.array([2, 9]))
    assert values[0].tolist() == np.float32([0.5, np.inf, 0.3]).tolist() and cut[0] == np.float32(0.2)
    assert values[1].tolist() == np.float32([0.5, 0.4, np.inf]).tolist() and forced_classes[1].tolist() == [1, 2, 9]
    assert cut[1] == np.float32(0.3)  # the dropped value is the largest one not kept now


@pytest.mark.parametrize("top_t, message", [(0, "top_t must be >= 1, got 0")])
def test_top_rows_errors_name_the_rule(top_t, message):
    with pytest.raises(ValueError, match=message):
        top_rows(scores_NL=np.zeros((2, 3)), labels_N=np.array([0, 1]), top_t=top_t)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got min 0 max 3"):
        top_rows(scores_NL=np.zeros((2, 3)), labels_N=np.array([0, 3]), top_t=2)
    with pytest.raises(ValueError, match="needs num_classes"):
        passes.ThresholdsPass(ks=(1.0,), top=True)


# ---------------------------------------------------------------- the reductions, full against top-T


@pytest.mark.parametrize("name", CASES)
def test_thresholds_equal_the_full_rows_or_raise(name):
    full, top, (exact, _, _) = data(name)
    num_classes = full["scores"].shape[1]
    expected = passes.calibrate(runner({"val": full}), "val", ks=KS)
    if not exact:
        with pytest.raises(NotExact, match=r"K=.*largest score\s+not kept"):
            passes.calibrate(runner({"val": top}), "val", ks=KS, top=True, num_classes=num_classes)
        return
    actual = passes.calibrate(runner({"val": top}), "val", ks=KS, top=True, num_classes=num_classes)
    assert_bits_equal(actual, expected)
    for column in ("posterior",):
        assert_bits_equal(
            passes.calibrate(runner({"val": top}), "val", ks=KS, column=column, top=True, num_classes=num_classes),
            passes.calibrate(runner({"val": full}), "val", ks=KS, column=column),
        )


@pytest.mark.parametrize("name", CASES)
def test_metrics_equal_the_full_rows_or_raise(name):
    full, top, (_, exact, _) = data(name)
    num_classes = full["scores"].shape[1]
    # The rows' own lambda_K from the full rows: the values most likely to sit at a row's cut.
    thresholds = passes.calibrate(runner({"val": full}), "val", ks=KS)
    kwargs = dict(num_classes=num_classes, ks=KS, thresholds=thresholds,
                  train_class_counts=np.arange(num_classes), freq_bins=(5, 20))
    expected = passes.count_metrics(runner({"test": full}), "test", **kwargs)
    if not exact:
        with pytest.raises(NotExact, match=r"row\(s\) of 'scores' keep a score not below lambda_K"):
            passes.count_metrics(runner({"test": top}), "test", top=True, **kwargs)
        return
    actual = passes.count_metrics(runner({"test": top}), "test", top=True, **kwargs)
    assert actual.compute() == expected.compute()
    for key, column in expected.per_class().items():
        np.testing.assert_array_equal(actual.per_class()[key], column)
    oracle = dict(kwargs, column="posterior", train_class_counts=None,
                  thresholds=passes.calibrate(runner({"val": full}), "val", ks=KS, column="posterior"))
    assert (passes.count_metrics(runner({"test": top}), "test", top=True, **oracle).compute()
            == passes.count_metrics(runner({"test": full}), "test", **oracle).compute())


def test_the_ambiguous_row_makes_metrics_unprovable():
    """The fallback case for metrics: the row's kept scores and cut all lie above lambda_K."""
    full, top, _ = data("one ambiguous row")
    thresholds = passes.calibrate(runner({"val": full}), "val", ks=KS)
    assert top_scores.unproven_rows(cut_N=top["scores_cut"], thresholds=thresholds, ks=KS)[0] == 1
    with pytest.raises(NotExact, match=r"K=1.0: 1 row\(s\) of 'scores'"):
        passes.count_metrics(runner({"test": top}), "test", num_classes=40, ks=KS, thresholds=thresholds,
                             train_class_counts=None, freq_bins=(5, 20), top=True)


def full_positives(full, k):
    spec = passes.PseudoLabelPass(k=k)
    selection = spec.selection(passes.run_passes_local(spec, chunks(full), reduce=lambda s: s))
    positive = selection.select(probs_NL=full["scores"], labels_N=full["label"], idx_N=full["idx"])
    return selection, positives_as_rows(positive)


def top_positives(top, k, num_classes):
    spec = passes.PseudoLabelPass(k=k, top=True, num_classes=num_classes)
    totals = passes.run_passes_local(spec, chunks(top), reduce=lambda s: s)
    selection = spec.selection(totals)
    forced, classes, cut = force_top_rows(top_NT=top["scores_top"], classes_NT=top["scores_top_classes"],
                                          cut_N=top["scores_cut"], labels_N=top["label"])
    return selection, select_top_rows(selection, forced_NT=forced, classes_NT=classes, cut_N=cut, idx_N=top["idx"]), len(totals)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [1.0, 2.0, 3.5])
def test_global_pseudo_labels_equal_the_full_rows_or_raise(name, k):
    full, top, (_, _, exact) = data(name)
    num_classes = full["scores"].shape[1]
    expected_selection, (expected_counts, expected_labels) = full_positives(full, k)
    if not exact and k > 1:
        with pytest.raises(NotExact, match=r"K_pl=.*M-th largest forced score .* is not above the largest score not kept"):
            top_positives(top, k, num_classes)
        return
    selection, (counts, labels), _ = top_positives(top, k, num_classes)
    assert selection == expected_selection
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(labels, expected_labels)


def test_pseudo_label_ties_split_by_sample_and_class_order():
    """Ties straddle the cut-off: the third (tie-counting) pass runs on top-T rows and takes the same ties."""
    rng = np.random.default_rng(3)
    scores = np.zeros((50, 30), dtype=np.float32)
    scores[:, :3] = 0.25  # three tied scores per row, then zeros (not kept with T=4)
    scores = rng.permuted(scores, axis=1)
    labels = rng.integers(0, 30, 50)
    full = {"idx": rng.permutation(50), "label": labels, "scores": scores}
    top = {"idx": full["idx"], "label": labels, **top_rows(scores_NL=scores, labels_N=labels, top_t=4, with_classes=True)}
    expected_selection, (expected_counts, expected_labels) = full_positives(full, 2.3)
    selection, (counts, labels_P), num_passes = top_positives(top, 2.3, 30)
    assert num_passes == 3 and selection.tie_take > 0  # the tie pass ran and cut a row's ties
    assert selection == expected_selection
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(labels_P, expected_labels)


def test_select_top_rows_refuses_rows_it_cannot_answer():
    full, top, _ = data("one ambiguous row")
    selection, _ = full_positives(full, 2.0)
    forced, classes, cut = force_top_rows(top_NT=top["scores_top"], classes_NT=top["scores_top_classes"],
                                          cut_N=top["scores_cut"], labels_N=top["label"])
    with pytest.raises(ValueError, match="is not below the selection threshold"):
        select_top_rows(selection, forced_NT=forced, classes_NT=classes, cut_N=cut, idx_N=top["idx"])


def test_thresholds_beyond_the_kept_values_raise():
    _full, top, _ = data("distinct")
    narrow = {key: value[:, :1] if key == "scores_top" else value for key, value in top.items()}
    with pytest.raises(NotExact, match=r"K=1.0: lambda_K needs rank m\+1=301 but top-1 rows keep only 300 x 1 values"):
        passes.calibrate(runner({"val": narrow}), "val", ks=(1.0,), top=True, num_classes=40)


# ---------------------------------------------------------------- the fallback


def test_evaluate_falls_back_to_full_rows_and_says_so():
    """The whole evaluation on top-T rows; the ambiguous row forces the full path, which gives the full result."""
    full, top, _ = data("one ambiguous row")
    kwargs = dict(ks=list(KS), num_classes=40, train_class_counts=np.arange(40), freq_bins=(5, 20),
                  score_head="multilabel", with_posterior=True)
    splits_full, splits_top = {"val": full, "test": full}, {"val": top, "test": top}
    messages: list[str] = []
    full_calls: list[int] = []

    def run_full():
        full_calls.append(1)
        return passes.evaluate(runner(splits_full), **kwargs)

    result = exact_or_full(lambda: passes.evaluate(runner(splits_top), top=True, **kwargs), run_full,
                           log=messages.append, what="evaluate")
    assert full_calls == [1]
    assert len(messages) == 1 and messages[0].startswith("evaluate: top-T score rows cannot prove the result (K=")
    assert "falling back to full score rows" in messages[0]
    assert result.metrics == passes.evaluate(runner(splits_full), **kwargs).metrics


def test_evaluate_on_provable_rows_does_not_fall_back():
    full, top, _ = data("distinct")
    kwargs = dict(ks=list(KS), num_classes=40, train_class_counts=np.arange(40), freq_bins=(5, 20),
                  score_head="multilabel", with_posterior=True)
    messages: list[str] = []
    result = exact_or_full(lambda: passes.evaluate(runner({"val": top, "test": top}), top=True, **kwargs),
                           lambda: pytest.fail("fell back on provable rows"), log=messages.append, what="evaluate")
    assert messages == []
    assert result.metrics == passes.evaluate(runner({"val": full, "test": full}), **kwargs).metrics
    assert result.thresholds == passes.evaluate(runner({"val": full, "test": full}), **kwargs).thresholds


def test_default_top_t():
    assert top_scores.default_top_t(max_k=10) == 80 and top_scores.default_top_t(max_k=1.5) == 16
    with pytest.raises(ValueError, match="max_k must be a finite number > 0, got 0"):
        top_scores.default_top_t(max_k=0)

