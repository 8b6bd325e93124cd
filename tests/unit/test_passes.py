"""The pass states' transport form: compact_state / expand_state."""

import numpy as np
import pytest

from avgk.evaluation.passes import CompactCounts, compact_state, expand_state


def test_a_mostly_zero_histogram_travels_as_its_nonzero_entries_and_comes_back_bit_for_bit():
    rng = np.random.default_rng(0)
    hist = np.zeros(2 + 3 * 65536, dtype=np.int64)
    hist[rng.choice(hist.size, 2000, replace=False)] = rng.integers(1, 1 << 40, 2000)
    compact = compact_state(hist)
    assert isinstance(compact, CompactCounts)
    assert compact.index.nbytes + compact.values.nbytes == 2000 * 16  # against 1.5 MiB dense
    back = expand_state(compact)
    assert back.dtype == hist.dtype and back.shape == hist.shape and np.array_equal(back, hist)


@pytest.mark.parametrize(
    "state",
    [
        np.arange(1, 10_000, dtype=np.int64),  # dense: compacting would not save anything
        np.zeros(100, dtype=np.int64),  # small
        np.zeros(10_000, dtype=np.float64),  # not counts
    ],
)
def test_dense_small_or_float_arrays_travel_as_they_are(state):
    assert compact_state(state) is state


def test_dict_states_compact_per_key_and_keep_shapes():
    state = {"hist": np.zeros((4, 4096), dtype=np.int32), "counts": np.arange(5, dtype=np.int64)}
    state["hist"][1, 7] = 3
    compact = compact_state(state)
    assert isinstance(compact["hist"], CompactCounts) and compact["counts"] is state["counts"]
    back = expand_state(compact)
    assert back.keys() == state.keys()
    for key in state:
        assert back[key].dtype == state[key].dtype and np.array_equal(back[key], state[key])
