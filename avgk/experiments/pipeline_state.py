"""What a pipeline has done: each cell's fingerprint, its record, and its state (done, to run and why).

A cell's fingerprint hashes what decides its result:
- its verb and options (`with:`);
- its resolved config without the `run` and `tracking` sections and the keys that say how a run
  executes, not what it learns (EXECUTION_KEYS: a training restarted with another CPU count or
  with GPUs resumes in its folder); a prepare cell counts only its `data` section; a tune cell also
  counts its sweep file's resolved content;
- the fingerprints of the cells it reads (so a change reruns everything downstream);
- the code: avgk.runtime.provenance.code_fingerprint(), a hash of every .py file of avgk and
  pipelines (an edit anywhere reruns every stage; a reused result always comes from this code).

A cell runs in `<root>/<stage>/<cell>-<fingerprint>/` and writes `record.json` there: written
"running" when it starts, "finished" (with its outputs) or "failed" when it ends. A finished record
with the same fingerprint is reused (unless the result it names under outputs.check, such as a prepare
cell's manifest, is gone); a changed cell gets a new folder, the old one stays.
Records live beside the results, so a pipeline resumes with tracking off or unreachable.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from avgk.config import flatten
from avgk.experiments.pipeline_plan import Cell, Plan
from avgk.records.runs import RESUME_FREE_KEYS
from avgk.runtime import provenance, storage

RECORD_FILE = "record.json"

EXECUTION_KEYS = tuple(k for k in RESUME_FREE_KEYS if k != "train.epochs" and not k.startswith(("run.", "tracking.")))
"""Config keys left out of a fingerprint: avgk.records.runs.RESUME_FREE_KEYS (what a resumed run may change)
except train.epochs, which changes the result a cell keeps."""

DONE, RUN, RESUME, UNREACHABLE = "done", "to run", "resume", "record unreachable"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_part(cell: Cell) -> dict[str, Any]:
    tree = cell.config.to_dict()
    if cell.verb == "prepare":
        return {"data": tree["data"]}
    flat = flatten({k: v for k, v in tree.items() if k not in ("run", "tracking")})
    return {k: v for k, v in flat.items() if k not in EXECUTION_KEYS}


def fingerprints(plan: Plan, *, code: str | None = None) -> dict[str, dict[str, Any]]:
    """{cell id: {"fingerprint": 12 hex digits, "parts": {config, options, inputs, code}}}, inputs first."""
    code = code or provenance.code_fingerprint()
    out: dict[str, dict[str, Any]] = {}
    for cell_id, cell in plan.cells.items():  # the plan lists every cell after its inputs
        parts = {
            "config": _digest(config_part(cell)),
            "options": _digest(cell.options),
            "inputs": _digest(sorted(out[i]["fingerprint"] for i in cell.inputs)),
            "code": code,
        }
        out[cell_id] = {"fingerprint": _digest({"verb": cell.verb, **parts})[:12], "parts": parts}
    return out


def stage_dir(plan: Plan, stage: str) -> str:
    return storage.join(plan.root, stage)


def cell_dir(plan: Plan, cell: Cell, fingerprint: str) -> str:
    return storage.join(stage_dir(plan, cell.stage), f"{cell.name}-{fingerprint}")


def read_record(folder: str) -> dict[str, Any] | None:
    path = storage.join(folder, RECORD_FILE)
    if not storage.exists(path):
        return None
    record: dict[str, Any] = storage.read_json(path)
    return record


def write_record(folder: str, record: dict[str, Any]) -> None:
    storage.write_json(storage.join(folder, RECORD_FILE), {**record, "written": time.time()})


@dataclass(frozen=True)
class State:
    state: str  # DONE, RUN, RESUME or UNREACHABLE
    why: str  # "reused", "new", "changed config", "changed input", "changed code", "interrupted", ...
    record: dict[str, Any] | None = None

    def describe(self) -> str:
        return self.state if self.state in (DONE, UNREACHABLE) else f"{self.state} ({self.why})"


def _earlier_records(plan: Plan, cell: Cell) -> list[dict[str, Any]]:
    """Finished records of this cell under other fingerprints, newest first."""
    prefix = f"{cell.name}-"
    records = []
    for rel in storage.list_files(stage_dir(plan, cell.stage)):
        folder, _, name = rel.rpartition("/")
        if name != RECORD_FILE or "/" in folder or not folder.startswith(prefix):
            continue
        record = storage.read_json(storage.join(stage_dir(plan, cell.stage), rel))
        if record.get("status") == "finished":
            records.append(record)
    return sorted(records, key=lambda r: r.get("written", 0), reverse=True)


RUN_AGAIN = frozenset({"predict"})
"""Verbs whose finished cells run again: their inputs are outside the graph (a folder or a bucket that
grows), and the work itself skips what it finished (the prediction job's parts)."""


def cell_state(plan: Plan, cell: Cell, fingerprint: dict[str, Any]) -> State:
    """What the runner will do with this cell, and why, from the records on storage."""
    try:
        record = read_record(cell_dir(plan, cell, fingerprint["fingerprint"]))
        if record is not None:
            check = (record.get("outputs") or {}).get("check")  # a result kept outside the cell's folder
            if record.get("status") == "finished" and check and not storage.exists(check):
                return State(RUN, "output missing")
            if record.get("status") == "finished" and cell.verb in RUN_AGAIN:
                return State(RESUME, "run again: its inputs may have grown (finished parts are reused)", record)
            if record.get("status") == "finished":
                return State(DONE, "reused", record)
            why = {"running": "interrupted", "partial": "some inputs had failed"}.get(str(record.get("status")), "failed before")
            return State(RESUME, why, record)
        earlier = _earlier_records(plan, cell)
    except OSError as err:
        return State(UNREACHABLE, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
    if not earlier:
        return State(RUN, "new")
    old = earlier[0].get("parts", {})
    new = fingerprint["parts"]
    # the code first (an edit changes every fingerprint), then an input's change (it usually changes this
    # cell's config too: the data section of a training), then the cell's own config and options
    for part, why in (("code", "changed code"), ("inputs", "changed input"), ("config", "changed config"),
                      ("options", "changed options")):
        if old.get(part) != new[part]:
            return State(RUN, why)
    return State(RUN, "new")


def states(plan: Plan, prints: dict[str, dict[str, Any]]) -> dict[str, State]:
    """Every cell's state. Once the records cannot be read, the other cells are not asked again
    (each would wait for the same storage): they are unreachable too."""
    out: dict[str, State] = {}
    for cell_id, cell in plan.cells.items():
        unreachable = next((s for s in out.values() if s.state == UNREACHABLE), None)
        out[cell_id] = unreachable or cell_state(plan, cell, prints[cell_id])
    return out
