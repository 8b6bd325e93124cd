"""Benchmark: one training step of a backbone in channels_last (NHWC) against the default NCHW layout, on CPU.

Run: python benchmarks/bench_channels_last.py [--rounds 3] [--threads 1]
The measurement behind `model.channels_last: true` as the default (avgk/config/model.py): the
demo's small CNN (width 16, batch 128 at 32 x 32) and resnet18 (batch 32 at 112 x 112), each
step a forward, a mean-square loss, a backward and an SGD step, the two layouts alternating
for --rounds rounds; median step time of each, and their ratio.
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import cpu_model

__test__ = False


def step_times(make_model, images: torch.Tensor, *, channels_last: bool, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = make_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = model(images).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision

    from avgk.models.small_cnn import SmallCNN

    cases = [
        ("small_cnn width 16", lambda: SmallCNN(width=16), torch.randn(128, 3, 32, 32), 10),
        ("torchvision resnet18", lambda: torchvision.models.resnet18(), torch.randn(32, 3, 112, 112), 3),
    ]
    rows = []
    for name, make_model, images, steps in cases:
        times = {False: [], True: []}
        for r in range(args.rounds):
            for layout in ((False, True) if r % 2 == 0 else (True, False)):
                times[layout].extend(step_times(make_model, images, channels_last=layout, steps=steps))
        nchw, nhwc = statistics.median(times[False]), statistics.median(times[True])
        rows.append((name, tuple(images.shape), len(times[False]), nchw, nhwc))
    command = "python benchmarks/bench_channels_last.py " + shlex.join(sys.argv[1:])
    print(f"`{command.strip()}` — {date.today().isoformat()}, nproc {os.cpu_count()}, {cpu_model()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch thread(s).")
    print()
    print("| backbone | batch | steps per layout | NCHW step (ms) | channels_last step (ms) | NCHW / channels_last |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape, n, nchw, nhwc in rows:
        print(f"| {name} | {' x '.join(map(str, shape))} | {n} | {nchw * 1e3:.1f} | {nhwc * 1e3:.1f} | {nchw / nhwc:.2f}x |")


if __name__ == "__main__":
    main()
