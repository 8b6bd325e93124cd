"""The global pseudo-label rule (exact count, ties in (idx, class) order) and its parquet table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avgk.method.pseudo_label_table import (
    PseudoLabelTable,
    positives_as_rows,
    pseudo_label_arrow_table,
    publish_dir,
    read_pseudo_label_table,
    temporary_dir_for,
    write_parquet,
)
from avgk.method.pseudo_labels import GlobalPseudoLabeler, batch_pseudo_labels
from avgk.method.thresholds import round_count


def brute_force(probs_NL: np.ndarray, labels_N: np.ndarray, k: float) -> np.ndarray:
    """The whole matrix as one batch of the per-batch rule: a stable sort in (idx, class) order."""
    return batch_pseudo_labels(probs=torch.from_numpy(probs_NL), labels=torch.from_numpy(labels_N), k=k).numpy() > 0


def streamed(probs_NL, labels_N, k, *, num_processes, seed=0):
    """The labeler over `num_processes` simulated processes, each streaming shuffled chunks."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(probs_NL.shape[0])
    shares = np.array_split(order, num_processes)
    chunks = [[c for c in np.array_split(share, 3) if c.size] for share in shares]
    labelers = [GlobalPseudoLabeler(k=k) for _ in range(num_processes)]
    passes = 0
    while not labelers[0].done:
        for labeler, mine in zip(labelers, chunks, strict=True):
            for rows in mine:
                labeler.update(probs_NL=probs_NL[rows], labels_N=labels_N[rows], idx_N=rows)
        total = sum(labeler.state() for labeler in labelers)
        for labeler in labelers:
            labeler.load_state(total)
        passes += 1
    selection = labelers[0].selection
    positive_NL = np.zeros(probs_NL.shape, dtype=bool)
    for mine in chunks:
        for rows in mine:
            positive_NL[rows] = selection.select(probs_NL=probs_NL[rows], labels_N=labels_N[rows], idx_N=rows)
    return selection, positive_NL, passes


def _softmax(rng, n, num_classes):
    return torch.softmax(torch.from_numpy(rng.standard_normal((n, num_classes), dtype=np.float32) * 3), 1).numpy()


CASES = {
    "continuous": lambda rng: _softmax(rng, 300, 17),
    "quantised (many ties)": lambda rng: np.round(_softmax(rng, 300, 17), 1).astype(np.float32),
    "constant (all tie)": lambda rng: np.full((120, 9), 1 / 9, dtype=np.float32),
    "underflowed zeros": lambda rng: np.where(rng.random((200, 30)) < 0.9, 0.0, 0.5).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k", [1, 1.5, 2, 3.7])
@pytest.mark.parametrize("num_processes", [1, 3])
def test_streamed_selection_equals_brute_force(name, k, num_processes):
    rng = np.random.default_rng(len(name))
    probs_NL = CASES[name](rng)
    labels_N = rng.integers(0, probs_NL.shape[1], probs_NL.shape[0])
    selection, positive_NL, passes = streamed(probs_NL, labels_N, k, num_processes=num_processes, seed=num_processes)
    expected = brute_force(probs_NL, labels_N, k)
    assert np.array_equal(positive_NL, expected)
    assert positive_NL.sum() == round_count(n=probs_NL.shape[0], k=k) == selection.num_positives
    assert positive_NL[np.arange(labels_N.size), labels_N].all()
    all_ties_taken = selection.num_positives - selection.num_greater == selection.num_equal
    assert passes == (2 if all_ties_taken else 3)
    if k == 1:
        assert selection.threshold == math.inf and positive_NL.sum(1).tolist() == [1] * labels_N.size


def test_resume_rebuilds_every_pass():
    rng = np.random.default_rng(1)
    probs_NL = np.round(_softmax(rng, 50, 6), 1).astype(np.float32)
    labels_N = rng.integers(0, 6, 50)
    totals = []
    while True:
        labeler = GlobalPseudoLabeler.resume(k=2, totals=totals)
        if labeler.done:
            break
        labeler.update(probs_NL=probs_NL, labels_N=labels_N, idx_N=np.arange(50))
        totals.append(labeler.state())
    assert len(totals) == 3 and labeler.selection.num_positives == 100


@pytest.mark.parametrize(
    "k, probs, labels, idx, match",
    [
        (0.5, np.ones((2, 3)), [0, 1], [0, 1], "K_pl must be >= 1"),
        (1, np.ones((2, 3)), [0, 3], [0, 1], r"labels must lie in \[0, 3\)"),
        (1, np.ones(3), [0], [0], "N x L"),
    ],
)
def test_bad_inputs(k, probs, labels, idx, match):
    with pytest.raises(ValueError, match=match):
        labeler = GlobalPseudoLabeler(k=k)
        labeler.update(probs_NL=probs, labels_N=np.asarray(labels), idx_N=np.asarray(idx))


def test_tie_pass_rejects_idx_out_of_range_and_lost_rows():
    probs_NL = np.full((4, 3), 1 / 3, dtype=np.float32)
    labels_N = np.zeros(4, dtype=np.int64)
    labeler = GlobalPseudoLabeler(k=2)
    for _ in range(2):
        labeler.update(probs_NL=probs_NL, labels_N=labels_N, idx_N=np.arange(4))
        labeler.load_state(labeler.state())
    assert labeler.phase == "ties"
    with pytest.raises(ValueError, match=r"sample idx must lie in \[0, N=4\)"):
        labeler.update(probs_NL=probs_NL, labels_N=labels_N, idx_N=np.array([0, 1, 2, 4]))
    labeler.update(probs_NL=probs_NL[:3], labels_N=labels_N[:3], idx_N=np.arange(3))
    with pytest.raises(ValueError, match="the tie pass counted 6 ties, pass 2 counted 8"):
        labeler.load_state(labeler.state())


def test_table_lookup_and_parquet_roundtrip(tmp_path):
    positive_NL = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=bool)
    counts_N, labels_P = positives_as_rows(positive_NL)
    assert counts_N.tolist() == [2, 1, 3, 1] and labels_P.tolist() == [0, 2, 1, 0, 1, 2, 2]
    metadata = {"num_samples": 4, "num_positives": 7, "threshold": math.inf, "k": 1.75}
    # Two parts with rows out of order, as Ray tasks write them.
    final = str(tmp_path / "pseudo_labels")
    tmp = temporary_dir_for(final)
    for part, rows in enumerate([[2, 0], [3, 1]]):
        rows = np.array(rows)
        counts, labels = positives_as_rows(positive_NL[rows])
        write_parquet(f"{tmp}/part-{part:05d}.parquet",
                      pseudo_label_arrow_table(idx_R=rows, counts_R=counts, labels_P=labels, metadata=metadata))
    publish_dir(tmp, final)
    table = read_pseudo_label_table(final)
    assert table.metadata["threshold"] == math.inf and table.num_samples == 4 and table.num_positives == 7
    assert table.offsets_N1.tolist() == [0, 2, 3, 6, 7]
    assert torch.equal(table.targets(torch.tensor([3, 0, 0]), num_classes=3),
                       torch.tensor([[0, 0, 1], [1, 0, 1], [1, 0, 1]], dtype=torch.float32))
    import pyarrow.parquet as pq

    schema = pq.read_schema(f"{final}/part-00000.parquet")
    assert str(schema.field("idx").type) == "int64" and str(schema.field("labels").type) == "list<element: int32>"
    assert json.loads(schema.metadata[b"avgk.pseudo_labels"])["k"] == 1.75

    # Replacing a table is a rename: the old one is gone, nothing temporary is left behind.
    tmp = temporary_dir_for(final)
    write_parquet(f"{tmp}/part-00000.parquet", pseudo_label_arrow_table(
        idx_R=np.arange(4), counts_R=counts_N, labels_P=labels_P, metadata=metadata))
    publish_dir(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudo_labels"]
    assert [p.name for p in (tmp_path / "pseudo_labels").iterdir()] == ["part-00000.parquet"]


def test_incomplete_tables_are_rejected(tmp_path):
    metadata = {"num_samples": 4, "num_positives": 5}
    write_parquet(str(tmp_path / "t" / "part-00000.parquet"), pseudo_label_arrow_table(
        idx_R=[0, 1], counts_R=[2, 1], labels_P=[0, 1, 2], metadata=metadata))
    with pytest.raises(ValueError, match=r"every sample idx 0\.\.3 exactly once"):
        read_pseudo_label_table(str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="no pseudo-label table"):
        read_pseudo_label_table(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"sample idx must lie in \[0, 2\)"):
        PseudoLabelTable.from_rows(idx_R=[1, 0], counts_R=[1, 1], labels_P=[0, 1], num_samples=2,
                                   metadata={}).targets(np.array([2]), num_classes=3)


def test_offline_hook_online_first_then_cached_and_reloaded_on_resume(tmp_path, monkeypatch):
    """Epochs < R: online (None); a resumed run between refreshes reloads its refresh's table."""
    from types import SimpleNamespace

    from avgk.training import pseudo_refresh

    parts = SimpleNamespace(num_classes=3, manifest=SimpleNamespace(split=lambda name: SimpleNamespace(num_samples=4)))
    positive_NL = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=bool)
    counts_N, labels_P = positives_as_rows(positive_NL)
    saved = {"source": "training", "trained_epochs": 2, "k": 1.75, "num_samples": 4, "num_positives": 7}
    write_parquet(str(tmp_path / "pseudo_labels" / "part-00000.parquet"), pseudo_label_arrow_table(
        idx_R=np.arange(4), counts_R=counts_N, labels_P=labels_P, metadata=saved))
    computed = []
    fresh = PseudoLabelTable.from_rows(idx_R=np.arange(4), counts_R=[1] * 4, labels_P=[0] * 4, num_samples=4,
                                       metadata={})
    monkeypatch.setattr(pseudo_refresh.OfflinePseudoLabels, "_compute",
                        lambda self, parts, refresh: computed.append(refresh) or fresh)

    hook = pseudo_refresh.OfflinePseudoLabels(run_dir=str(tmp_path), k=1.75, refresh_epochs=2)
    assert hook(parts, 0) is None and hook(parts, 1) is None
    targets = hook(parts, 3)(torch.tensor([2, 3]))  # resumed at epoch 3: the epoch-2 table from disk
    assert targets.tolist() == [[1, 1, 1], [0, 0, 1]] and computed == []
    assert hook(parts, 4)(torch.tensor([2])).tolist() == [[1, 0, 0]] and computed == [4]  # refresh
    hook(parts, 5)
    assert computed == [4]  # reused until the next refresh
    resumed = pseudo_refresh.OfflinePseudoLabels(run_dir=str(tmp_path), k=1.75, refresh_epochs=3)
    resumed(parts, 4)  # its refresh epoch is 3, the table on disk is epoch 2's: recomputed
    assert computed == [4, 3]
