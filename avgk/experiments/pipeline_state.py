"""What a pipeline has done: each cell's fingerprint, its record, and its state (done, to run and why).

A cell's fingerprint hashes what decides its result:
- its verb and options (`with:`);
- its resolved config without the `run` and `tracking` sections (where results go and are
  reported does not change them); a prepare cell counts only its `data` section;
- the fingerprints of the cells it reads (so a change reruns everything downstream);
- the code: avgk.runtime.provenance.code_fingerprint(), a hash of every .py file of avgk and
  pipelines (an edit anywhere reruns every stage; a reused result always comes from this code).

A cell runs in `<root>/<stage>/<cell>-<fingerprint>/` and writes `record.json` there: written
"running" when it starts, "finished" (with its outputs) or "failed" when it ends. A finished record
with the same fingerprint is reused; a changed cell gets a new folder, the old one stays.
Records live beside the results, so a pipeline resumes with tracking off or unreachable.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from avgk.experiments.pipeline_spec import Cell, Plan
from avgk.runtime import provenance, storage

RECORD_FILE = "record.json"

DONE, RUN, RESUME, UNREACHABLE = "done", "to run", "resume", "record unreachable"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_part(cell: Cell) -> dict[str, Any]:
    tree = cell.config.to_dict()
    if cell.verb == "prepare":
        return {"data": tree["data"]}
    return {k: v for k, v in tree.items() if k not in ("run", "tracking")}


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


def cell_state(plan: Plan, cell: Cell, fingerprint: dict[str, Any]) -> State:
    """What the runner will do with this cell, and why, from the records on storage."""
    try:
        record = read_record(cell_dir(plan, cell, fingerprint["fingerprint"]))
        if record is not None:
            if record.get("status") == "finished":
                return State(DONE, "reused", record)
            return State(RESUME, "interrupted" if record.get("status") == "running" else "failed before", record)
        earlier = _earlier_records(plan, cell)
    except OSError as err:
        return State(UNREACHABLE, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
    if not earlier:
        return State(RUN, "new")
    old = earlier[0].get("parts", {})
    new = fingerprint["parts"]
    # an input's change first: it usually changes this cell's config too (the data section of a training)
    for part, why in (("inputs", "changed input"), ("config", "changed config"), ("options", "changed options"),
                      ("code", "changed code")):
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
