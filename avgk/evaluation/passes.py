"""The one reduction protocol: thresholds, metrics and global pseudo-labels as passes of summable states.

A pass spec says whether its passes are done, and runs the next pass over a stream of batches
(dicts of numpy arrays: "scores" N x L, "label" N, "idx" N, "posterior" N x L), given the summed
states of the passes before it. With `top=True` the batches hold top-T rows instead of the N x L
columns ("scores_top", "scores_cut", ...: avgk.evaluation.top_scores), and each reduction proves its result
equal to the full rows' or raises avgk.evaluation.top_scores.NotExact on the driver (the job then runs again
on full rows). A driver sums each pass's states over wherever the batches are:

- `run_passes_local` (here): one process, or the DDP ranks of a training run with
  `reduce=avgk.runtime.distributed.all_reduce_sum`;
- `pipelines.reduction.run_passes`: parallel Ray tasks over the blocks of a Ray Dataset, summed on
  the driver.

`evaluate` composes them into the metrics document (thresholds calibrated on val, test metrics,
the Bayes oracle): training's final evaluation and `avgk evaluate` both call it, with their own
driver, so they agree by construction.

Legend: N samples, L classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from avgk.config.evaluation import SetRuleConfig
from avgk.evaluation import set_rules as rules_module
from avgk.evaluation import top_scores
from avgk.evaluation.coverage_passes import CalibrationPass, CoverageCounts, CoverageMetricsPass
from avgk.evaluation.metrics import SetMetrics, format_k
from avgk.evaluation.set_rules import CalibratedRule
from avgk.evaluation.top_scores import NotExact, TopPseudoLabeler, TopThresholds
from avgk.method.pseudo_labels import GlobalPseudoLabeler, GlobalSelection
from avgk.method.streamed_thresholds import StreamingThresholds

Batch = dict[str, np.ndarray]
Reduce = Callable[[np.ndarray], np.ndarray]


class PassSpec(Protocol):
    """A reduction in passes over score batches; each pass returns a summable state."""

    def done(self, totals: list[Any]) -> bool:
        """Whether the passes whose summed states are `totals` are all there is."""

    def run(self, totals: list[Any], batches: Iterable[Batch]) -> Any:
        """This stream's state of the next pass: an int64 array or a dict of them."""


def _check_top(spec: Any) -> None:
    if spec.top and spec.num_classes is None:
        raise ValueError(f"{type(spec).__name__} over top-T rows needs num_classes (the full L), got None")


@dataclasses.dataclass(frozen=True)
class ThresholdsPass:
    """StreamingThresholds' two passes over one column: the exact lambda_K for every K."""

    ks: tuple[float, ...]
    column: str = "scores"
    top: bool = False
    """Batches hold top-T rows of `column` (TopThresholds) rather than the N x L column."""
    num_classes: int | None = None
    """The full L; needed with top=True (K's rank is round(K N) of N x L values)."""

    def __post_init__(self) -> None:
        _check_top(self)

    def calibrator(self, totals: list[Any]) -> StreamingThresholds | TopThresholds:
        calibrator: StreamingThresholds | TopThresholds
        if self.top:
            assert self.num_classes is not None  # __post_init__'s _check_top
            calibrator = TopThresholds(ks=self.ks, num_classes=self.num_classes)
        else:
            calibrator = StreamingThresholds(ks=self.ks)
        for number, total in enumerate(totals):
            calibrator.load_state(total)
            if number == 0:
                calibrator.next_pass()
        return calibrator

    def done(self, totals: list[Any]) -> bool:
        return len(totals) == 2

    def run(self, totals: list[Any], batches: Iterable[Batch]) -> np.ndarray | dict[str, np.ndarray]:
        calibrator = self.calibrator(totals)
        names = top_scores.columns(self.column)
        for batch in batches:
            if isinstance(calibrator, TopThresholds):  # self.top
                calibrator.update(top_NT=batch[names[top_scores.TOP]], cut_N=batch[names[top_scores.CUT]])
            else:
                calibrator.update(batch[self.column])
        return calibrator.state()


@dataclasses.dataclass(frozen=True)
class MetricsPass:
    """SetMetrics counts over one column, in one pass."""

    num_classes: int
    ks: tuple[float, ...]
    thresholds: tuple[tuple[float, float], ...]
    train_class_counts: tuple[int, ...] | None
    freq_bins: tuple[int, int]
    column: str = "scores"
    top: bool = False
    """Batches hold top-T rows of `column`; the state then also counts, per K, the rows whose set
    size the top-T rows cannot prove ("unproven_K"), and metrics() raises NotExact unless it is 0."""

    def metrics(self, totals: list[Any] | None = None) -> SetMetrics:
        counts = None if self.train_class_counts is None else np.asarray(self.train_class_counts, dtype=np.int64)
        metrics = SetMetrics(
            num_classes=self.num_classes, ks=self.ks, thresholds=dict(self.thresholds),
            train_class_counts=counts, freq_bins=self.freq_bins,
        )
        if totals:
            state = dict(totals[0])
            if self.top:
                unproven_K = np.asarray(state.pop("unproven_K"))
                for k, count in zip(self.ks, unproven_K.tolist(), strict=True):
                    if count:
                        raise NotExact(
                            f"K={k}: {count} row(s) of {self.column!r} keep a score not below lambda_K="
                            f"{dict(self.thresholds)[k]!r} out of their top-T: their set sizes are unknown"
                        )
            metrics.load_state(state)
        return metrics

    def done(self, totals: list[Any]) -> bool:
        return len(totals) == 1

    def run(self, totals: list[Any], batches: Iterable[Batch]) -> dict[str, np.ndarray]:
        metrics = self.metrics()
        if not self.top:
            for batch in batches:
                metrics.update(scores_NL=batch[self.column], labels_N=batch["label"])
            return metrics.state()
        names = top_scores.columns(self.column)
        thresholds = dict(self.thresholds)
        unproven_K = np.zeros(len(self.ks), dtype=np.int64)
        for batch in batches:
            metrics.update_top(top_NT=batch[names[top_scores.TOP]], true_N=batch[names[top_scores.TRUE]],
                               num_above_true_N=batch[names[top_scores.ABOVE_TRUE]], labels_N=batch["label"])
            unproven_K += top_scores.unproven_rows(cut_N=batch[names[top_scores.CUT]], thresholds=thresholds, ks=self.ks)
        return {**metrics.state(), "unproven_K": unproven_K}


@dataclasses.dataclass(frozen=True)
class PseudoLabelPass:
    """GlobalPseudoLabeler's passes over softmax score batches (idx, label, scores)."""

    k: float
    top: bool = False
    """Batches hold top-T rows of "scores" with their class ids (TopPseudoLabeler)."""
    num_classes: int | None = None
    """The full L; needed with top=True."""

    def __post_init__(self) -> None:
        _check_top(self)

    def labeler(self, totals: list[Any]) -> GlobalPseudoLabeler | TopPseudoLabeler:
        if self.top:
            assert self.num_classes is not None  # __post_init__'s _check_top
            return TopPseudoLabeler.resume(k=self.k, num_classes=self.num_classes, totals=totals)
        return GlobalPseudoLabeler.resume(k=self.k, totals=totals)

    def done(self, totals: list[Any]) -> bool:
        return self.labeler(totals).done

    def run(self, totals: list[Any], batches: Iterable[Batch]) -> Any:
        labeler = self.labeler(totals)
        names = top_scores.columns("scores")
        for batch in batches:
            if isinstance(labeler, TopPseudoLabeler):  # self.top
                labeler.update(top_NT=batch[names[top_scores.TOP]], classes_NT=batch[names[top_scores.CLASSES]],
                               cut_N=batch[names[top_scores.CUT]], labels_N=batch["label"], idx_N=batch["idx"])
            else:
                labeler.update(probs_NL=batch["scores"], labels_N=batch["label"], idx_N=batch["idx"])
        return labeler.state()

    def selection(self, totals: list[Any]) -> GlobalSelection:
        """The selection of the summed states of every pass; NotExact when top-T rows cannot prove it."""
        selection = self.labeler(totals).selection
        if selection is None:
            raise RuntimeError("the selection is not complete: run the remaining passes")
        return selection


def reduce_state(state: Any, reduce: Reduce) -> Any:
    """A pass state summed with `reduce`: an array, or a dict of arrays in sorted key order (every
    rank must issue its collectives in the same order)."""
    if isinstance(state, dict):
        return {key: reduce(value) for key, value in sorted(state.items())}
    return reduce(state)


@dataclasses.dataclass(frozen=True)
class CompactCounts:
    """A mostly-zero integer array in transit: its shape and dtype, where it is not zero, and the values there."""

    shape: tuple[int, ...]
    dtype: str
    index: np.ndarray
    """Flat positions of the nonzero entries, increasing."""
    values: np.ndarray


_COMPACT_MIN_SIZE = 4096


def compact_state(state: Any) -> Any:
    """A pass state for transport between processes: each large integer array that is mostly zeros as
    CompactCounts, everything else as is. A pass-2 histogram of the thresholds holds the few thousand
    values of one bucket in 65,536 bins; sent whole, such states are most of a top-T job's object store."""
    if isinstance(state, dict):
        return {key: compact_state(value) for key, value in state.items()}
    if isinstance(state, np.ndarray) and state.size >= _COMPACT_MIN_SIZE and np.issubdtype(state.dtype, np.integer):
        index = np.flatnonzero(state)
        if 2 * index.size < state.size:  # a position and a value per nonzero entry
            return CompactCounts(shape=state.shape, dtype=state.dtype.str, index=index, values=state.reshape(-1)[index])
    return state


def expand_state(state: Any) -> Any:
    """The inverse of compact_state: the same arrays, bit for bit."""
    if isinstance(state, dict):
        return {key: expand_state(value) for key, value in state.items()}
    if isinstance(state, CompactCounts):
        flat = np.zeros(math.prod(state.shape), dtype=np.dtype(state.dtype))
        flat[state.index] = state.values
        return flat.reshape(state.shape)
    return state


def run_passes_local(spec: PassSpec, batches: Callable[[], Iterable[Batch]], *, reduce: Reduce) -> list[Any]:
    """`spec`'s passes over `batches()` (called once per pass), each state summed with `reduce`."""
    totals: list[Any] = []
    while not spec.done(totals):
        totals.append(reduce_state(spec.run(totals, batches()), reduce))
    return totals


RunPasses = Callable[[PassSpec, str], list[Any]]
"""A driver: the summed states of a spec's passes over a split ("val" or "test")."""


@dataclasses.dataclass
class Evaluation:
    metrics: dict[str, Any]  # the metrics.json document
    per_class: dict[str, np.ndarray]
    thresholds: dict[float, float]
    set_rules: list[CalibratedRule] = dataclasses.field(default_factory=list)


def metrics_document(
    *, ks: list[float], score_head: str, thresholds: dict[float, float], test: SetMetrics, oracle: dict[str, Any] | None
) -> dict[str, Any]:
    """The metrics.json document; `oracle` is the compute() of SetMetrics over the true posteriors."""
    test_doc = test.compute()
    if oracle is not None:
        test_doc["oracle_avg_k_accuracy"] = oracle["avg_k_accuracy"]
        test_doc["oracle_macro_avg_k_accuracy"] = oracle["macro_avg_k_accuracy"]
        test_doc["gap_to_oracle"] = {
            key: oracle["avg_k_accuracy"][key] - test_doc["avg_k_accuracy"][key] for key in test_doc["avg_k_accuracy"]
        }
    return {
        "ks": ks,
        "score_head": score_head,
        "val": {"thresholds": {format_k(k): v for k, v in thresholds.items()}},
        "test": test_doc,
    }


def calibrate(
    run: RunPasses, split: str, *, ks: Iterable[float], column: str = "scores", top: bool = False,
    num_classes: int | None = None,
) -> dict[float, float]:
    """Exact lambda_K for every K over a split's `column` (top-T rows: num_classes is the full L)."""
    spec = ThresholdsPass(ks=tuple(float(k) for k in ks), column=column, top=top, num_classes=num_classes)
    return spec.calibrator(run(spec, split)).thresholds()


def count_metrics(
    run: RunPasses, split: str, *, num_classes: int, ks: Iterable[float], thresholds: dict[float, float],
    train_class_counts: np.ndarray | None, freq_bins: tuple[int, int], column: str = "scores", top: bool = False,
) -> SetMetrics:
    """SetMetrics of a split's `column` against its labels: counts summed, nothing averaged."""
    spec = MetricsPass(
        num_classes=int(num_classes), ks=tuple(float(k) for k in ks),
        thresholds=tuple((float(k), float(v)) for k, v in thresholds.items()),
        train_class_counts=None if train_class_counts is None else tuple(int(c) for c in train_class_counts),
        freq_bins=(int(freq_bins[0]), int(freq_bins[1])), column=column, top=top,
    )
    return spec.metrics(run(spec, split))


def calibrate_set_rules(
    run: RunPasses, split: str, *, rules: Sequence[SetRuleConfig], num_samples: int, num_classes: int,
    column: str = "scores", head: str | None = None,
) -> list[CalibratedRule]:
    """Every set rule at every coverage target, from a split's rows of `column` (`head`'s scores) gathered by
    sample index (exact)."""
    spec = CalibrationPass(rules=tuple(rules), num_samples=int(num_samples), num_classes=int(num_classes),
                           column=column, head=head)
    return spec.calibrate(run(spec, split))


def count_coverage(
    run: RunPasses, split: str, *, rules: Sequence[CalibratedRule], num_classes: int,
    train_class_counts: np.ndarray | None, freq_bins: tuple[int, int], column: str = "scores",
) -> CoverageCounts:
    """CoverageCounts of a split's rows for every calibrated target."""
    spec = CoverageMetricsPass(rules=tuple(rules), num_classes=int(num_classes), freq_bins=freq_bins, column=column,
                               train_class_counts=None if train_class_counts is None
                               else tuple(int(c) for c in train_class_counts))
    return spec.counts(run(spec, split))


def evaluate(
    run: RunPasses,
    *,
    ks: list[float],
    num_classes: int,
    train_class_counts: np.ndarray,
    freq_bins: tuple[int, int],
    score_head: str,
    with_posterior: bool,
    top: bool = False,
    set_rules: Sequence[SetRuleConfig] = (),
    num_val_samples: int | None = None,
    on_calibrated: Callable[[dict[str, list[CalibratedRule]]], None] | None = None,
) -> Evaluation:
    """Thresholds calibrated on val only, then every test metric; with the true posteriors (synthetic
    data) the Bayes oracle, thresholded the same way. top: the splits hold top-T rows (raises
    NotExact when they cannot prove a result). `set_rules` are calibrated on val's `num_val_samples`
    samples, each on its head's column (set_rules.by_column: "scores", or another head's, such as
    "softmax"), and on synthetic data on the true posteriors too (the Bayes-optimal sets);
    `on_calibrated` gets them by column ({"scores": [...], "softmax": [...], "posterior": [...]}) before
    any pass over test (a job that scores test then computes each row's sets from its full rows)."""
    thresholds = calibrate(run, "val", ks=ks, top=top, num_classes=num_classes)
    oracle_thresholds = None
    if with_posterior:
        oracle_thresholds = calibrate(run, "val", ks=ks, column="posterior", top=top, num_classes=num_classes)
    calibrated: dict[str, list[CalibratedRule]] = {}
    if set_rules:
        if num_val_samples is None:
            raise ValueError("set rules need num_val_samples (the val split's size in its manifest)")
        groups = rules_module.by_column(set_rules, score_head=score_head)
        if with_posterior:
            groups["posterior"] = list(set_rules)
        for column, group in groups.items():
            calibrated[column] = calibrate_set_rules(
                run, "val", rules=group, num_samples=num_val_samples, num_classes=num_classes, column=column,
                head=rules_module.head_of(column, score_head=score_head))
    if on_calibrated is not None:
        on_calibrated(calibrated)
    test = count_metrics(run, "test", num_classes=num_classes, ks=ks, thresholds=thresholds,
                         train_class_counts=train_class_counts, freq_bins=freq_bins, top=top)
    oracle = None
    if oracle_thresholds is not None:
        oracle = count_metrics(run, "test", num_classes=num_classes, ks=ks, thresholds=oracle_thresholds,
                               train_class_counts=None, freq_bins=freq_bins, column="posterior", top=top).compute()
    document = metrics_document(ks=ks, score_head=score_head, thresholds=thresholds, test=test, oracle=oracle)
    per_class = test.per_class()
    model_rules = [rule for column, rules in calibrated.items() if column != "posterior" for rule in rules]
    if model_rules:
        document["val"]["set_rules"] = rules_module.rules_summary(model_rules)
        document["test"]["set_rules"] = {}
        for column, rules in calibrated.items():
            if column != "posterior":
                counts = count_coverage(run, "test", rules=rules, num_classes=num_classes,
                                        train_class_counts=train_class_counts, freq_bins=freq_bins, column=column)
                document["test"]["set_rules"].update(counts.compute())
                per_class.update(counts.per_class())
    if "posterior" in calibrated:
        document["test"]["oracle_set_rules"] = count_coverage(
            run, "test", rules=calibrated["posterior"], num_classes=num_classes, train_class_counts=train_class_counts,
            freq_bins=freq_bins, column="posterior").compute()
    return Evaluation(metrics=document, per_class=per_class, thresholds=thresholds, set_rules=model_rules)
