"""`avgk predict --run RUN --k K INPUT... --out OUT`: label sets for many images as a Ray Data job.

The driver lists the inputs (avgk.inference.prediction_parts: files, a bucket prefix or a shard set),
skips the parts an earlier run wrote with the same record, and streams the rest through a pool of
model actors (PredictActor: a SetPredictor each; one per GPU on a GPU cluster, else CPU actors that
leave half the cluster's CPUs to the readers). The actors read and decode their own images, so an
unreadable one becomes a row with its error, never a failed job. Rows come back in input order and
the inputs are sorted by part, so the driver holds one part at a time and writes it when complete:
bounded memory whatever the input size.

Equal to SetPredictor.predict on the same images: the same transform, model and head; only the
batches' composition differs (scores then differ in the last float bits), and a label whose score
lies within NEAR of the threshold is counted and reported, since its membership may flip.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import ray

from avgk.evaluation import set_rules
from avgk.evaluation.metrics import format_k
from avgk.evaluation.set_rules import CalibratedRule
from avgk.inference.prediction_parts import (
    DEFAULT_PARTS,
    JOB_FILE,
    Inputs,
    PartRecord,
    checkpoint_identity,
    done_parts,
    list_inputs,
    part_name,
    part_of,
    rows_to_parquet,
)
from avgk.records.runs import resolve_checkpoint, saved_run_config
from avgk.runtime import locks, storage
from avgk.runtime.console import say

NEAR = 1e-6
"""A score this close to the threshold may fall on either side of it in another batch."""


@dataclass
class PredictSummary:
    images: int = 0
    failed: int = 0
    parts: int = 0
    reused_parts: int = 0
    set_sizes: int = 0
    near_threshold: int = 0
    labelled: int = 0  # rows of a shard set with labels
    in_set: int = 0
    seconds: float = 0.0
    out: str | None = None
    steady_images: int = 0  # images after the first batch came back (actors started, model loaded) ...
    steady_seconds: float = 0.0  # ... and the seconds they took: the job's steady-state rate

    def line(self) -> str:
        scored = self.images - self.failed
        mean = self.set_sizes / scored if scored else float("nan")
        text = (f"predict: {self.images} images ({self.failed} failed), mean set size {mean:.2f}, "
                f"{self.parts} parts ({self.reused_parts} reused from an earlier run), {self.seconds:.0f} s")
        if self.labelled:
            text += f"; set accuracy {100 * self.in_set / self.labelled:.2f}% of {self.labelled} labelled"
        if self.near_threshold:
            text += f"; {self.near_threshold} with a score within {NEAR:g} of the threshold"
        return text + (f"; output: {self.out}" if self.out else "")


def rule_of(*, k: float | None, top_k: bool, rule: str | None = None, coverage: float | None = None) -> dict[str, Any]:
    """The choice of sets as a part's record keeps it (parts written with another choice are not reused)."""
    if rule is not None:
        return {"rule": rule, "coverage": format_k(coverage if coverage is not None else math.nan)}
    return {"k": format_k(k if k is not None else math.nan), "top_k": bool(top_k)}


def check_rule(run: str, *, k: float | None, top_k: bool, rule: str | None = None, coverage: float | None = None) -> None:
    """An uncalibrated K or set rule (or a fractional top-K) fails before any image is read or Ray starts."""
    if rule is not None or coverage is not None:
        if rule is None or coverage is None or k is not None or top_k:
            raise ValueError("a set rule needs --rule NAME and --coverage C, without --k or --top-k")
    elif k is None:
        raise ValueError("choose a calibrated K (--k) or a set rule (--rule NAME --coverage C)")
    elif top_k:
        if float(k) != int(k):
            raise ValueError(f"--top-k needs an integer --k, got {k}")
        return
    thresholds_file = storage.join(storage.absolute(run), "thresholds.json")
    if not storage.exists(thresholds_file):
        raise FileNotFoundError(f"no thresholds.json in run directory {run}: evaluate it first "
                                "(`avgk evaluate CONFIG --run DIR`)")
    document = storage.read_json(thresholds_file)
    if rule is not None:
        assert coverage is not None  # checked above
        set_rules.select(set_rules.rules_from_json(document.get("set_rules") or {}), name=rule, coverage=coverage)
        return
    calibrated = document["thresholds"]
    assert k is not None  # checked above
    if format_k(k) not in calibrated:
        raise ValueError(f"k={format_k(k)} was not calibrated for this run; calibrated K: "
                         f"{', '.join(sorted(calibrated, key=float))}")


class PredictActor:
    """One SetPredictor: reads, decodes and labels a batch of inputs; one row out per input."""

    def __init__(self, *, run: str, checkpoint: str, choice: dict[str, Any], batch_size: int, device: str,
                 num_threads: int) -> None:
        import torch

        from avgk.inference.predict import SetPredictor

        torch.set_num_threads(num_threads)
        self.predictor = SetPredictor.from_run(run, checkpoint, batch_size=batch_size, device=device)
        self.choice = choice
        chosen = self.predictor.rule(**choice)
        # "near the threshold" only has a meaning for one global threshold
        self.threshold = chosen if not isinstance(chosen, CalibratedRule) else (
            np.float32(chosen.threshold) if chosen.rule == "coverage" and chosen.threshold is not None else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from avgk.inference.predict import decode_image

        keys = [str(key) for key in batch["key"]]
        images, good = [], []
        errors: list[str | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            try:
                data = batch["image"][i] if "image" in batch else storage.read_bytes(key)
                images.append(decode_image(bytes(data)))
                good.append(i)
            except Exception as err:  # a corrupt, missing or non-image input is a row, never the job's end
                errors[i] = f"{type(err).__name__}: {err}"
        scores_NL = (self.predictor.score(images, head=self.predictor.head_of(**self.choice)) if images
                     else np.zeros((0, self.predictor.num_classes), np.float32))
        labels: list[list[int]] = [[] for _ in keys]
        scores: list[list[float]] = [[] for _ in keys]
        names: list[list[str]] = [[] for _ in keys]
        near = np.zeros(len(keys), dtype=bool)
        for row, scores_L, label_set in zip(good, scores_NL, self.predictor.sets_of(scores_NL, **self.choice),
                                            strict=True):
            labels[row], scores[row], names[row] = label_set.ids, label_set.scores, label_set.names
            if self.threshold is not None:
                near[row] = bool(np.any(np.abs(scores_L - self.threshold) < NEAR))
        columns: dict[str, Any] = {
            "part": pa.array(batch["part"].astype(np.int32)), "source": pa.array(keys),
            "labels": pa.array(labels, type=pa.list_(pa.int32())), "names": pa.array(names, type=pa.list_(pa.string())),
            "scores": pa.array(scores, type=pa.list_(pa.float32())),
            "set_size": pa.array([len(ids) if errors[i] is None else 0 for i, ids in enumerate(labels)], type=pa.int32()),
            "error": pa.array(errors, type=pa.string()), "near": pa.array(near),
        }
        if "label" in batch:
            truth = batch["label"].astype(np.int32)
            columns["label"] = pa.array(truth)
            columns["in_set"] = pa.array([int(t) in ids and errors[i] is None
                                          for i, (t, ids) in enumerate(zip(truth, labels, strict=True))])
        return pa.table(columns)


def _read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A shard set's tar file as rows: its part (the shard's number), sample key, image bytes and label."""
    import tarfile

    with storage.open_input_stream(str(row["url"])) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        sample: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample and sample["key"] != key:
                yield from _complete(sample, int(row["part"]))
                sample = {}
            file = tar.extractfile(member)
            payload = file.read() if file is not None else b""
            sample["key"] = key
            if ext in ("png", "jpg", "jpeg", "webp"):
                sample["image"] = payload
            elif ext == "cls":
                sample["label"] = int(payload)
        if sample:
            yield from _complete(sample, int(row["part"]))


def _complete(sample: dict[str, Any], part: int) -> Iterator[dict[str, Any]]:
    if "image" in sample:
        yield {"part": part, "key": sample["key"], "image": sample["image"], "label": sample.get("label", -1)}


class _Sink:
    """Where finished rows go: one Parquet part (and its record) at a time under OUT, or JSON lines."""

    def __init__(self, out: str | None, stream: IO[str], records: dict[int, PartRecord], summary: PredictSummary):
        self.out, self.stream, self.records, self.summary = out, stream, records, summary
        self.part: int | None = None
        self.rows: dict[str, list[Any]] = {}

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            if row["part"] != self.part:
                self.flush()
                self.part = row["part"]
            self.summary.images += 1
            self.summary.failed += row["error"] is not None
            self.summary.set_sizes += row["set_size"]
            self.summary.near_threshold += bool(row["near"])
            if row.get("label", -1) is not None and row.get("label", -1) >= 0:
                self.summary.labelled += 1
                self.summary.in_set += bool(row["in_set"])
            if self.out is None:
                shown = {k: row[k] for k in ("source", "labels", "names", "scores", "set_size") if row["error"] is None}
                self.stream.write(json.dumps(shown if row["error"] is None else
                                             {"source": row["source"], "error": row["error"]}) + "\n")
                continue
            for name in ("source", "labels", "names", "scores", "set_size", "error", "label", "in_set"):
                if name in row:
                    self.rows.setdefault(name, []).append(row[name])

    def flush(self) -> None:
        if self.out is None or self.part is None or not self.rows:
            self.stream.flush()
            return
        name = part_name(self.part)
        storage.write_bytes(storage.join(self.out, f"{name}.parquet"), rows_to_parquet(self.rows))
        count = len(self.rows["source"])
        failed = sum(e is not None for e in self.rows["error"])
        # the record last: a part counts as done only once its rows are there
        storage.write_json(storage.join(self.out, f"{name}.json"),
                           {**self.records[self.part].to_dict(), "rows": count, "failed": failed})
        self.rows = {}


def run_predict_job(*, run: str, k: float | None, inputs: list[str], out: str | None, split: str = "test",
                    top_k: bool = False, batch_size: int = 64, checkpoint: str | None = None,
                    num_parts: int | None = None, num_actors: int | None = None, progress: bool = True,
                    stream: IO[str] | None = None, log: Callable[[str], None] = say, rule: str | None = None,
                    coverage: float | None = None) -> PredictSummary:
    """Label every input; Parquet parts under `out` (resumable), or JSON lines on `stream` without it."""
    start = time.perf_counter()
    stream = stream if stream is not None else sys.stdout
    run = storage.absolute(run)
    out = storage.absolute(out) if out is not None else None
    if num_actors is not None and num_actors < 1:
        raise ValueError(f"--num-actors must be >= 1, got {num_actors}")
    lock = f"prediction output {out}"
    if out is not None:  # one job at a time writes a folder of parts on this machine (avgk.runtime.locks)
        holder = locks.claim(lock)
        if holder:
            raise ValueError(f"--out {out} is being written by another command ({holder}): wait for it to end "
                             "(then run this one again: it reuses the finished parts), or choose another --out")
    try:
        return _run(run=run, choice=dict(k=k, top_k=top_k, rule=rule, coverage=coverage), inputs=inputs, out=out,
                    split=split, batch_size=batch_size,
                    checkpoint=checkpoint, num_parts=num_parts, num_actors=num_actors, progress=progress,
                    stream=stream, log=log, start=start)
    finally:
        locks.release(lock)


def _run(*, run: str, choice: dict[str, Any], inputs: list[str], out: str | None, split: str, batch_size: int,
         checkpoint: str | None, num_parts: int | None, num_actors: int | None, progress: bool, stream: IO[str],
         log: Callable[[str], None], start: float) -> PredictSummary:
    from tqdm import tqdm

    from pipelines import job, scoring

    check_rule(run, **choice)
    saved = saved_run_config(run)
    checkpoint_file = resolve_checkpoint(run, checkpoint, default=saved.eval.checkpoint if saved else "best")
    found: Inputs = list_inputs(inputs, split=split)
    parts = _parts_of(found, out, num_parts)
    digests = found.digests(parts)
    rule = rule_of(**choice)
    identity = checkpoint_identity(checkpoint_file)
    records = {p: PartRecord(part=p, num_parts=parts, inputs=d, checkpoint=identity, rule=rule) for p, d in digests.items()}
    reused = done_parts(out, records.values()) if out is not None else set()
    summary = PredictSummary(parts=len(records), reused_parts=len(reused), out=out)
    if reused:
        log(f"predict: {len(reused)} of {len(records)} parts already written with this checkpoint and rule: reused")
    if out is not None:
        storage.write_json(storage.join(out, JOB_FILE), {"num_parts": parts, "inputs": found.kind, "run": run,
                                                         "checkpoint": identity, "rule": rule})
    todo = sorted(set(records) - reused)
    total = _count_todo(found, todo, parts)
    if total == 0:
        summary.seconds = time.perf_counter() - start
        log(summary.line())
        return summary

    job.join_cluster()
    scoring.quiet_ray_data()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # parts come back whole, one after another
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    plan = scoring.plan_scoring(use_gpu=use_gpu, num_actors=num_actors)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    rows = _input_rows(found, todo, parts, read_cpus=plan.read_cpus)
    labelled = rows.map_batches(
        PredictActor,
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.num_actors,
                                           initial_size=plan.min_actors),
        batch_size=batch_size,
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs=dict(run=run, checkpoint=checkpoint_file, choice=choice, batch_size=batch_size,
                                   device="cuda" if use_gpu else "cpu",
                                   num_threads=max(1, int(cpus // plan.num_actors)) if not use_gpu else 1),
    )
    sink = _Sink(out, stream, records, summary)
    log(f"predict: {total} images in {len(todo)} parts, {plan.num_actors} model actor(s) on "
        f"{'GPU' if use_gpu else 'CPU'}" + (f" -> {out}" if out else ""))
    with tqdm(total=total, unit="img", file=sys.stderr, disable=not progress, desc="predict") as bar:
        first: float | None = None
        for table in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(table, pa.Table)  # batch_format="pyarrow"
            sink.add(table)
            bar.update(table.num_rows)
            if first is None:
                first = time.perf_counter()
            else:
                summary.steady_images += table.num_rows
        summary.steady_seconds = time.perf_counter() - first if first is not None else 0.0
    sink.flush()
    summary.seconds = time.perf_counter() - start
    log(summary.line())
    return summary


def _parts_of(found: Inputs, out: str | None, wanted: int | None) -> int:
    """The number of parts: a shard set's shards; else the one OUT was written with, --parts, or the default."""
    if found.kind == "shards":
        assert found.manifest is not None and found.split is not None
        return len(found.manifest.split(found.split).shards)
    recorded = None
    if out is not None and storage.exists(storage.join(out, JOB_FILE)):
        recorded = int(storage.read_json(storage.join(out, JOB_FILE))["num_parts"])
    if wanted is not None and wanted < 1:
        raise ValueError(f"--parts must be >= 1, got {wanted}")
    if recorded is not None and wanted is not None and wanted != recorded:
        raise ValueError(f"--parts {wanted}: {out} was written with {recorded} parts (inputs go to parts by a hash "
                         f"of their key); give --parts {recorded}, or another --out")
    return recorded or wanted or DEFAULT_PARTS


def _count_todo(found: Inputs, todo: list[int], parts: int) -> int:
    if found.kind == "shards":
        assert found.manifest is not None and found.split is not None
        counts = found.manifest.split(found.split).shard_samples
        return sum(counts[p] for p in todo)
    wanted = set(todo)
    return sum(part_of(key, parts) in wanted for key in found.files)


def _input_rows(found: Inputs, todo: list[int], parts: int, *, read_cpus: float) -> ray.data.Dataset:
    """The inputs of the parts to do, in part order: (part, key) rows, or a shard set's samples."""
    if found.kind == "shards":
        assert found.manifest is not None and found.split is not None
        urls = found.manifest.shard_urls(found.split)
        shards = ray.data.from_items([{"part": p, "url": urls[p]} for p in todo], override_num_blocks=max(1, len(todo)))
        return shards.flat_map(_read_shard, num_cpus=read_cpus)
    wanted = set(todo)
    items = sorted((part_of(key, parts), key) for key in found.files if part_of(key, parts) in wanted)
    # At least a block per part and at most 256 rows a block: each block's labels reach the driver when its
    # block is done, so a part is written soon after its rows are scored, and a killed job loses only the
    # parts in flight (with fewer, larger blocks an actor's queued blocks finished together at the end).
    blocks = max(1, min(len(items), max(len(todo), math.ceil(len(items) / 256))))
    return ray.data.from_items([{"part": p, "key": key} for p, key in items], override_num_blocks=blocks)
