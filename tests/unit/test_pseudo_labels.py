"""The per-batch pseudo-label rule (docs/METHOD.md section 3)."""

import math

import pytest
import torch

from avgk.method.pseudo_labels import batch_pseudo_labels, global_pseudo_labels


@pytest.mark.parametrize("batch_size, num_classes, k", [(1, 5, 1), (7, 5, 1.5), (16, 10, 2), (33, 100, 3.3), (4, 3, 2.9)])
def test_exact_count_and_every_true_label(batch_size, num_classes, k):
    g = torch.Generator().manual_seed(batch_size * num_classes)
    logits = torch.randn(batch_size, num_classes, generator=g, requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    labels = torch.randint(num_classes, (batch_size,), generator=g)
    targets = batch_pseudo_labels(probs=probs, labels=labels, k=k)
    assert targets.shape == (batch_size, num_classes)
    assert int(targets.sum()) == math.floor(k * batch_size + 0.5)
    assert bool((targets[torch.arange(batch_size), labels] == 1).all())
    assert not targets.requires_grad and targets.grad_fn is None
    assert set(targets.unique().tolist()) <= {0.0, 1.0}


def test_selects_largest_entries_over_the_whole_batch():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    labels = torch.tensor([0, 2])
    # M = 4: both true labels forced, then the two largest others: 0.4 and 0.35 of row 1.
    targets = batch_pseudo_labels(probs=probs, labels=labels, k=2)
    assert targets.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_ties_broken_by_flat_index_deterministically():
    probs = torch.full((3, 4), 0.25)
    labels = torch.tensor([3, 3, 3])
    targets = batch_pseudo_labels(probs=probs, labels=labels, k=2)  # 6 = 3 forced + 3 ties
    assert targets.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert torch.equal(targets, batch_pseudo_labels(probs=probs, labels=labels, k=2))


def test_global_rule_thresholds_forced_scores():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    targets = global_pseudo_labels(probs=probs, labels=torch.tensor([2, 0]), threshold=0.5)
    assert targets.tolist() == [[1, 0, 1], [1, 1, 0]]


@pytest.mark.parametrize(
    "k, labels, match",
    [(0.5, [0, 1], "K_pl must be >= 1"), (3.5, [0, 1], "more than the 2 x 3"), (1, [0, 3], r"labels must lie in \[0, 3\)")],
)
def test_bad_inputs(k, labels, match):
    with pytest.raises(ValueError, match=match):
        batch_pseudo_labels(probs=torch.rand(2, 3), labels=torch.tensor(labels), k=k)


@pytest.mark.parametrize("seed", range(20))
def test_fast_selection_equals_the_stable_sort_definition(seed):
    """The top-k path picks the same entries as the first m of a stable descending sort, heavy ties included."""
    from avgk.method.pseudo_labels import force_labels, num_pseudo_positives

    g = torch.Generator().manual_seed(seed)
    batch_size, num_classes = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 60, (1,), generator=g))
    levels = int(torch.randint(1, 6, (1,), generator=g))  # few distinct values: many ties
    probs = torch.randint(levels, (batch_size, num_classes), generator=g).float() / levels
    labels = torch.randint(num_classes, (batch_size,), generator=g)
    if seed % 4 == 0:  # NaN scores (a diverged model): the sort ranks them first, so must the fast path
        probs[torch.rand(probs.shape, generator=g) < 0.05] = float("nan")
    k = float(torch.empty(1).uniform_(1, num_classes - 0.5, generator=g))
    flat = force_labels(probs_BL=probs, labels_B=labels).flatten()
    m = num_pseudo_positives(batch_size=batch_size, num_classes=num_classes, k=k)
    expected = torch.zeros_like(flat)
    expected[torch.sort(flat, descending=True, stable=True).indices[:m]] = 1.0
    actual = batch_pseudo_labels(probs=probs, labels=labels, k=k).flatten()
    assert torch.equal(actual, expected), (batch_size, num_classes, k)
