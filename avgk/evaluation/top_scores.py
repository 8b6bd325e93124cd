"""Top-T score rows: thresholds, set metrics and global pseudo-labels without the N x L matrix, proven exact at run time.

Legend: N rows, L classes, T scores kept per row (T' = min(T, L)).

lambda_K, the metrics at lambda_K and the global pseudo-labels only ever look at the
m = round(K N) largest of the N x L scores. A scoring job can therefore keep, per row, its T
largest scores and a few exact numbers (the row's top-T form, `top_rows`):

    {column}_top          N x T' float32   the row's T' largest scores, descending
    {column}_top_classes  N x T' int32     their class ids (only for pseudo-labels)
    {column}_cut          N float32        the largest score NOT kept (-inf when T >= L)
    {column}_true         N float32        the true label's score
    {column}_above_true   N int32          #{j : score[j] > score[label]} (top-K accuracy)

"Largest" is in float_to_key order (the selection's own order: -0.0 below +0.0, NaN at the
ends), so every score not kept is <= its row's cut. Exactness is then a property of numbers the
passes compute anyway, checked before any result is returned:

- lambda_K: every value above c = max over rows of the cut is kept, so the kept values' ranks
  m and m + 1 are the full matrix's as soon as the kept (m+1)-th largest is >= c;
- set metrics at lambda: a row's set size #{j: s_j >= lambda} is exact when its cut < lambda
  (the true label's score and top-K counts are stored exactly for every row);
- global pseudo-labels: the M-th largest forced score, its tie counts and the positives are
  exact when that value is > c.

When a check fails the reduction raises NotExact (naming K, the values and the rule) and the
job that ran it falls back to full score rows (pipelines.evaluate, pipelines.pseudolabel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from avgk.method.streamed_thresholds import StreamingSelector
from avgk.method.thresholds import (
    float32_midpoint,
    float_to_key,
    key_to_float,
    rank_for_k,
    validate_ks,
)

if TYPE_CHECKING:
    from avgk.method.pseudo_labels import GlobalSelection

__all__ = [
    "NotExact",
    "TopPseudoLabeler",
    "TopThresholds",
    "default_top_t",
    "exact_or_full",
    "force_top_rows",
    "select_top_rows",
    "top_rows",
    "unproven_rows",
]

Result = TypeVar("Result")

TOP, CLASSES, CUT, TRUE, ABOVE_TRUE = "_top", "_top_classes", "_cut", "_true", "_above_true"
_SIGN = np.uint32(1 << 31)
# Rows per block of top_rows: bounds its temporaries (keys, topk) to a few L-wide blocks.
_BLOCK_ROWS = 2048


class NotExact(Exception):
    """A top-T reduction could not prove its result equal to the full matrix's; run it on full rows."""


def default_top_t(*, max_k: float) -> int:
    """T kept per row for the largest K evaluated: 8 x ceil(K), at least 16.

    lambda_K needs each row's scores above it; a row holds K of them on average, so 8K leaves
    room for rows eight times more ambiguous than the average before the run-time check fails.
    """
    if not (max_k > 0 and math.isfinite(max_k)):
        raise ValueError(f"max_k must be a finite number > 0, got {max_k}")
    return max(16, 8 * math.ceil(max_k))


def columns(column: str) -> dict[str, str]:
    """Names of the top-T columns of `column` ("scores" or "posterior")."""
    return {part: column + part for part in (TOP, CLASSES, CUT, TRUE, ABOVE_TRUE)}


# ---------------------------------------------------------------- the rows


def _descending_keys(scores_NL: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys N x count uint32, class ids N x count int64): each row's `count` largest keys, descending."""
    # XOR of the top bit turns the uint32 keys into int32 in the same order: torch's topk has no uint32.
    signed_NL = torch.from_numpy((float_to_key(scores_NL) ^ _SIGN).view(np.int32))
    # Unsorted topk, then a sort of the few kept: twice as fast as a sorted topk at T=80, L=1,081.
    values, indices = torch.topk(signed_NL, count, dim=1, largest=True, sorted=False)
    values, order = torch.sort(values, dim=1, descending=True)
    indices = torch.gather(indices, 1, order)
    return values.numpy().view(np.uint32) ^ _SIGN, indices.numpy()


def top_rows(
    *, scores_NL: Any, labels_N: Any, top_t: int, column: str = "scores", with_classes: bool = False
) -> dict[str, np.ndarray]:
    """The top-T columns (module docstring) of N x L scores and their N labels."""
    scores_NL = np.ascontiguousarray(scores_NL, dtype=np.float32)
    labels_N = np.asarray(labels_N, dtype=np.int64)
    if scores_NL.ndim != 2 or labels_N.shape != scores_NL.shape[:1]:
        raise ValueError(f"scores must be N x L and labels N, got {scores_NL.shape} and {labels_N.shape}")
    if top_t < 1:
        raise ValueError(f"top_t must be >= 1, got {top_t}")
    num_rows, num_classes = scores_NL.shape
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {labels_N.min()} max {labels_N.max()}")
    kept = min(top_t, num_classes)
    names = columns(column)
    out = {
        names[TOP]: np.empty((num_rows, kept), dtype=np.float32),
        names[CUT]: np.full(num_rows, -np.inf, dtype=np.float32),
        names[TRUE]: np.empty(num_rows, dtype=np.float32),
        names[ABOVE_TRUE]: np.empty(num_rows, dtype=np.int32),
    }
    if with_classes:
        out[names[CLASSES]] = np.empty((num_rows, kept), dtype=np.int32)
    for start in range(0, num_rows, _BLOCK_ROWS):
        rows = slice(start, min(start + _BLOCK_ROWS, num_rows))
        block_NL = scores_NL[rows]
        # One more than kept: the (T+1)-th key is the cut, the largest score not kept.
        keys_NK, classes_NK = _descending_keys(block_NL, min(kept + 1, num_classes))
        out[names[TOP]][rows] = key_to_float(np.ascontiguousarray(keys_NK[:, :kept]))
        if kept < num_classes:
            out[names[CUT]][rows] = key_to_float(np.ascontiguousarray(keys_NK[:, kept]))
        if with_classes:
            out[names[CLASSES]][rows] = classes_NK[:, :kept]
        true_N = block_NL[np.arange(block_NL.shape[0]), labels_N[rows]]
        out[names[TRUE]][rows] = true_N
        # The same comparison as SetMetrics.update's top-K count on the full rows.
        out[names[ABOVE_TRUE]][rows] = np.count_nonzero(block_NL > true_N[:, None], axis=1)
    return out


def force_top_rows(
    *, top_NT: Any, classes_NT: Any, cut_N: Any, labels_N: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, classes, cut) of the rows with every true label's score forced to +inf, in top-T form.

    A kept true label becomes +inf in place (the cut is unchanged). A true label not kept comes
    in as +inf in front and the row's T-th value goes out, which becomes the cut: every score
    not kept is still <= the cut. The result is only ever read as a multiset per row plus
    class ids, so the order within a row does not matter.
    """
    values_NT = np.array(top_NT, dtype=np.float32)
    classes_NT = np.array(classes_NT, dtype=np.int32)
    cut_N = np.array(cut_N, dtype=np.float32)
    labels_N = np.asarray(labels_N, dtype=np.int64)
    if values_NT.ndim != 2 or values_NT.shape != classes_NT.shape or not cut_N.shape == labels_N.shape == values_NT.shape[:1]:
        raise ValueError(
            f"top rows must be N x T values and classes with N cuts and labels, got {values_NT.shape}, "
            f"{classes_NT.shape}, {cut_N.shape}, {labels_N.shape}"
        )
    is_label_NT = classes_NT == labels_N[:, None]
    kept_N = is_label_NT.any(axis=1)
    values_NT[is_label_NT] = np.inf
    missing = np.flatnonzero(~kept_N)
    if missing.size:
        # Rows are descending, so the last column is the row's smallest kept value.
        cut_N[missing] = values_NT[missing, -1]
        values_NT[missing, -1] = np.inf
        classes_NT[missing, -1] = labels_N[missing]
    return values_NT, classes_NT, cut_N


def _max_cut_selector() -> StreamingSelector:
    """The exact largest cut over all rows: a streamed rank-1 selection over the N x 1 cuts."""
    return StreamingSelector(ranks_fn=lambda num_rows, num_cols: [1])


def _key(value: float) -> int:
    return int(float_to_key(np.array([value], dtype=np.float32))[0])


# ---------------------------------------------------------------- lambda_K


class TopThresholds:
    """lambda_K for each K from top-T rows of an N x L matrix: StreamingThresholds' two passes, proven exact.

    Two StreamingSelectors run in lockstep: one over the kept values (ranks m, m + 1 from the
    global N and the full L), one for the largest cut. Same protocol as StreamingThresholds:
    update* -> state -> load_state(summed) -> next_pass -> update* -> load_state -> thresholds(),
    with a dict state {"values", "cuts"} of int64 arrays.
    """

    def __init__(self, *, ks: Iterable[float], num_classes: int) -> None:
        self._ks = validate_ks(ks)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self._num_classes = int(num_classes)
        self._ms: dict[float, int] = {}
        self._unreachable: list[float] = []
        self._values = StreamingSelector(ranks_fn=self._ranks)
        self._cuts = _max_cut_selector()

    def _ranks(self, num_rows: int, num_kept: int) -> list[int]:
        self._ms = {k: rank_for_k(num_samples=num_rows, num_classes=self._num_classes, k=k) for k in self._ks}
        num_values = num_rows * num_kept
        self._unreachable = [k for k, m in self._ms.items() if m + 1 > num_values]
        # Ranks past the kept values cannot be proven; rank 1 keeps pass 2 well-formed, thresholds() raises.
        return [r for m in self._ms.values() for r in (m, m + 1) if r <= num_values] or [1]

    def update(self, *, top_NT: Any, cut_N: Any) -> None:
        cut_N = np.asarray(cut_N, dtype=np.float32)
        self._values.update(top_NT)
        self._cuts.update(cut_N.reshape(-1, 1))

    def state(self) -> dict[str, np.ndarray]:
        return {"values": self._values.state(), "cuts": self._cuts.state()}

    def load_state(self, total: Mapping[str, Any]) -> None:
        if set(total) != {"values", "cuts"}:
            raise ValueError(f"a TopThresholds state has keys ['cuts', 'values'], got {sorted(total)}")
        self._values.load_state(total["values"])
        self._cuts.load_state(total["cuts"])

    def next_pass(self) -> None:
        self._values.next_pass()
        self._cuts.next_pass()

    def thresholds(self) -> dict[float, float]:
        """{float(K): lambda_K}, equal bit for bit to the full rows'; raises NotExact where unproven."""
        values = self._values.values_at_ranks()
        cut = self._cuts.values_at_ranks()[1].value
        num_kept = self._values.num_cols
        for k in self._unreachable:
            raise NotExact(
                f"K={k}: lambda_K needs rank m+1={self._ms[k] + 1} but top-{num_kept} rows keep only "
                f"{self._values.num_rows} x {num_kept} values: raise eval.top_t above {num_kept}"
            )
        for k, m in self._ms.items():
            lower = values[m + 1].value
            # Every value above the cut is kept; ranks m and m+1 are exact iff s_(m+1) >= the largest cut.
            if _key(lower) < _key(cut):
                raise NotExact(
                    f"K={k}: the (m+1)-th largest kept score {lower!r} (m={m}) is below the largest score "
                    f"not kept, {cut!r}: some row has more than {num_kept} scores that may rank above it"
                )
        return {k: float32_midpoint(values[m].value, values[m + 1].value) for k, m in self._ms.items()}


def unproven_rows(*, cut_N: Any, thresholds: Mapping[float, float], ks: Iterable[float]) -> np.ndarray:
    """Per K (int64, in `ks` order): rows whose set size at lambda_K is not known from top-T rows (cut >= lambda_K)."""
    cut_N = np.asarray(cut_N, dtype=np.float32)
    # "not (cut < lambda)" also counts a NaN cut as unproven.
    return np.array(
        [np.count_nonzero(~(cut_N < np.float32(thresholds[k]))) for k in ks], dtype=np.int64
    )


# ---------------------------------------------------------------- global pseudo-labels


class TopPseudoLabeler:
    """GlobalPseudoLabeler over top-T rows of softmax scores, proven exact at run time.

    The labeler streams the forced kept values (force_top_rows) with the full L, and a rank-1
    selector finds the largest cut in the same two passes. The selection is exact iff its
    threshold (the M-th largest forced score) is above that cut: then every entry at or above
    the threshold is kept, so the tie counts and the positives are the full matrix's. A state is
    a dict of int64 arrays; `done` becomes true after pass 2 when the proof fails, and
    `selection` then raises NotExact.
    """

    def __init__(self, *, k: float, num_classes: int) -> None:
        from avgk.method.pseudo_labels import GlobalPseudoLabeler

        self._labeler = GlobalPseudoLabeler(k=k, num_classes=num_classes)
        self._cuts = _max_cut_selector()
        self._num_passes = 0
        self._failure: str | None = None

    @classmethod
    def resume(cls, *, k: float, num_classes: int, totals: list[Any]) -> TopPseudoLabeler:
        labeler = cls(k=k, num_classes=num_classes)
        for total in totals:
            labeler.load_state(total)
        return labeler

    @property
    def done(self) -> bool:
        return self._failure is not None or self._labeler.done

    def update(self, *, top_NT: Any, classes_NT: Any, cut_N: Any, labels_N: Any, idx_N: Any) -> None:
        forced_NT, _, cut_N = force_top_rows(top_NT=top_NT, classes_NT=classes_NT, cut_N=cut_N, labels_N=labels_N)
        self._labeler.update_forced(forced_NL=forced_NT, idx_N=idx_N)
        if self._num_passes < 2:
            self._cuts.update(cut_N.reshape(-1, 1))

    def state(self) -> dict[str, np.ndarray]:
        state = {"labels": self._labeler.state()}
        if self._num_passes < 2:
            state["cuts"] = self._cuts.state()
        return state

    def load_state(self, total: Mapping[str, Any]) -> None:
        if self.done:
            raise RuntimeError("load_state after the selection is complete")
        self._labeler.load_state(total["labels"])
        if self._num_passes < 2:
            self._cuts.load_state(total["cuts"])
            if self._num_passes == 0:
                self._cuts.next_pass()
        self._num_passes += 1
        if self._num_passes == 2:
            ranked = self._labeler.ranked
            cut = self._cuts.values_at_ranks()[1].value
            if _key(ranked.value) <= _key(cut):
                self._failure = (
                    f"K_pl={self._labeler.k}: the M-th largest forced score {ranked.value!r} (M={ranked.rank}) is not "
                    f"above the largest score not kept, {cut!r}: some row has more than "
                    f"{self._labeler.num_kept} scores that may be positives"
                )

    @property
    def selection(self) -> GlobalSelection:
        """The GlobalSelection, equal to the full rows'; raises NotExact when unproven."""
        if self._failure is not None:
            raise NotExact(self._failure)
        selection = self._labeler.selection
        if not self._labeler.done or selection is None:
            raise RuntimeError("the selection is not complete: run the remaining passes")
        return selection


def select_top_rows(
    selection: GlobalSelection, *, forced_NT: Any, classes_NT: Any, cut_N: Any, idx_N: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(counts_N int64, labels_P int32) of forced top-T rows under `selection`: the same positives as
    GlobalSelection.select on the full rows followed by positives_as_rows (class ids ascending per row).

    Needs every cut below the selection's threshold (what TopPseudoLabeler proves); raises otherwise.
    """
    values_NT = np.asarray(forced_NT, dtype=np.float32)
    classes_NT = np.asarray(classes_NT, dtype=np.int64)
    cut_N = np.asarray(cut_N, dtype=np.float32)
    idx_N = np.asarray(idx_N, dtype=np.int64)
    key = np.uint32(_key(selection.threshold))
    if cut_N.size and int(float_to_key(cut_N).max()) >= key:
        raise ValueError(
            f"a row's largest score not kept ({float(cut_N.max())!r}) is not below the selection threshold "
            f"{selection.threshold!r}: these top-T rows cannot give its positives"
        )
    keys_NT = float_to_key(values_NT)
    positive_NT = keys_NT > key
    tied_NT = keys_NT == key
    positive_NT |= tied_NT & (idx_N < selection.tie_idx)[:, None]
    for row in np.flatnonzero(idx_N == selection.tie_idx):
        tied_classes = np.sort(classes_NT[row][tied_NT[row]])[: selection.tie_take]
        positive_NT[row] |= np.isin(classes_NT[row], tied_classes) & tied_NT[row]
    rows_P, cols_P = np.nonzero(positive_NT)
    labels_P = classes_NT[rows_P, cols_P]
    order = np.lexsort((labels_P, rows_P))  # rows in order, class ids ascending within a row
    counts_N = np.count_nonzero(positive_NT, axis=1).astype(np.int64)
    return counts_N, labels_P[order].astype(np.int32)


def exact_or_full(top: Callable[[], Result], full: Callable[[], Result], *, log: Callable[[str], None], what: str) -> Result:
    """top() when it proves its result; else says why and returns full() (the full-rows job)."""
    try:
        return top()
    except NotExact as error:
        log(f"{what}: top-T score rows cannot prove the result ({error}); falling back to full score rows")
        return full()
