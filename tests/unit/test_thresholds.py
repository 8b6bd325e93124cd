"""Exactness of lambda_K calibration (in memory and streamed) against the full-sort reference."""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from avgk.method import thresholds as thresholds_module
from avgk.method.streamed_thresholds import StreamingSelector, StreamingThresholds, calibrate_thresholds_streamed
from avgk.method.thresholds import (
    calibrate_thresholds,
    float_to_key,
    key_to_float,
    kth_largest,
    rank_for_k,
    reference_thresholds,
)

KS = [1, 2, 3, 5, 10]


def bits(value: float) -> int:
    """float32 bit pattern, with every NaN mapped to one pattern (NaN payloads are not compared)."""
    return -1 if math.isnan(value) else int(np.float32(value).view(np.uint32))


def assert_same_thresholds(actual: dict[float, float], expected: dict[float, float]) -> None:
    assert list(actual) == list(expected)
    assert {k: bits(v) for k, v in actual.items()} == {k: bits(v) for k, v in expected.items()}


def softmax(rng: np.random.Generator, num_samples: int, num_classes: int, scale: float = 3.0) -> np.ndarray:
    logits_NL = rng.standard_normal((num_samples, num_classes), dtype=np.float32) * scale
    exp_NL = np.exp(logits_NL - logits_NL.max(axis=1, keepdims=True))
    return (exp_NL / exp_NL.sum(axis=1, keepdims=True)).astype(np.float32)


def with_infinities(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    scores_NL = rng.standard_normal(shape).astype(np.float32)
    flat = scores_NL.reshape(-1)
    flat[rng.choice(flat.size, size=flat.size // 20, replace=False)] = np.inf
    flat[rng.choice(flat.size, size=flat.size // 20, replace=False)] = -np.inf
    return scores_NL


def make_case(name: str) -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cases = {
        "uniform": lambda: (rng.random((200, 50), dtype=np.float32), KS),
        "softmax_large": lambda: (softmax(rng, 2000, 1000), KS),
        "few_distinct_values": lambda: (rng.integers(0, 3, (1000, 500)).astype(np.float32), KS),
        "few_distinct_small": lambda: (rng.integers(0, 2, (30, 7)).astype(np.float32), [1, 2, 3.5]),
        "negative": lambda: (-rng.random((700, 400), dtype=np.float32), KS),
        "mixed_signs_and_infinities": lambda: (with_infinities(rng, (600, 500)), KS),
        "all_plus_inf": lambda: (np.full((10, 4), np.inf, dtype=np.float32), [1, 2]),
        "inf_minus_inf_midpoint": lambda: (
            np.array([[np.inf, -np.inf], [np.inf, -np.inf]], dtype=np.float32),
            [1],
        ),
        "signed_zeros": lambda: (
            np.array([[0.0, -0.0, 1.0], [-0.0, -0.0, 0.0]], dtype=np.float32),
            [1, 1.5, 2],
        ),
        "one_row": lambda: (rng.random((1, 37), dtype=np.float32), [1, 5, 36]),
        "one_column": lambda: (rng.random((41, 1), dtype=np.float32), [0.1, 0.5, 0.97]),
        "non_integer_ks": lambda: (softmax(rng, 300, 40), [0.5, 1.5, 2.25, 7.7]),
        "float64_input": lambda: (rng.random((50, 30)), [1, 2]),
        "bottom_ranks": lambda: (rng.random((400, 1000), dtype=np.float32), [990, 995, 999]),
        "very_bottom_ranks": lambda: (rng.random((400, 1000), dtype=np.float32), [999.5, 999.99]),
        "subnormals": lambda: (
            (rng.random((60, 20)) * 1e-39).astype(np.float32),
            [1, 3],
        ),
    }
    return cases[name]()


CASE_NAMES = [
    "uniform",
    "softmax_large",
    "few_distinct_values",
    "few_distinct_small",
    "negative",
    "mixed_signs_and_infinities",
    "all_plus_inf",
    "inf_minus_inf_midpoint",
    "signed_zeros",
    "one_row",
    "one_column",
    "non_integer_ks",
    "float64_input",
    "bottom_ranks",
    "very_bottom_ranks",
    "subnormals",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_calibrate_equals_reference(name: str) -> None:
    scores_NL, ks = make_case(name)
    expected = reference_thresholds(scores_NL, ks)
    assert_same_thresholds(calibrate_thresholds(scores_NL, ks), expected)
    assert_same_thresholds(calibrate_thresholds(torch.from_numpy(np.asarray(scores_NL)), ks), expected)
    assert all(isinstance(k, float) for k in expected)


@pytest.mark.parametrize("name", ["uniform", "few_distinct_small", "mixed_signs_and_infinities", "one_column"])
def test_streamed_equals_reference(name: str) -> None:
    scores_NL, ks = make_case(name)
    chunks = np.array_split(scores_NL, 4)
    result = calibrate_thresholds_streamed(lambda: iter(chunks), ks)
    assert_same_thresholds(result, reference_thresholds(scores_NL, ks))


def test_sets_match_reference_sets() -> None:
    scores_NL = softmax(np.random.default_rng(3), 500, 100)
    expected = reference_thresholds(scores_NL, KS)
    for k, threshold in calibrate_thresholds(scores_NL, KS).items():
        ours = torch.from_numpy(scores_NL) >= threshold
        reference = torch.from_numpy(scores_NL) >= expected[k]
        assert torch.equal(ours, reference)
        # The midpoint sits between s_(m) and s_(m+1), so the set size is m when those differ.
        assert abs(ours.sum().item() / 500 - k) < 0.01


def test_reference_matches_plantnet_formula() -> None:
    scores_NL = softmax(np.random.default_rng(4), 64, 10)
    probas = torch.from_numpy(scores_NL)
    sorted_probas, _ = torch.sort(torch.flatten(probas), descending=True)
    for k in [1, 2, 3]:
        expected = 0.5 * (sorted_probas[64 * k - 1] + sorted_probas[64 * k])
        assert reference_thresholds(scores_NL, [k])[float(k)] == expected.item()


@pytest.mark.parametrize("sigmas", [-50.0, 0.0])
@pytest.mark.parametrize("ks", [[1, 2, 250, 499], [250, 499]])
def test_bracket_misses_fall_back_exactly(sigmas: float, ks: list[float]) -> None:
    """A bracket that misses the needed ranks is widened, never trusted."""
    scores_NL = softmax(np.random.default_rng(5), 600, 500)
    with mock.patch.object(thresholds_module, "_BRACKET_SIGMAS", sigmas):
        assert_same_thresholds(calibrate_thresholds(scores_NL, ks), reference_thresholds(scores_NL, ks))


@pytest.mark.parametrize(
    ("num_samples", "num_classes", "k", "m"),
    [(10, 5, 1, 10), (10, 5, 1.5, 15), (10, 5, 0.25, 3), (3, 4, 0.5, 2), (5, 3, 0.3, 2), (1, 37, 36, 36)],
)
def test_rank_for_k(num_samples: int, num_classes: int, k: float, m: int) -> None:
    assert rank_for_k(num_samples=num_samples, num_classes=num_classes, k=k) == m


@pytest.mark.parametrize(
    ("shape", "k", "message"),
    [
        ((10, 5), 5, "K=5.0 gives rank m=floor(N*K + 1/2)=50 with N=10, L=5"),
        ((10, 5), 7.5, "m=floor(N*K + 1/2)=75"),
        ((10, 5), 0.01, "m=floor(N*K + 1/2)=0"),
        ((10, 5), 0, "got 0.0"),
        ((10, 5), -2, "got -2.0"),
        ((10, 5), math.nan, "got nan"),
        ((10, 5), math.inf, "got inf"),
    ],
)
def test_out_of_range_k_raises(shape: tuple[int, int], k: float, message: str) -> None:
    scores_NL = np.random.default_rng(0).random(shape, dtype=np.float32)
    for calibrate in (calibrate_thresholds, reference_thresholds):
        with pytest.raises(ValueError, match=re.escape(message)):
            calibrate(scores_NL, [1, k])


@pytest.mark.parametrize("bad", [np.zeros(5, dtype=np.float32), np.zeros((2, 3, 4), dtype=np.float32)])
def test_non_matrix_scores_raise(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="must be a 2-D N x L array"):
        calibrate_thresholds(bad, [1])


@pytest.mark.parametrize("ks", [[], "12"])
def test_bad_ks_raise(ks) -> None:
    with pytest.raises(ValueError, match="ks must"):
        calibrate_thresholds(np.ones((3, 3), dtype=np.float32), ks)


@pytest.mark.parametrize("num_values", [100, 600_000])
def test_nan_raises(num_values: int) -> None:
    scores_NL = np.random.default_rng(0).random((num_values // 100, 100), dtype=np.float32)
    scores_NL[-1, 7] = np.nan
    for calibrate in (calibrate_thresholds, reference_thresholds):
        with pytest.raises(ValueError, match="NaN"):
            calibrate(scores_NL, [1])


def test_torch_input_with_grad() -> None:
    scores = torch.rand(50, 20, requires_grad=True)
    assert_same_thresholds(calibrate_thresholds(scores, [1, 2]), reference_thresholds(scores.detach(), [1, 2]))


def test_kth_largest() -> None:
    values = np.random.default_rng(6).integers(-3, 3, 400_000).astype(np.float32)
    expected = np.sort(values)[::-1]
    ranks = [1, 2, 1000, 66_666, 300_000, 400_000]
    assert kth_largest(values=values, ranks=ranks) == {r: float(expected[r - 1]) for r in ranks}
    with pytest.raises(ValueError, match="got 400001"):
        kth_largest(values=values, ranks=[400_001])
    with pytest.raises(ValueError, match="got 0"):
        kth_largest(values=values, ranks=[0])


# ---------------------------------------------------------------- keys

SPECIALS = np.array(
    [-np.inf, -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 0.5, 1.0, 3.4e38, np.inf], dtype=np.float32
)


def test_keys_roundtrip_and_order_on_specials() -> None:
    keys = float_to_key(SPECIALS)
    assert keys.dtype == np.uint32
    assert np.all(np.diff(keys.astype(np.int64)) > 0)
    assert np.array_equal(key_to_float(keys).view(np.uint32), SPECIALS.view(np.uint32))


@given(hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(width=32, allow_nan=False)))
@settings(max_examples=200, deadline=None)
def test_keys_preserve_order(values: np.ndarray) -> None:
    keys = float_to_key(values)
    assert np.array_equal(key_to_float(keys).view(np.uint32), values.view(np.uint32))
    ordered = values[np.argsort(keys, kind="stable")]
    assert np.all(ordered[:-1] <= ordered[1:])


# ---------------------------------------------------------------- property test

FLOATS = st.one_of(
    st.floats(width=32, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, np.inf, -np.inf]),
)


@st.composite
def scores_and_ks(draw):
    num_samples = draw(st.integers(1, 12))
    num_classes = draw(st.integers(1, 12))
    scores_NL = draw(hnp.arrays(np.float32, (num_samples, num_classes), elements=FLOATS))
    num_values = num_samples * num_classes
    if num_values < 2:
        scores_NL = np.concatenate([scores_NL, scores_NL])
        num_samples, num_values = 2 * num_samples, 2 * num_values
    # Draw valid ranks, then a K that lands on each (K = (m - 0.25) / N rounds to m).
    ms = draw(st.lists(st.integers(1, num_values - 1), min_size=1, max_size=4))
    return scores_NL, [(m - 0.25) / num_samples for m in ms]


@pytest.mark.parametrize(
    "patches",
    [{}, {"_SMALL_NUM_VALUES": 0, "_SAMPLE_SIZE": 16}, {"_SMALL_NUM_VALUES": 0, "_BRACKET_SIGMAS": -3.0}],
    ids=["direct", "tiny_sample_bracket", "missing_bracket"],
)
@given(case=scores_and_ks())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_calibrate_equals_reference(patches, case) -> None:
    scores_NL, ks = case
    expected = reference_thresholds(scores_NL, ks)
    patched = mock.patch.multiple(thresholds_module, **patches) if patches else contextlib.nullcontext()
    with patched:
        assert_same_thresholds(calibrate_thresholds(scores_NL, ks), expected)
    chunks = np.array_split(scores_NL, 3)
    assert_same_thresholds(calibrate_thresholds_streamed(lambda: chunks, ks), expected)


# ---------------------------------------------------------------- streaming across processes


def run_processes(calibrators, chunks_per_process) -> None:
    """Drives calibrators standing for separate processes, summing states like an all-reduce."""
    for calibrator, chunks in zip(calibrators, chunks_per_process, strict=True):
        for chunk in chunks:
            calibrator.update(chunk)
    total = sum(c.state() for c in calibrators)
    for calibrator in calibrators:
        calibrator.load_state(total)
        calibrator.next_pass()
    for calibrator, chunks in zip(calibrators, chunks_per_process, strict=True):
        for chunk in chunks:
            calibrator.update(chunk)
    total = sum(c.state() for c in calibrators)
    for calibrator in calibrators:
        calibrator.load_state(total)


@pytest.mark.parametrize("name", ["softmax_large", "mixed_signs_and_infinities", "few_distinct_values"])
def test_three_processes_equal_in_memory_and_reference(name: str) -> None:
    scores_NL, _ = make_case(name)
    ks = [1, 2, 5, 1.5]
    parts = np.array_split(scores_NL, [7, scores_NL.shape[0] // 2])
    chunks_per_process = [
        [torch.from_numpy(parts[0])],  # a torch chunk on one process
        [*np.array_split(parts[1], 3), parts[1][:0]],  # with an empty chunk
        np.array_split(parts[2], 2),
    ]
    calibrators = [StreamingThresholds(ks=ks) for _ in range(3)]
    run_processes(calibrators, chunks_per_process)
    expected = reference_thresholds(scores_NL, ks)
    assert_same_thresholds(calibrate_thresholds(scores_NL, ks), expected)
    for calibrator in calibrators:
        assert_same_thresholds(calibrator.thresholds(), expected)
        assert (calibrator.num_rows, calibrator.num_cols) == scores_NL.shape


def test_selector_ranks_and_tie_counts() -> None:
    rng = np.random.default_rng(7)
    scores_NL = rng.integers(-2, 3, (300, 40)).astype(np.float32)
    scores_NL[0, :5] = [np.inf, -np.inf, 1e-45, -1e-45, 3.0]
    selectors = [StreamingSelector(ranks_fn=lambda n, num_cols: [1, round(2.5 * n), n * num_cols]) for _ in range(2)]
    run_processes(selectors, [[scores_NL[:100]], [scores_NL[100:200], scores_NL[200:]]])
    flat = np.sort(scores_NL.reshape(-1))[::-1]
    for selector in selectors:
        results = selector.values_at_ranks()
        assert sorted(results) == [1, 750, 12_000]
        for rank, found in results.items():
            value = flat[rank - 1]
            assert found.rank == rank and found.value == value
            assert found.num_greater == np.count_nonzero(flat > value)
            assert found.num_equal == np.count_nonzero(flat == value)
            assert found.num_greater < rank <= found.num_greater + found.num_equal


# ---------------------------------------------------------------- misuse


def test_wrong_order_raises() -> None:
    scores_NL = np.random.default_rng(8).random((20, 5), dtype=np.float32)
    cal = StreamingThresholds(ks=[1])
    with pytest.raises(RuntimeError, match="next_pass is not allowed in phase 'pass1'"):
        cal.next_pass()
    with pytest.raises(RuntimeError, match="thresholds is not allowed in phase 'pass1'"):
        cal.thresholds()
    cal.update(scores_NL)
    cal.load_state(cal.state())
    with pytest.raises(RuntimeError, match="update is not allowed in phase 'pass1_loaded'"):
        cal.update(scores_NL)
    with pytest.raises(RuntimeError, match="load_state is not allowed"):
        cal.load_state(np.zeros(65538, dtype=np.int64))
    cal.next_pass()
    with pytest.raises(RuntimeError, match="next_pass is not allowed in phase 'pass2'"):
        cal.next_pass()
    with pytest.raises(RuntimeError, match="values_at_ranks is not allowed in phase 'pass2'"):
        cal.values_at_ranks()
    cal.update(scores_NL)
    cal.load_state(cal.state())
    with pytest.raises(RuntimeError, match="update is not allowed in phase 'done'"):
        cal.update(scores_NL)
    assert_same_thresholds(cal.thresholds(), reference_thresholds(scores_NL, [1]))


def test_bad_states_and_chunks_raise() -> None:
    rng = np.random.default_rng(9)
    scores_NL = rng.random((20, 5), dtype=np.float32)
    cal = StreamingThresholds(ks=[1])
    cal.update(scores_NL)
    with pytest.raises(ValueError, match="every chunk must have L=5 columns"):
        cal.update(rng.random((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        cal.update(np.full((2, 5), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(65538,\)"):
        cal.load_state(cal.state()[:-1])
    with pytest.raises(ValueError, match="integer array"):
        cal.load_state(cal.state().astype(np.float64))
    with pytest.raises(ValueError, match="no rows"):
        cal.load_state(np.zeros_like(cal.state()))
    cal.load_state(cal.state())
    cal.next_pass()
    cal.update(scores_NL[:10])
    with pytest.raises(ValueError, match="same chunks"):
        cal.load_state(cal.state())
    other = StreamingThresholds(ks=[1])
    other.update(scores_NL)
    other.load_state(other.state())
    other.next_pass()
    other.update(rng.random((20, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="same chunks"):
        other.load_state(other.state())


def test_processes_with_different_widths_raise() -> None:
    rng = np.random.default_rng(10)
    narrow, wide = StreamingThresholds(ks=[1]), StreamingThresholds(ks=[1])
    narrow.update(rng.random((10, 4), dtype=np.float32))
    wide.update(rng.random((10, 8), dtype=np.float32))
    total = narrow.state() + wide.state()
    for calibrator in (narrow, wide):
        with pytest.raises(ValueError, match="all processes must stream chunks with the same L"):
            calibrator.load_state(total)


def test_k_out_of_range_raises_after_pass_one() -> None:
    cal = StreamingThresholds(ks=[1, 5])
    cal.update(np.random.default_rng(11).random((10, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=re.escape("K=5.0 gives rank")):
        cal.load_state(cal.state())
