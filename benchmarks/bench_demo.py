"""Benchmark P5: `make demo` wall time and peak memory of its whole process tree.

Run: python benchmarks/bench_demo.py [--interval 0.5] [--keep DIR] [-- extra demo overrides]
Runs what `make demo` runs once .venv exists, `.venv/bin/avgk demo`, in a subprocess started
in a fresh folder, with run.storage and data.shards pointed into it (so the repository's
runs/ and data/synthetic are left alone, and the synthetic data is generated from scratch,
as on a first `make demo`); RAY_ADDRESS and MLFLOW_TRACKING_URI are removed from its
environment (a local Ray on 127.0.0.1, the default sqlite MLflow store beside the runs; the
MLflow artifacts land in the fresh folder's mlruns/).
Every --interval seconds it walks /proc for the demo's process and all its descendants (the
local Ray cluster: GCS, raylet, dashboard, Train controller and workers, loader workers) and
records the sum of their RSS, the sum of their PSS (shared pages split between the processes
mapping them: the tree's real footprint) and the largest single RSS. Also reported: the CPU
time of the tree (each process's user + system time as last sampled) and how much CPU other
work on the machine took meanwhile (/proc/stat busy time minus the tree's), since the wall
time depends on it; the CPU time by process title (which Ray service, the Train worker and its
loader workers, the driver); the time of one fixed training step measured just before the
demo (the machine's speed at that moment); and a timeline: the second each phase line of the demo's output
appeared (the full output, each line stamped, is in DIR/demo.log with --keep).
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import cpu_model
from proc_stats import command_name, descendants, machine_busy_seconds, process_table, steal_seconds

__test__ = False

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
# Lines of the demo's output that start a phase (the training runs' first step and epoch ends
# included), each printed in the timeline with the second it appeared.
PHASE_MARKS = ("=== ", "step 20/", "train_loss", "pyfunc model logged", "Wrote ", "synthetic")


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; (0, 0) for a process that has gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


def reference_step_ms(steps: int = 15) -> float:
    """Median ms of one fixed training step (the demo's small CNN, batch 128 at 32 px, one thread) in
    this process, before the demo starts: how fast the machine runs right now. This machine's speed
    drifts by tens of percent over an evening with nothing else running (P5 in BENCHMARKS.md), so a
    wall time is only comparable with another taken at a similar reference."""
    import statistics

    import torch

    from avgk.models.small_cnn import SmallCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = SmallCNN(width=16).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        times = []
        for step in range(steps + 3):
            start = time.perf_counter()
            loss = model(images).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= 3:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(threads)


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak_rss_sum = self.peak_pss_sum = self.peak_single_rss = 0
        self.peak_single_name = ""
        self.max_processes = 0
        self.samples = 0
        self.loads: list[float] = []
        self.cpu_of: dict[tuple[int, int], float] = {}  # (pid, start time) -> last CPU seconds seen
        self.name_of: dict[tuple[int, int], str] = {}  # (pid, start time) -> process title, as last seen

    @property
    def tree_cpu(self) -> float:
        """CPU seconds of every process seen in the tree, as last sampled (a process living less than
        one interval is missed)."""
        return sum(self.cpu_of.values())

    def run(self) -> None:
        while not self.stop.is_set():
            table = process_table()
            tree = descendants(self.pid, table)
            for pid in tree:
                _, started, cpu, argv = table[pid]
                self.cpu_of[(pid, started)] = cpu
                self.name_of[(pid, started)] = command_name(argv)
            rss_sum = pss_sum = 0
            for pid in tree:
                rss, pss = memory_of(pid)
                rss_sum += rss
                pss_sum += pss
                if rss > self.peak_single_rss:
                    self.peak_single_rss, self.peak_single_name = rss, command_name(table[pid][3])
            self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
            self.peak_pss_sum = max(self.peak_pss_sum, pss_sum)
            self.max_processes = max(self.max_processes, len(tree))
            self.loads.append(os.getloadavg()[0])
            self.samples += 1
            self.stop.wait(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling period, seconds")
    parser.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra `avgk demo` overrides (none: exactly make demo)")
    args = parser.parse_args()

    avgk = ROOT / ".venv" / "bin" / "avgk"
    if not avgk.exists():
        raise SystemExit(f"{avgk} is missing: run `make demo` (or make test) once to create .venv")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_demo-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
    command = [str(avgk), "demo", f"run.storage={work / 'runs'}", f"data.shards={work / 'synthetic'}", *args.overrides]
    log_path = work / "demo.log"
    reference_ms = reference_step_ms()
    try:
        busy_before, steal_before = machine_busy_seconds(), steal_seconds()
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, bufsize=1)
            sampler = Sampler(process.pid, args.interval)
            sampler.start()
            marks = []  # (seconds since start, line) of the demo's phase lines, for the timeline
            lines = []
            for line in process.stdout:
                elapsed = time.perf_counter() - start
                lines.append(line)
                log.write(f"[{elapsed:7.1f}] {line}")
                if any(mark in line for mark in PHASE_MARKS):
                    marks.append((elapsed, line.strip()))
            code = process.wait()
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        tree_cpu = sampler.tree_cpu
        busy = machine_busy_seconds() - busy_before
        steal = steal_seconds() - steal_before
        output = "".join(lines)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        print(output[-4000:], file=sys.stderr)
        raise SystemExit(f"avgk demo failed with exit code {code}")

    summary = output[output.find("=== test set"):].strip() if "=== test set" in output else "(no summary found)"
    gib = 2**30
    cpus = os.cpu_count() or 1
    shown = "python benchmarks/bench_demo.py " + shlex.join(sys.argv[1:])
    print(f"`{shown.strip()}` — {date.today().isoformat()}, nproc {cpus}, {cpu_model()}, "
          f"Python {platform.python_version()}.")
    shown_command = ['.venv/bin/avgk', 'demo', 'run.storage=<tmp>/runs', 'data.shards=<tmp>/synthetic', *args.overrides]
    print(f"ran: {shlex.join(shown_command)}"
          f" (fresh data and runs), memory sampled every {args.interval} s ({sampler.samples} samples)")
    print()
    print("| measure | value |")
    print("|---|---:|")
    print(f"| wall time | {wall:.1f} s ({int(wall // 60)} min {wall % 60:.0f} s) |")
    print(f"| peak memory of the process tree, sum of PSS | {sampler.peak_pss_sum / gib:.2f} GiB |")
    print(f"| peak memory of the process tree, sum of RSS (shared pages counted per process) "
          f"| {sampler.peak_rss_sum / gib:.2f} GiB |")
    print(f"| largest single process RSS | {sampler.peak_single_rss / gib:.2f} GiB ({sampler.peak_single_name}) |")
    print(f"| processes in the tree, at most | {sampler.max_processes} |")
    print(f"| CPU time of the tree (user + sys, each process as last sampled) | {tree_cpu:.0f} s |")
    print(f"| CPU time the machine spent on other work meanwhile | {max(0.0, busy - tree_cpu):.0f} s "
          f"of {cpus * wall:.0f} s available, of which {steal:.0f} s stolen by the hypervisor |")
    print(f"| machine speed right before: one fixed small-CNN training step (see reference_step_ms) | "
          f"{reference_ms:.1f} ms |")
    print(f"| load average (1 min) during the run, mean / max | {sum(sampler.loads) / max(1, len(sampler.loads)):.1f} "
          f"/ {max(sampler.loads, default=0):.1f} |")
    print()
    print("timeline (seconds since the demo started: the line that appeared):")
    print()
    for elapsed, line in marks:
        print(f"    {elapsed:6.1f}  {line[-110:]}")
    print()
    print("CPU time by process (summed over processes with the same title):")
    print()
    print("| process | processes | CPU (s) |")
    print("|---|---:|---:|")
    groups: dict[str, list[float]] = {}
    for key, cpu in sampler.cpu_of.items():
        groups.setdefault(sampler.name_of.get(key, "?"), []).append(cpu)
    for name, cpus_of in sorted(groups.items(), key=lambda item: -sum(item[1])):
        print(f"| {name} | {len(cpus_of)} | {sum(cpus_of):.1f} |")
    print()
    print("demo summary:")
    print(summary)


if __name__ == "__main__":
    main()
