"""Line coverage before and after a change, line by line, across moved files (issue 29's "nothing lost").

    python benchmarks/coverage_compare.py BEFORE.json AFTER.json --old 787c60b --new HEAD [--repo .]

BEFORE.json and AFTER.json are `coverage json` reports (`make coverage` writes coverage.json) of the
suite at the two commits. A line covered before counts as kept when the same text (stripped) is a
covered line of the file it moved to (git's rename detection between the commits), or of any other
file (a module split into several); as deleted when that text no longer occurs in the file
(removed or rewritten) nor covered elsewhere; as lost when it occurs in its file only on lines the
suite no longer runs. Prints the totals and every lost line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import defaultdict
from pathlib import Path


def renames(repo: str, old: str, new: str) -> dict[str, str]:
    out = subprocess.run(["git", "-C", repo, "diff", "-M", "--name-status", old, new], capture_output=True, text=True,
                         check=True).stdout
    moved = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0].startswith("R"):
            moved[parts[1]] = parts[2]
    return moved


def file_lines(repo: str, commit: str, path: str) -> list[str]:
    proc = subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def covered(report: dict, root: str) -> dict[str, set[int]]:
    out = {}
    for name, data in report["files"].items():
        rel = str(Path(name).resolve().relative_to(root)) if Path(name).is_absolute() else name
        out[rel] = set(data["executed_lines"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--old", required=True)
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--before-root", default=None, help="the checkout the BEFORE report was measured in")
    parser.add_argument("--after-root", default=None, help="the checkout the AFTER report was measured in")
    args = parser.parse_args()
    before = covered(json.loads(Path(args.before).read_text()), str(Path(args.before_root or args.repo).resolve()))
    after = covered(json.loads(Path(args.after).read_text()), str(Path(args.after_root or args.repo).resolve()))
    moved = renames(args.repo, args.old, args.new)
    kept = deleted = moved_out = 0
    # every covered line of the new tree, by text: a line split out of its file into another module
    # (a package split: avgk/config.py -> avgk/config/*.py) still counts as kept when covered there
    covered_anywhere: set[str] = set()
    for new_path, numbers in after.items():
        text_of = file_lines(args.repo, args.new, new_path)
        covered_anywhere.update(text_of[i - 1].strip() for i in numbers if i <= len(text_of))
    lost: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for path, lines in sorted(before.items()):
        old_text = file_lines(args.repo, args.old, path)
        new_path = moved.get(path, path)
        new_text = file_lines(args.repo, args.new, new_path)
        new_covered = {new_text[i - 1].strip() for i in after.get(new_path, set()) if i <= len(new_text)}
        new_all = {line.strip() for line in new_text}
        for number in sorted(lines):
            text = old_text[number - 1].strip() if number <= len(old_text) else ""
            if text in new_covered:
                kept += 1
            elif text in covered_anywhere:
                moved_out += 1
            elif text not in new_all:
                deleted += 1
            else:
                lost[new_path].append((number, text))
    total_before = sum(len(v) for v in before.values())
    total_after = sum(len(v) for v in after.values())
    print(f"covered lines: {total_before} at {args.old}, {total_after} at {args.new}")
    print(f"of those covered before: kept {kept} in their file, {moved_out} covered in another file, "
          f"deleted or rewritten {deleted}, lost {sum(map(len, lost.values()))}")
    for path, items in sorted(lost.items()):
        for number, text in items:
            print(f"  lost: {path} (was line {number}): {text}")
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
