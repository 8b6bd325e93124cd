"""Seconds per test file from the JUnit XML that `make test` writes (.test-durations.xml): the suite's budget.

    python -m tests.helpers.durations [.test-durations.xml] [--top 40] [--write tests/durations.json]

Sums setup, call and teardown of every test in a file (pytest's JUnit `time` attribute), so a change
can say what it added to the suite (BENCHMARKS.md, "Test suite budget"). `--write` also stores the
seconds per file as JSON: `make test` deals the longest files first by it (tests/helpers/scheduling.py).
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def _file_of(classname: str) -> str:
    """tests.unit.test_x (or tests.unit.test_x.TestClass) -> tests/unit/test_x.py."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        candidate = "/".join(parts[:end]) + ".py"
        if Path(candidate).is_file():
            return candidate
    return classname or "?"


def per_file(path: Path) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(path).getroot().iter("testcase"):
        seconds[_file_of(case.get("classname", ""))] += float(case.get("time", 0.0))
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", nargs="?", default=".test-durations.xml")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--write", type=Path, help="also write {file: seconds} here (the scheduler's table)")
    args = parser.parse_args(argv)
    seconds = per_file(Path(args.xml))
    if args.write:
        table = {name: round(value, 1) for name, value in sorted(seconds.items())}
        args.write.write_text(json.dumps(table, indent=1) + "\n")
    total = sum(seconds.values())
    print("| test file | seconds | share |\n| --- | ---: | ---: |")
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| `{name}` | {value:.1f} | {100 * value / total:.1f}% |")
    print(f"| all {len(seconds)} files (summed over both processes) | {total:.1f} | 100% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
