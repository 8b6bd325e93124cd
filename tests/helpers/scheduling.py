"""How `make test` deals test files to its two processes: whole files (or groups of files sharing a costly
session fixture), the longest first by the seconds in tests/durations.json.

Why not `--dist loadgroup`: xdist 3.8 groups by rewriting `item._nodeid`, which pytest 9 no longer
reads (a node's id lives in `_id`), so every test went to whichever process was free and each file's
module fixtures (its Ray cluster, its trained run, the demo's run) were built in both processes.
Files, not tests, are the unit here, through xdist's own scheduler hook.

Longest first (LPT): the files that take minutes start at once, and the many short ones fill in at
the end, so neither process waits long for the other. A file missing from tests/durations.json (a new
one) counts as the mean of the known files; refresh the table with
`python -m tests.helpers.durations --write tests/durations.json` after a `make test`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdist.scheduler import LoadScopeScheduling

DURATIONS = Path(__file__).resolve().parents[1] / "durations.json"


class FileScheduling(LoadScopeScheduling):
    """LoadScopeScheduling with a file (or a named group of files) as the scope, ordered by expected seconds."""

    def __init__(self, config: Any, log: Any = None, *, groups: dict[str, str]) -> None:
        super().__init__(config, log)
        self.groups = groups
        self.seconds: dict[str, float] = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        self._ordered = False

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return self.groups.get(path, path)

    def _expected_seconds(self, scope: str, nodeids: dict[str, bool]) -> float:
        files = {nodeid.split("::", 1)[0] for nodeid in nodeids}
        default = sum(self.seconds.values()) / len(self.seconds) if self.seconds else 0.0
        return sum(self.seconds.get(f, default) for f in files)

    def _assign_work_unit(self, node: Any) -> None:
        if not self._ordered:  # the first deal: the work queue (files in collection order) longest first
            self._ordered = True
            units = sorted(self.workqueue.items(), key=lambda unit: -self._expected_seconds(*unit))
            self.workqueue.clear()
            self.workqueue.update(units)
        super()._assign_work_unit(node)
