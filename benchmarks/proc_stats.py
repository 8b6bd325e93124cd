"""What the benchmarks read from /proc: the process table, a process tree, readable process names,
and the machine's busy and stolen CPU time. Shared by bench_demo.py and bench_ray_overhead.py.
Not a benchmark itself (`make bench` runs bench_*.py only) and not collected by pytest.
"""

from __future__ import annotations

import os
from pathlib import Path

__test__ = False

TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, int, float, list[bytes]]]:
    """pid -> (parent pid, start time in ticks, CPU seconds so far: user + system, argv) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # the process has gone
        table[int(entry)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICKS, argv)
    return table


def children_of(table: dict[int, tuple]) -> dict[int, list[int]]:
    """parent pid -> its child pids, from a process_table()."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    return children


def descendants(root: int, table: dict[int, tuple]) -> list[int]:
    """`root` and every process below it that is in `table`."""
    children = children_of(table)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            tree.append(pid)
            stack.extend(children.get(pid, []))
    return tree


def command_name(argv: list[bytes]) -> str:
    """A short, readable name for a process: the title a Ray process gives itself (ray::RayTrainWorker,
    ray-dashboard-...), else the program or script it runs (raylet, gcs_server, dashboard.py, avgk),
    skipping the Python interpreter, options and inline code (python -c ...)."""
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("ray::") or (" " in words[0] and not words[0].startswith("/")):
        return words[0].split()[0]  # a process that renamed itself
    for word in words:
        base = Path(word).name
        if any(c in word for c in " '\"{}()") or word.startswith("-"):
            continue  # an option, or inline code
        if base not in {"python", "python3"} and not base.startswith("python3."):
            return base
    return Path(words[0]).name + (" -c" if "-c" in words else "")


def _cpu_line() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot: every state but idle and iowait,
    guest time excluded (already counted in user and nice)."""
    fields = _cpu_line()
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this machine wanted them ('steal')."""
    fields = _cpu_line()
    return (fields[7] if len(fields) > 7 else 0) / TICKS
