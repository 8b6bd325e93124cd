"""The Ray driver of avgk.evaluation.passes: exact streamed reductions over the blocks of a score dataset.

Parallel Ray tasks stream the blocks and return only mergeable int64 states (threshold
histograms, SetMetrics counts, pseudo-label tie counts), which the driver sums. No process,
driver included, ever holds the N x L matrix; the blocks live in Ray's object store, which
spills to disk beyond its memory.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import ray
import ray.data

from avgk.evaluation import passes
from avgk.evaluation.passes import PassSpec, RunPasses, ThresholdsPass

if TYPE_CHECKING:
    from typing import TypeAlias

    from ray.data.block import Block

    BlockRef: TypeAlias = ray.ObjectRef[Block]
    """A Ray Data block in the object store."""


@dataclasses.dataclass(frozen=True)
class TaskReport:
    """What one reduction task did: for balance checks and memory estimates."""

    pid: int
    num_blocks: int
    num_rows: int
    seconds: float
    peak_rss_bytes: int
    """Peak resident memory of the task's worker process (its whole life so far, object-store pages it read included)."""
    peak_traced_bytes: int
    """Peak of the task's own Python/numpy allocations (tracemalloc), when run_passes(trace_memory=True); else 0."""


@dataclasses.dataclass
class PassesResult:
    totals: list[Any]
    reports: list[list[TaskReport]]
    """One list per pass, one report per task."""


def _blocks(block_refs: list[BlockRef], counter: list[int]) -> Iterator[dict[str, np.ndarray]]:
    from ray.data.block import BlockAccessor

    for ref in block_refs:
        batch = cast(dict[str, np.ndarray], BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy"))
        counter[0] += len(next(iter(batch.values()))) if batch else 0
        yield batch


@ray.remote
def _pass_task(
    spec: PassSpec, totals: list[Any], block_refs: list[BlockRef], trace_memory: bool
) -> tuple[Any, TaskReport]:
    if trace_memory:
        tracemalloc.start()
    start = time.perf_counter()
    counter = [0]
    state = passes.compact_state(spec.run([passes.expand_state(t) for t in totals], _blocks(block_refs, counter)))
    seconds = time.perf_counter() - start
    traced = 0
    if trace_memory:
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    report = TaskReport(
        pid=os.getpid(), num_blocks=len(block_refs), num_rows=counter[0], seconds=seconds,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_traced_bytes=traced,
    )
    return state, report


def _sum_states(compacted: list[Any]) -> Any:
    states = [passes.expand_state(state) for state in compacted]
    if isinstance(states[0], dict):
        return {key: np.sum([s[key] for s in states], axis=0) for key in states[0]}
    return np.sum(states, axis=0)


def block_groups(ds: ray.data.Dataset, num_tasks: int | None) -> list[list[BlockRef]]:
    """The dataset's block references dealt round-robin into at most `num_tasks` groups.

    Executes a lazy dataset once and keeps its blocks in the object store (a materialised
    dataset costs nothing here); the driver only holds references.
    """
    refs = ds.to_arrow_refs()
    if num_tasks is None:
        num_tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    num_tasks = max(1, min(num_tasks, len(refs)))
    return [refs[i::num_tasks] for i in range(num_tasks)]


def run_passes(
    ds: ray.data.Dataset, spec: PassSpec, *, num_tasks: int | None = None, task_cpus: float = 1.0,
    groups: list[list[BlockRef]] | None = None, trace_memory: bool = False,
    log: Callable[[str], None] | None = None, label: str = "pass",
) -> PassesResult:
    """Runs `spec` pass after pass; each pass is `num_tasks` parallel tasks whose states the driver sums.

    `groups` (from block_groups) lets several reductions share one assignment of blocks to tasks.
    States and totals travel compacted (avgk.evaluation.passes.compact_state): mostly-zero histograms as their
    nonzero entries, small enough for Ray to pass inline instead of through the object store.
    """
    groups = groups or block_groups(ds, num_tasks)
    totals: list[Any] = []
    reports: list[list[TaskReport]] = []
    task = _pass_task.options(num_cpus=task_cpus)
    while not spec.done(totals):
        start = time.perf_counter()
        totals_ref = ray.put([passes.compact_state(total) for total in totals])
        results = ray.get([task.remote(spec, totals_ref, group, trace_memory) for group in groups])
        totals.append(_sum_states([state for state, _ in results]))
        reports.append([report for _, report in results])
        if log is not None:
            rows = sum(report.num_rows for report in reports[-1])
            log(f"{label}: pass {len(totals)} over {rows} rows in {len(groups)} tasks, "
                f"{time.perf_counter() - start:.1f} s")
    return PassesResult(totals=totals, reports=reports)


def ray_runner(
    datasets: dict[str, ray.data.Dataset], *, num_tasks: int | None = None, log: Callable[[str], None] | None = None
) -> RunPasses:
    """The Ray driver of avgk.evaluation.passes: each pass in parallel tasks over a split's dataset, summed on the driver."""
    def run(spec: PassSpec, split: str) -> list[Any]:
        kind = "thresholds" if isinstance(spec, ThresholdsPass) else "metrics"
        oracle = "oracle " if getattr(spec, "column", "scores") == "posterior" else ""
        return run_passes(datasets[split], spec, num_tasks=num_tasks, log=log, label=f"{split} {oracle}{kind}").totals

    return run
