"""Pseudo-label rules of the two-head loss: per batch (online) and global (exact, streamed).

Legend: B batch size, L classes, N samples, M positives of the whole training set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from avgk.method.streamed_thresholds import RankedValue, StreamingSelector
from avgk.method.thresholds import float_to_key, round_count


def num_pseudo_positives(*, batch_size: int, num_classes: int, k: float) -> int:
    """M = floor(K_pl * B + 1/2), the number of positives in a batch (docs/METHOD.md section 3)."""
    if not k >= 1:
        raise ValueError(f"pseudo-label K_pl must be >= 1 (every true label is a positive), got {k}")
    m = round_count(n=batch_size, k=k)
    if m > batch_size * num_classes:
        raise ValueError(
            f"pseudo-label K_pl={k} asks for {m} positives, more than the {batch_size} x {num_classes} batch entries"
        )
    return m


def force_labels(*, probs_BL: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """A detached copy of the scores with every true label's entry set to +inf."""
    forced_BL = probs_BL.detach().clone()
    forced_BL[torch.arange(forced_BL.shape[0], device=forced_BL.device), labels_B] = math.inf
    return forced_BL


def batch_pseudo_labels(*, probs: torch.Tensor, labels: torch.Tensor, k: float) -> torch.Tensor:
    """B x L 0/1 matrix: the round(k*B) largest entries of the batch, true labels forced in.

    `probs` are the softmax head's probabilities; they are detached here, so no gradient
    flows through the pseudo-labels. Ties at the boundary go to the entry with the lower
    flat (row-major) index, so the result is deterministic.
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be B x L and labels B, got {tuple(probs.shape)} and {tuple(labels.shape)}")
    batch_size, num_classes = probs.shape
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}")
    m = num_pseudo_positives(batch_size=batch_size, num_classes=num_classes, k=k)
    flat = force_labels(probs_BL=probs.float(), labels_B=labels).flatten()
    # The same set as the defining rule below in O(B*L) instead of a full sort (the sort was the
    # two-head step's largest extra cost: BENCHMARKS.md, P2): every entry above the m-th largest value, then
    # the entries equal to it with the lowest flat indices. topk only finds that value.
    threshold = torch.topk(flat, m, sorted=False).values.min() if m else None
    # topk ranks NaN above everything and min() propagates it: a NaN threshold <=> a NaN score
    # (no separate pass over the batch to look for one).
    if threshold is None or bool(torch.isnan(threshold)):
        # The defining rule: the first m of a stable descending sort (ties by flat index).
        # Kept for NaN scores, which the sort ranks above +inf and comparisons cannot.
        order = torch.sort(flat, descending=True, stable=True).indices[:m]
        targets = torch.zeros_like(flat)
        targets[order] = 1.0
        return targets.view(batch_size, num_classes)
    above = flat > threshold
    targets = above.to(flat.dtype)
    missing = m - int(above.sum())
    if missing:  # ties at the threshold (rare with softmax scores): the lowest flat indices
        targets[torch.nonzero(flat == threshold).flatten()[:missing]] = 1.0
    return targets.view(batch_size, num_classes)


def global_pseudo_labels(*, probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """B x L 0/1 matrix of one chunk under the global rule: forced scores >= threshold.

    `threshold` is the round(K_pl * N)-th largest forced score of the whole training set
    (from avgk.method.streamed_thresholds' selection), so all chunks together select that many
    entries, plus any entries tied with the threshold value.
    """
    forced = force_labels(probs_BL=probs.float(), labels_B=labels)
    return (forced >= threshold).to(probs.dtype)


# =====================================================================================
# The global rule at scale: exact selection over a streamed N x L matrix
# =====================================================================================


def _forced(probs_NL: Any, labels_N: Any) -> np.ndarray:
    """float32 N x L numpy copy of the scores with every true label forced to +inf."""
    # A writable array: Ray hands out read-only views of the object store, which torch warns about.
    probs_NL = np.asarray(probs_NL, dtype=np.float32)
    probs = torch.from_numpy(probs_NL if probs_NL.flags.writeable else probs_NL.copy())
    labels = torch.from_numpy(np.array(labels_N, dtype=np.int64))
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be N x L and labels N, got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got min {int(labels.min())} max {int(labels.max())}")
    return force_labels(probs_BL=probs, labels_B=labels).numpy()


def _checked_idx(idx_N: Any, *, num_rows: int, num_samples: int) -> np.ndarray:
    idx = np.asarray(idx_N, dtype=np.int64).reshape(-1)
    if idx.shape != (num_rows,):
        raise ValueError(f"idx must hold one sample index per row ({num_rows}), got shape {idx.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= num_samples):
        raise ValueError(f"sample idx must lie in [0, N={num_samples}), got min {int(idx.min())} max {int(idx.max())}")
    return idx


def _key(value: float) -> np.uint32:
    key: np.uint32 = float_to_key(np.array([value], dtype=np.float32))[0]
    return key


@dataclasses.dataclass(frozen=True)
class GlobalSelection:
    """The global pseudo-label rule of one training set: exactly M = round(K_pl * N) positives.

    With forced scores (softmax probabilities, every true label set to +inf), entry (i, j)
    is positive iff its score is above `threshold` (the M-th largest forced score), or it
    equals `threshold` (same float32 bits) and is among the first M - num_greater tied
    entries in (sample idx, class id) order: every tie of the rows idx < tie_idx, plus the
    first `tie_take` ties (by class id) of row tie_idx. Taking exactly M, rather than every
    tie, keeps "K_pl positives per sample on average" exact even when many scores tie
    (underflowed zeros, a constant model), and the (idx, class) order is the per-batch
    rule's flat-index order; it depends only on idx and class, so the result is the same
    however the rows are split over processes.
    """

    k: float
    num_samples: int
    num_classes: int
    num_positives: int
    threshold: float
    """The M-th largest forced score (+inf when K_pl = 1: exactly the true labels)."""
    num_greater: int
    """Entries strictly above the threshold."""
    num_equal: int
    """Entries equal to the threshold; num_greater < num_positives <= num_greater + num_equal."""
    tie_idx: int
    """Rows with idx < tie_idx take all their ties (num_samples when every tie is taken)."""
    tie_take: int
    """Ties taken in row tie_idx, the lowest class ids first."""

    def select(self, *, probs_NL: Any, labels_N: Any, idx_N: Any) -> np.ndarray:
        """N x L bool matrix of the positives of some rows (softmax probabilities, labels, sample idx)."""
        keys_NL = float_to_key(_forced(probs_NL, labels_N))
        if keys_NL.shape[1] != self.num_classes:
            raise ValueError(f"probs must have L={self.num_classes} columns, got shape {keys_NL.shape}")
        idx_N = _checked_idx(idx_N, num_rows=keys_NL.shape[0], num_samples=self.num_samples)
        key = _key(self.threshold)
        positive_NL = keys_NL > key
        tied_NL = keys_NL == key
        positive_NL |= tied_NL & (idx_N < self.tie_idx)[:, None]
        boundary = np.flatnonzero(idx_N == self.tie_idx)
        if boundary.size:
            tied_BL = tied_NL[boundary]
            positive_NL[boundary] |= tied_BL & (np.cumsum(tied_BL, axis=1) <= self.tie_take)
        return positive_NL

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GlobalPseudoLabeler:
    """Exact global pseudo-labels over a streamed N x L matrix, with summable int64 state.

    Every process streams its own chunks (softmax probabilities, labels, and sample idx in
    [0, N)) once per pass, and every process loads the same summed state after each pass:

        labeler = GlobalPseudoLabeler(k=2)
        while not labeler.done:
            for probs_NL, labels_N, idx_N in my_chunks:
                labeler.update(probs_NL=probs_NL, labels_N=labels_N, idx_N=idx_N)
            labeler.load_state(sum_over_processes(labeler.state()))   # DDP all_reduce, or a Ray driver's sum
        labeler.selection                                             # a GlobalSelection

    Passes 1 and 2 are StreamingSelector's (the exact M-th largest forced score and its tie
    counts: 65,536-bin histograms). Only when some but not all of the ties at that value are
    taken, a third pass counts the ties of every sample (a dense N-vector, 8 bytes a sample)
    to place the (idx, class) cut-off. A stateless worker (a Ray task) rebuilds the labeler
    of any pass from the totals so far with `resume`.
    """

    def __init__(self, *, k: float, num_classes: int | None = None) -> None:
        if not k >= 1:
            raise ValueError(f"pseudo-label K_pl must be >= 1 (every true label is a positive), got {k}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.k = float(k)
        self._num_classes = num_classes
        self._selector = StreamingSelector(ranks_fn=self._rank)
        self._num_positives = 0
        self._phase = "pass1"
        self._tie_key = np.uint32(0)
        self._tie_counts_N: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._ranked: RankedValue | None = None
        self.selection: GlobalSelection | None = None

    @classmethod
    def resume(cls, *, k: float, totals: list[Any]) -> GlobalPseudoLabeler:
        """The labeler of the pass that follows `totals` (the summed states of the passes done)."""
        labeler = cls(k=k)
        for total in totals:
            labeler.load_state(total)
        return labeler

    def _rank(self, num_rows: int, num_cols: int) -> list[int]:
        num_classes = self._num_classes or num_cols
        self._num_positives = num_pseudo_positives(batch_size=num_rows, num_classes=num_classes, k=self.k)
        return [self._num_positives]

    @property
    def ranked(self) -> RankedValue:
        """The M-th largest forced score with its tie counts, once pass 2 is loaded."""
        if self._ranked is None:
            raise RuntimeError(f"the M-th largest score is known after pass 2; the phase is {self._phase!r}")
        return self._ranked

    @property
    def num_kept(self) -> int:
        """Columns of the streamed rows (L, or T for top-T rows), once pass 1 is loaded."""
        return self._selector.num_cols

    @property
    def phase(self) -> str:
        """'pass1', 'pass2', 'ties' or 'done'."""
        return self._phase

    @property
    def done(self) -> bool:
        return self._phase == "done"

    def update(self, *, probs_NL: Any, labels_N: Any, idx_N: Any) -> None:
        """Adds a chunk: n x L softmax probabilities, n labels, n sample idx."""
        if self._phase == "done":
            raise RuntimeError("update after the selection is complete; read .selection")
        self.update_forced(forced_NL=_forced(probs_NL, labels_N), idx_N=idx_N)

    def update_forced(self, *, forced_NL: np.ndarray, idx_N: Any) -> None:
        """Adds a chunk of scores whose true labels are already forced to +inf (float32 n x L, or
        n x T top-T rows when the labeler was built with the full num_classes)."""
        if self._phase == "done":
            raise RuntimeError("update after the selection is complete; read .selection")
        if self._phase in ("pass1", "pass2"):
            self._selector.update(forced_NL)
            return
        idx_N = _checked_idx(idx_N, num_rows=forced_NL.shape[0], num_samples=self._tie_counts_N.size)
        tied_N = np.count_nonzero(float_to_key(forced_NL) == self._tie_key, axis=1)
        np.add.at(self._tie_counts_N, idx_N, tied_N)

    def state(self) -> np.ndarray:
        """This process's int64 state of the current pass; sum it over processes, then load_state the total."""
        if self._phase in ("pass1", "pass2"):
            return self._selector.state()
        if self._phase == "ties":
            tie_counts_N: npt.NDArray[np.int64] = self._tie_counts_N.copy()
            return tie_counts_N
        raise RuntimeError("state after the selection is complete; read .selection")

    def load_state(self, total: Any) -> None:
        """Loads the sum over processes of state() of the current pass and moves to the next."""
        if self._phase == "pass1":
            self._selector.load_state(total)
            self._selector.next_pass()
            self._phase = "pass2"
        elif self._phase == "pass2":
            self._selector.load_state(total)
            self._ranked = self._selector.values_at_ranks()[self._num_positives]
            if self._num_positives - self._ranked.num_greater == self._ranked.num_equal:
                self._finish(tie_idx=self._selector.num_rows, tie_take=0)  # every tie is taken
            else:
                self._tie_key = _key(self._ranked.value)
                self._tie_counts_N = np.zeros(self._selector.num_rows, dtype=np.int64)
                self._phase = "ties"
        elif self._phase == "ties":
            self._load_ties(np.asarray(total))
        else:
            raise RuntimeError("load_state after the selection is complete")

    def _load_ties(self, counts_N: np.ndarray) -> None:
        ranked = self.ranked
        if counts_N.shape != self._tie_counts_N.shape or not np.issubdtype(counts_N.dtype, np.integer):
            raise ValueError(
                f"tie-pass state must be an integer array of shape {self._tie_counts_N.shape}, "
                f"got {counts_N.dtype} of shape {counts_N.shape}"
            )
        if int(counts_N.sum()) != ranked.num_equal:
            raise ValueError(
                f"the tie pass counted {int(counts_N.sum())} ties, pass 2 counted {ranked.num_equal}: "
                "every pass must stream the same chunks, each sample idx once"
            )
        wanted = self._num_positives - ranked.num_greater
        cum_N = np.cumsum(counts_N)
        tie_idx = int(np.searchsorted(cum_N, wanted, side="left"))
        self._finish(tie_idx=tie_idx, tie_take=wanted - (int(cum_N[tie_idx - 1]) if tie_idx else 0))

    def _finish(self, *, tie_idx: int, tie_take: int) -> None:
        ranked = self.ranked
        self.selection = GlobalSelection(
            k=self.k,
            num_samples=self._selector.num_rows,
            num_classes=self._num_classes or self._selector.num_cols,
            num_positives=self._num_positives,
            threshold=ranked.value,
            num_greater=ranked.num_greater,
            num_equal=ranked.num_equal,
            tie_idx=tie_idx,
            tie_take=tie_take,
        )
        self._phase = "done"
