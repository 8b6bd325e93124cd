"""Global pseudo-labels (docs/METHOD.md section 3, "at scale"): the `avgk pseudolabel` Ray job and the in-training refresh.

Both score the training split with the softmax head, force every true label to +inf and
keep exactly M = round(K_pl * N) entries of the N x L matrix with avgk.pseudo_labels'
GlobalPseudoLabeler: two streamed histogram passes find the exact M-th largest value, and
ties at that value are taken in (sample idx, class id) order until M is reached (a third,
counting pass, only when some but not all ties fit). The table goes to
<run_dir>/pseudo_labels/ as parquet (idx int64, labels list<int32>; the selection and
its provenance in the file metadata), written into a temporary folder and renamed into place.

- `run_pseudolabel` (the job): Ray Data scores the split with a checkpoint (pipelines.score),
  parallel tasks run the passes over the scores in the object store and write one part
  each; the driver only sums int64 states.
- `OfflinePseudoLabels` (loss.pseudo_labels=offline): engine.fit's pseudo_targets_for_epoch
  hook. Every R epochs, all training ranks score their share of the split with the current
  model (the latest checkpoint's weights), run the same passes with states all-reduced over
  the ranks, and build the same table on every rank; rank 0 writes it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from avgk import distributed as dist
from avgk import engine, storage
from avgk.config import Config
from avgk.pseudo_labels import (
    PSEUDO_LABELS_DIR,
    GlobalPseudoLabeler,
    GlobalSelection,
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
from pipelines import ray_env
from pipelines.score import block_groups, quiet_ray_data, run_passes, score_dataset

SOFTMAX = "softmax"


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _describe(selection: GlobalSelection, **provenance: Any) -> dict[str, Any]:
    return {**selection.to_json(), "score_head": SOFTMAX, "split": "train", **provenance}


def _summary(selection: GlobalSelection) -> str:
    ties = selection.num_positives - selection.num_greater
    return (
        f"{selection.num_positives} positives over {selection.num_samples} samples (K_pl={selection.k:g}), "
        f"threshold {selection.threshold:.6g}, {ties} of {selection.num_equal} tied entries taken"
    )


# ====================================================================== the Ray job


class PseudoLabelPass:
    """GlobalPseudoLabeler's passes over score rows (idx, label, scores = softmax probabilities)."""

    def __init__(self, k: float) -> None:
        self.k = k

    def done(self, totals: list[Any]) -> bool:
        return GlobalPseudoLabeler.resume(k=self.k, totals=totals).done

    def run(self, totals: list[Any], batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
        labeler = GlobalPseudoLabeler.resume(k=self.k, totals=totals)
        for batch in batches:
            labeler.update(probs_NL=batch["scores"], labels_N=batch["label"], idx_N=batch["idx"])
        return labeler.state()


@ray.remote
def _write_part(
    selection: GlobalSelection, metadata: dict[str, Any], block_refs: list[ray.ObjectRef], uri: str
) -> tuple[int, int]:
    """One task's rows of the table as one parquet part; returns (rows, positives)."""
    from ray.data.block import BlockAccessor

    idx, counts, labels = [], [], []
    for ref in block_refs:
        batch = BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")
        positive_NL = selection.select(probs_NL=batch["scores"], labels_N=batch["label"], idx_N=batch["idx"])
        counts_N, labels_P = positives_as_rows(positive_NL)
        idx.append(batch["idx"].astype(np.int64))
        counts.append(counts_N)
        labels.append(labels_P)
    idx_R, counts_R, labels_P = (np.concatenate(parts) for parts in (idx, counts, labels))
    write_parquet(uri, pseudo_label_arrow_table(idx_R=idx_R, counts_R=counts_R, labels_P=labels_P, metadata=metadata))
    return int(idx_R.size), int(labels_P.size)


def select_dataset(
    ds: ray.data.Dataset, *, k: float, num_tasks: int | None = None, groups: list[list[ray.ObjectRef]] | None = None
) -> GlobalSelection:
    """The exact global selection over a Dataset of softmax score rows (idx, label, scores), in parallel tasks."""
    spec = PseudoLabelPass(k)
    result = run_passes(ds, spec, num_tasks=num_tasks, groups=groups)
    return GlobalPseudoLabeler.resume(k=k, totals=result.totals).selection


def write_table_dataset(
    ds: ray.data.Dataset, selection: GlobalSelection, *, run_dir: str, metadata: dict[str, Any],
    num_tasks: int | None = None, groups: list[list[ray.ObjectRef]] | None = None,
) -> str:
    """<run_dir>/pseudo_labels/part-*.parquet written by parallel tasks, published once complete."""
    groups = groups or block_groups(ds, num_tasks)
    final = storage.join(run_dir, PSEUDO_LABELS_DIR)
    tmp = temporary_dir_for(final)
    try:
        written = ray.get([
            _write_part.remote(selection, metadata, group, storage.join(tmp, f"part-{i:05d}.parquet"))
            for i, group in enumerate(groups)
        ])
        num_rows, num_positives = (sum(column) for column in zip(*written))
        if (num_rows, num_positives) != (selection.num_samples, selection.num_positives):
            raise RuntimeError(
                f"pseudo-label parts hold {num_rows} rows / {num_positives} positives, the selection "
                f"{selection.num_samples} / {selection.num_positives}: the score dataset changed between passes"
            )
        publish_dir(tmp, final)
    except BaseException:
        remove_dir(tmp)
        raise
    return final


def run_pseudolabel(
    config: Config,
    *,
    run: str | None = None,
    checkpoint: str | None = None,
    num_actors: int | None = None,
    log: Callable[[str], None] = _print,
) -> tuple[GlobalSelection, str]:
    """Global pseudo-labels of the training split from a run's checkpoint -> <run_dir>/pseudo_labels/.

    K_pl is `config`'s loss.pseudo_k (default loss.k); scoring follows the checkpoint's own
    config as in `avgk evaluate`. The train scores are materialised once in the object store
    (which spills to disk) and read by every pass. Returns the selection and the table's URI.
    """
    from pipelines.calibrate import prepare_job

    config, run_dir, scoring = prepare_job(config, run=run, checkpoint=checkpoint)
    if SOFTMAX not in scoring.heads:
        raise ValueError(
            f"global pseudo-labels need the softmax head; the checkpoint's loss {scoring.config.loss.name!r} "
            f"has heads {list(scoring.heads)}"
        )
    k = config.loss.effective_pseudo_k
    ray_env.connect()
    quiet_ray_data()
    log(f"pseudo-labelling the train split with {scoring.uri} (softmax head, K_pl={k:g})")
    start = time.perf_counter()
    scores = score_dataset(
        scoring, shards_dir=config.data.shards, split="train", head=SOFTMAX, with_posterior=False,
        use_gpu=config.train.use_gpu, num_actors=num_actors or config.eval.num_actors,
        gpu_wait_seconds=config.eval.gpu_wait_seconds,
    ).materialize()
    log(f"scored train: {scores.count()} samples in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    groups = block_groups(scores, None)
    selection = select_dataset(scores, k=k, groups=groups)
    metadata = _describe(selection, source="avgk pseudolabel", checkpoint=scoring.uri, created=time.time())
    uri = write_table_dataset(scores, selection, run_dir=run_dir, metadata=metadata, groups=groups)
    log(f"{_summary(selection)}; table {uri} in {time.perf_counter() - start:.1f} s")
    return selection, uri


# ====================================================================== in training


class ScoreSpool:
    """One rank's scored chunks on local disk, read back one chunk at a time (memory: one chunk).

    A rank's share of the training scores (N / ranks x L float32, 5.5 GB per rank for
    PlantCLEF on 8 ranks) would not fit in memory; the passes re-read it from a temporary
    file instead of running the model again.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._file = tempfile.TemporaryFile()
        self._labels: list[np.ndarray] = []
        self._idx: list[np.ndarray] = []

    def append(self, *, probs_NL: np.ndarray, labels_N: np.ndarray, idx_N: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(probs_NL, dtype=np.float32).tobytes())
        self._labels.append(np.asarray(labels_N, dtype=np.int64))
        self._idx.append(np.asarray(idx_N, dtype=np.int64))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        self._file.seek(0)
        for labels_N, idx_N in zip(self._labels, self._idx):
            count = labels_N.size * self.num_classes
            probs = np.frombuffer(self._file.read(count * 4), dtype=np.float32).reshape(labels_N.size, self.num_classes)
            yield probs, labels_N, idx_N

    def close(self) -> None:
        self._file.close()


def score_train_split(parts: engine.Parts) -> ScoreSpool:
    """This rank's share of the training split (each sample on exactly one rank), softmax head, spooled."""
    batches = engine.split_loader(parts, "train", with_posterior=False)
    pending: deque[np.ndarray] = deque()

    def keep_idx(stream: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # score_batches yields one chunk per batch it pulls, so the idx queue stays in step.
        for batch in stream:
            pending.append(batch["idx"].numpy())
            yield batch

    spool = ScoreSpool(parts.num_classes)
    chunks = engine.score_batches(parts.model, keep_idx(batches), head=SOFTMAX, device=parts.device, config=parts.config)
    for chunk in chunks:
        spool.append(probs_NL=chunk.scores_NL, labels_N=chunk.labels_N, idx_N=pending.popleft())
    return spool


def select_distributed(spool: ScoreSpool, *, k: float) -> GlobalSelection:
    """The global selection over every rank's spool: the labeler's states summed with all_reduce."""
    labeler = GlobalPseudoLabeler(k=k)
    while not labeler.done:
        for probs_NL, labels_N, idx_N in spool:
            labeler.update(probs_NL=probs_NL, labels_N=labels_N, idx_N=idx_N)
        labeler.load_state(dist.all_reduce_sum(labeler.state()))
    return labeler.selection


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
    """engine.fit's pseudo_targets_for_epoch for loss.pseudo_labels=offline; runs on every rank.

    Epochs before the first refresh (0 .. R-1) use the per-batch online rule (None: there
    is no trained model to score with yet). At each epoch e > 0 with e % R == 0 the table is
    recomputed from the current weights, which are those of the checkpoint of epoch e; the
    epochs up to the next refresh reuse it. A run resumed between two refreshes reloads the
    table rank 0 wrote for its refresh epoch (recomputing only if that one is missing).
    """

    def __init__(self, *, run_dir: str, k: float, refresh_epochs: int, log: Callable[[str], None] = _print) -> None:
        self.run_dir = run_dir
        self.k = float(k)
        self.refresh_epochs = int(refresh_epochs)
        self.log = log
        self._table: PseudoLabelTable | None = None
        self._table_epoch = -1

    def __call__(self, parts: engine.Parts, epoch: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if epoch < self.refresh_epochs:
            return None
        refresh = epoch - epoch % self.refresh_epochs
        if self._table_epoch != refresh:
            table = self._saved_table(refresh, parts) if epoch != refresh else None
            self._table = table or self._compute(parts, refresh)
            self._table_epoch = refresh
        table, num_classes = self._table, parts.num_classes
        return lambda idx_B: table.targets(idx_B, num_classes=num_classes)

    def _saved_table(self, refresh: int, parts: engine.Parts) -> PseudoLabelTable | None:
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

    def _compute(self, parts: engine.Parts, refresh: int) -> PseudoLabelTable:
        start = time.perf_counter()
        spool = score_train_split(parts)
        try:
            selection = select_distributed(spool, k=self.k)
            metadata = _describe(
                selection, source="training", trained_epochs=refresh,
                checkpoint=f"weights after epoch {refresh} (its checkpoint) of {self.run_dir}", created=time.time(),
            )
            table = gather_table(spool, selection, metadata)
        finally:
            spool.close()
        if dist.is_main():
            uri = write_table(table, self.run_dir)
            self.log(
                f"epoch {refresh + 1}: global pseudo-labels: {_summary(selection)}; "
                f"{uri} in {time.perf_counter() - start:.1f} s"
            )
        return table
