"""Global pseudo-labels (docs/METHOD.md section 3, "at scale"): the `avgk pseudolabel` Ray job.

It scores the training split with the softmax head, forces every true label to +inf and
keep exactly M = round(K_pl * N) entries of the N x L matrix with avgk.method.pseudo_labels'
GlobalPseudoLabeler: two streamed histogram passes find the exact M-th largest value, and
ties at that value are taken in (sample idx, class id) order until M is reached (a third,
counting pass, only when some but not all ties fit). The table goes to
<run_dir>/pseudo_labels/ as parquet (idx int64, labels list<int32>; the selection and
its provenance in the file metadata), written into a temporary folder and renamed into place.

`run_pseudolabel` (the job): Ray Data scores the split with a checkpoint (pipelines.scoring),
parallel tasks run the passes over the scores in the object store and write one part each; the
driver only sums int64 states. By default (eval.score_rows=top) the object store holds only each
sample's top-T scores and their class ids; when they cannot prove the selection (a sample with
more than T candidates at the threshold), the job says so and scores the split again with full
rows. The same selection during training (loss.pseudo_labels=offline) is avgk.training.pseudo_refresh,
run by the training ranks themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from avgk.config import Config
from avgk.evaluation import top_scores
from avgk.evaluation.passes import PseudoLabelPass
from avgk.method.pseudo_label_table import (
    PSEUDO_LABELS_DIR,
    positives_as_rows,
    pseudo_label_arrow_table,
    publish_dir,
    remove_dir,
    temporary_dir_for,
    write_parquet,
)
from avgk.method.pseudo_labels import GlobalSelection
from avgk.runtime import storage
from avgk.runtime.console import say
from avgk.training.pseudo_refresh import SOFTMAX, describe_selection, summarize_selection
from pipelines import job
from pipelines.reduction import block_groups, run_passes
from pipelines.scoring import quiet_ray_data, score_dataset, top_t_for
from pipelines.scoring_inputs import load_job_inputs

if TYPE_CHECKING:
    from pipelines.reduction import BlockRef

# ====================================================================== the Ray job


@ray.remote
def _write_part(
    selection: GlobalSelection, metadata: dict[str, Any], block_refs: list[BlockRef], uri: str, top: bool
) -> tuple[int, int]:
    """One task's rows of the table as one parquet part; returns (rows, positives)."""
    from ray.data.block import BlockAccessor

    idx, counts, labels = [], [], []
    for ref in block_refs:
        batch = BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")
        if top:
            names = top_scores.columns("scores")
            forced_NT, classes_NT, cut_N = top_scores.force_top_rows(
                top_NT=batch[names[top_scores.TOP]], classes_NT=batch[names[top_scores.CLASSES]],
                cut_N=batch[names[top_scores.CUT]], labels_N=batch["label"],
            )
            counts_N, labels_P = top_scores.select_top_rows(
                selection, forced_NT=forced_NT, classes_NT=classes_NT, cut_N=cut_N, idx_N=batch["idx"]
            )
        else:
            positive_NL = selection.select(probs_NL=batch["scores"], labels_N=batch["label"], idx_N=batch["idx"])
            counts_N, labels_P = positives_as_rows(positive_NL)
        idx.append(batch["idx"].astype(np.int64))
        counts.append(counts_N)
        labels.append(labels_P)
    idx_R, counts_R, labels_P = (np.concatenate(parts) for parts in (idx, counts, labels))
    write_parquet(uri, pseudo_label_arrow_table(idx_R=idx_R, counts_R=counts_R, labels_P=labels_P, metadata=metadata))
    return int(idx_R.size), int(labels_P.size)


def select_dataset(
    ds: ray.data.Dataset, *, k: float, num_tasks: int | None = None, groups: list[list[BlockRef]] | None = None,
    log: Callable[[str], None] | None = None, top: bool = False, num_classes: int | None = None,
) -> GlobalSelection:
    """The exact global selection over a Dataset of softmax score rows (idx, label, scores), in parallel tasks.

    top: the rows are top-T rows with class ids of `num_classes` scores; raises NotExact when they
    cannot prove the selection.
    """
    spec = PseudoLabelPass(k=k, top=top, num_classes=num_classes)
    result = run_passes(ds, spec, num_tasks=num_tasks, groups=groups, log=log, label="selection")
    return spec.selection(result.totals)


def write_table_dataset(
    ds: ray.data.Dataset, selection: GlobalSelection, *, run_dir: str, metadata: dict[str, Any],
    num_tasks: int | None = None, groups: list[list[BlockRef]] | None = None, top: bool = False,
) -> str:
    """<run_dir>/pseudo_labels/part-*.parquet written by parallel tasks, published once complete."""
    groups = groups or block_groups(ds, num_tasks)
    final = storage.join(run_dir, PSEUDO_LABELS_DIR)
    tmp = temporary_dir_for(final)
    try:
        written = ray.get([
            _write_part.remote(selection, metadata, group, storage.join(tmp, f"part-{i:05d}.parquet"), top)
            for i, group in enumerate(groups)
        ])
        num_rows, num_positives = (sum(column) for column in zip(*written, strict=True))
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
    log: Callable[[str], None] = say,
) -> tuple[GlobalSelection, str]:
    """Global pseudo-labels of the training split from a run's checkpoint -> <run_dir>/pseudo_labels/.

    K_pl is `config`'s loss.pseudo_k (default loss.k); scoring follows the checkpoint's own
    config as in `avgk evaluate`. The train scores are materialised once in the object store
    (which spills to disk) and read by every pass. Returns the selection and the table's URI.
    """
    config, run_dir, scoring, manifest = load_job_inputs(config, run=run, checkpoint=checkpoint)
    if SOFTMAX not in scoring.heads:
        raise ValueError(
            f"global pseudo-labels need the softmax head; the checkpoint's loss {scoring.config.loss.name!r} "
            f"has heads {list(scoring.heads)}"
        )
    k = config.loss.effective_pseudo_k
    config = job.start(config, cpus=0, resume=None, data=False)  # the inputs were checked above
    quiet_ray_data()
    log(f"pseudo-labelling the train split with {scoring.uri} (softmax head, K_pl={k:g})")

    def label(top_t: int | None) -> tuple[GlobalSelection, str]:
        start = time.perf_counter()
        scores = score_dataset(
            scoring, manifest=manifest, split="train", head=SOFTMAX, with_posterior=False,
            use_gpu=config.train.use_gpu, num_actors=num_actors or config.eval.num_actors,
            gpu_wait_seconds=config.eval.gpu_wait_seconds, top_t=top_t, with_classes=True,
        ).materialize()
        rows = "full rows" if top_t is None else f"top-{top_t} rows"
        log(f"scored train: {scores.count()} samples in {time.perf_counter() - start:.1f} s ({rows})")
        start = time.perf_counter()
        groups = block_groups(scores, None)
        top = top_t is not None
        selection = select_dataset(scores, k=k, groups=groups, log=log, top=top, num_classes=scoring.num_classes)
        metadata = describe_selection(selection, source="avgk pseudolabel", checkpoint=scoring.uri, created=time.time())
        uri = write_table_dataset(scores, selection, run_dir=run_dir, metadata=metadata, groups=groups, top=top)
        log(f"{summarize_selection(selection)}; table {uri} in {time.perf_counter() - start:.1f} s")
        return selection, uri

    top_t = top_t_for(config, max_k=k)
    if top_t is None:
        return label(None)
    return top_scores.exact_or_full(lambda: label(top_t), lambda: label(None), log=log, what="pseudolabel")
