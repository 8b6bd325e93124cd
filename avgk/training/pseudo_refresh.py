"""Global pseudo-labels during training (docs/METHOD.md section 3, "at scale"): loss.pseudo_labels=offline.

Every R epochs all training ranks score their share of the training split with the softmax
head of the current model, spool the scores to local disk, and run avgk.method.pseudo_labels'
GlobalPseudoLabeler passes with their states summed over the ranks: every rank then holds the
same table (exactly M = round(K_pl N) positives, ties taken in (idx, class) order), and rank 0
writes it to <run_dir>/pseudo_labels/. `avgk pseudolabel` (pipelines/pseudolabel.py) runs the
same selection as a Ray job over a checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from avgk.evaluation.passes import PseudoLabelPass, run_passes_local
from avgk.method.pseudo_label_table import (
    PSEUDO_LABELS_DIR,
    PseudoLabelTable,
    concat_ranges,
    positives_as_rows,
    pseudo_label_arrow_table,
    publish_dir,
    read_pseudo_label_table,
    remove_dir,
    temporary_dir_for,
    write_parquet,
)
from avgk.method.pseudo_labels import GlobalPseudoLabeler, GlobalSelection
from avgk.runtime import distributed as dist
from avgk.runtime import storage
from avgk.runtime.console import say
from avgk.training.evaluation import score_batches, split_loader
from avgk.training.parts import Parts

SOFTMAX = "softmax"


def describe_selection(selection: GlobalSelection, **provenance: Any) -> dict[str, Any]:
    """The table's metadata: the selection, the head and split it was made on, and where it came from."""
    return {**selection.to_json(), "score_head": SOFTMAX, "split": "train", **provenance}


def summarize_selection(selection: GlobalSelection) -> str:
    ties = selection.num_positives - selection.num_greater
    return (
        f"{selection.num_positives} positives over {selection.num_samples} samples (K_pl={selection.k:g}), "
        f"threshold {selection.threshold:.6g}, {ties} of {selection.num_equal} tied entries taken"
    )


class ScoreSpool:
    """One rank's scored chunks on local disk, read back one chunk at a time (memory: one chunk).

    A rank's share of the training scores (N / ranks x L float32, 5.5 GB per rank for
    PlantCLEF on 8 ranks) would not fit in memory; the passes re-read it from a temporary
    file instead of running the model again.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 -- the spool owns the file; close() closes it
        self._labels: list[np.ndarray] = []
        self._idx: list[np.ndarray] = []

    def append(self, *, probs_NL: np.ndarray, labels_N: np.ndarray, idx_N: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(probs_NL, dtype=np.float32).tobytes())
        self._labels.append(np.asarray(labels_N, dtype=np.int64))
        self._idx.append(np.asarray(idx_N, dtype=np.int64))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        self._file.seek(0)
        for labels_N, idx_N in zip(self._labels, self._idx, strict=True):
            count = labels_N.size * self.num_classes
            probs = np.frombuffer(self._file.read(count * 4), dtype=np.float32).reshape(labels_N.size, self.num_classes)
            yield probs, labels_N, idx_N

    def close(self) -> None:
        self._file.close()


def score_train_split(parts: Parts) -> ScoreSpool:
    """This rank's share of the training split (each sample on exactly one rank), softmax head, spooled."""
    batches = split_loader(parts, "train", with_posterior=False)
    pending: deque[np.ndarray] = deque()

    def keep_idx(stream: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # score_batches yields one chunk per batch it pulls, so the idx queue stays in step.
        for batch in stream:
            pending.append(batch["idx"].numpy())
            yield batch

    spool = ScoreSpool(parts.num_classes)
    chunks = score_batches(parts.model, keep_idx(batches), head=SOFTMAX, device=parts.device, config=parts.config)
    for chunk in chunks:
        spool.append(probs_NL=chunk.scores_NL, labels_N=chunk.labels_N, idx_N=pending.popleft())
    return spool


def select_distributed(spool: ScoreSpool, *, k: float) -> GlobalSelection:
    """The global selection over every rank's spool: avgk.evaluation.passes' PseudoLabelPass, states summed with all_reduce."""
    def batches() -> Iterator[dict[str, np.ndarray]]:
        return ({"scores": probs_NL, "label": labels_N, "idx": idx_N} for probs_NL, labels_N, idx_N in spool)

    totals = run_passes_local(PseudoLabelPass(k=k), batches, reduce=dist.all_reduce_sum)
    selection = GlobalPseudoLabeler.resume(k=k, totals=totals).selection
    if selection is None:
        raise RuntimeError("the selection is not complete: run the remaining passes")
    return selection


def gather_table(spool: ScoreSpool, selection: GlobalSelection, metadata: dict[str, Any]) -> PseudoLabelTable:
    """The whole table on every rank: each rank fills its own rows of the dense CSR arrays, and
    a sum over ranks (the rows are disjoint) assembles them; 8 (N + M) bytes of all-reduce."""
    idx, counts, labels = [], [], []
    for probs_NL, labels_N, idx_N in spool:
        counts_N, labels_P = positives_as_rows(selection.select(probs_NL=probs_NL, labels_N=labels_N, idx_N=idx_N))
        idx.append(idx_N)
        counts.append(counts_N)
        labels.append(labels_P)
    idx_R = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    counts_R = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    labels_P = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int32)
    counts_N = np.zeros(selection.num_samples, dtype=np.int64)
    counts_N[idx_R] = counts_R
    counts_N = dist.all_reduce_sum(counts_N)
    offsets_N1 = np.zeros(selection.num_samples + 1, dtype=np.int64)
    np.cumsum(counts_N, out=offsets_N1[1:])
    if offsets_N1[-1] != selection.num_positives:
        raise RuntimeError(
            f"the ranks' rows hold {int(offsets_N1[-1])} positives, the selection {selection.num_positives}"
        )
    labels_M = np.zeros(selection.num_positives, dtype=np.int64)
    labels_M[concat_ranges(offsets_N1[idx_R], counts_R)] = labels_P
    labels_M = dist.all_reduce_sum(labels_M).astype(np.int32)
    return PseudoLabelTable(offsets_N1=offsets_N1, labels_M=labels_M, metadata=metadata)


def write_table(table: PseudoLabelTable, run_dir: str) -> str:
    """The whole table as one parquet part in <run_dir>/pseudo_labels/, published once written."""
    final = storage.join(run_dir, PSEUDO_LABELS_DIR)
    tmp = temporary_dir_for(final)
    try:
        write_parquet(storage.join(tmp, "part-00000.parquet"), pseudo_label_arrow_table(
            idx_R=np.arange(table.num_samples), counts_R=np.diff(table.offsets_N1), labels_P=table.labels_M,
            metadata=table.metadata,
        ))
        publish_dir(tmp, final)
    except BaseException:
        remove_dir(tmp)
        raise
    return final


class OfflinePseudoLabels:
    """The training targets for loss.pseudo_labels=offline, built by engine.fit; runs on every rank.

    Epochs before the first refresh (0 .. R-1) use the per-batch online rule (None: there
    is no trained model to score with yet). At each epoch e > 0 with e % R == 0 the table is
    recomputed from the current weights, which are those of the checkpoint of epoch e; the
    epochs up to the next refresh reuse it. A run resumed between two refreshes reloads the
    table rank 0 wrote for its refresh epoch (recomputing only if that one is missing).
    """

    def __init__(self, *, run_dir: str, k: float, refresh_epochs: int, log: Callable[[str], None] = say) -> None:
        self.run_dir = run_dir
        self.k = float(k)
        self.refresh_epochs = int(refresh_epochs)
        self.log = log
        self._table: PseudoLabelTable | None = None
        self._table_epoch = -1

    def __call__(self, parts: Parts, epoch: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if epoch < self.refresh_epochs:
            return None
        refresh = epoch - epoch % self.refresh_epochs
        if self._table_epoch != refresh:
            table = self._saved_table(refresh, parts) if epoch != refresh else None
            self._table = table or self._compute(parts, refresh)
            self._table_epoch = refresh
        table, num_classes = self._table, parts.num_classes
        assert table is not None  # set above for this refresh
        return lambda idx_B: table.targets(idx_B, num_classes=num_classes)

    def _saved_table(self, refresh: int, parts: Parts) -> PseudoLabelTable | None:
        table = None
        if dist.is_main():
            try:
                saved = read_pseudo_label_table(storage.join(self.run_dir, PSEUDO_LABELS_DIR))
                meta = saved.metadata
                if (meta.get("source"), meta.get("trained_epochs"), meta.get("k")) == ("training", refresh, self.k) \
                        and saved.num_samples == parts.manifest.split("train").num_samples:
                    table = saved
            except (FileNotFoundError, ValueError):
                pass
        return dist.broadcast_object(table)  # every rank takes the same branch (computing is collective)

    def _compute(self, parts: Parts, refresh: int) -> PseudoLabelTable:
        start = time.perf_counter()
        spool = score_train_split(parts)
        try:
            selection = select_distributed(spool, k=self.k)
            metadata = describe_selection(
                selection, source="training", trained_epochs=refresh,
                checkpoint=f"weights after epoch {refresh} (its checkpoint) of {self.run_dir}", created=time.time(),
            )
            table = gather_table(spool, selection, metadata)
        finally:
            spool.close()
        if dist.is_main():
            uri = write_table(table, self.run_dir)
            self.log(
                f"epoch {refresh + 1}: global pseudo-labels: {summarize_selection(selection)}; "
                f"{uri} in {time.perf_counter() - start:.1f} s"
            )
        return table
