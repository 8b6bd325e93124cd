"""Benchmark P2: one training step, two-head loss against cross-entropy only, same backbone, on CPU.

Run: python benchmarks/bench_train_step.py [--backbones small_cnn:32 torchvision:resnet18:112]
         [--rounds 12] [--steps 12 2] [--batch-size 64] [--num-classes 1081] [--threads 1] [--profile]
Each variant is the product's own step: the model, loss, optimizer and scheduler come from
avgk.training.engine.build_parts for a Config that differs only in loss.name (two_head or ce), and the
steps run through avgk.training.engine.train_epoch (forward, loss, backward, optimizer and scheduler
step) on fixed random batches, so data loading is not timed. The variants alternate in
blocks of --steps steps (A B B A ...) for --rounds rounds; the first block of each is a
warm-up and is dropped. A step's time is the gap between two batch requests of the loop, in
wall time and in this process's CPU time. Reported per backbone: median step time of each
variant, their ratio, and the median over rounds of the per-round ratio (robust to load
drifting on a shared machine). One torch thread by default: on a 2-core machine shared with
other work, two intra-op threads wait on each other whenever the other work holds a core, and
step times swing 2-3x. resnet18 at 112 px by default: 224 px takes ~7 s a step on one thread;
at 112 the heads' fixed cost weighs 4x more against the backbone, a stricter test.
Then what the heads add, timed in isolation on fixed features (the heads and the loss forward
and backward, the optimizer step, the pseudo-label selection, the BCE): the floor of the
difference, whatever the backbone. With --profile, also the torch.profiler top operators of a
few steps of each variant.
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from bench_prepare import cpu_model

__test__ = False

VARIANTS = ("two_head", "ce")
CLOCKS = ("wall", "cpu")


def fake_manifest(shards_dir: Path, *, num_classes: int, num_train: int) -> None:
    """A manifest with no shards: build_parts reads L and N from it, and nothing is loaded."""
    from avgk.data.manifest import write_manifest

    shards_dir.mkdir(parents=True, exist_ok=True)
    counts = [num_train // num_classes] * num_classes
    counts[0] += num_train - sum(counts)
    write_manifest(
        shards_dir=shards_dir,
        source="synthetic",
        settings={},
        classes=[f"c{i}" for i in range(num_classes)],
        splits={"train": {"shards": [], "num_samples": num_train, "class_counts": counts}},
    )


def build(backbone: str, loss: str, *, shards: Path, batch_size: int, width: int):
    from avgk.config import load_config
    from avgk.training.engine import build_parts

    config = load_config(
        None,
        [
            f"data.shards={shards}",
            f"model.backbone={backbone}",
            f"model.width={width}",
            f"loss.name={loss}",
            f"train.batch_size={batch_size}",
            "train.log_every=1000000",
            "tracking.enabled=false",
        ],
    )
    return build_parts(config, device=torch.device("cpu"))


def timed_batches(batch: dict, num_steps: int, stamps: list[tuple[float, float]]) -> Iterator[dict]:
    """Yields the same batch num_steps times, stamping (wall, process CPU) at each request; the last stamp ends the last step."""
    for _ in range(num_steps):
        stamps.append((time.perf_counter(), time.process_time()))
        yield batch
    stamps.append((time.perf_counter(), time.process_time()))


def run_block(parts, batch: dict, num_steps: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of each of num_steps engine steps."""
    from avgk.training.engine import train_epoch

    stamps: list[tuple[float, float]] = []
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_epoch(parts, epoch=0, batches=timed_batches(batch, num_steps, stamps), scaler=scaler, log=lambda _: None)
    pairs = list(itertools.pairwise(stamps))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def profile_variant(parts, batch: dict, num_steps: int, row_limit: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    run_block(parts, batch, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_block(parts, batch, num_steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def best_ms(fn: Callable[[], object], repeats: int = 200) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats // 5):
            fn()
        best = min(best, (time.perf_counter() - start) / (repeats // 5))
    return best * 1e3


def head_costs(parts: dict, batch: dict) -> list[tuple[str, float, float]]:
    """(stage, two-head ms, CE ms) of what the heads add to a step, timed in isolation on fixed features:
    the floor of the two-head / CE difference, whatever the backbone."""
    import torch.nn.functional as F

    from avgk.method.pseudo_labels import batch_pseudo_labels

    rows = []
    labels, idx = batch["label"], batch["idx"]
    costs = {}
    for v in VARIANTS:
        model, loss = parts[v].model, parts[v].loss
        features = torch.randn(len(labels), next(iter(model.heads.values())).in_features, requires_grad=True)

        def heads_and_loss(loss=loss, features=features, model=model):
            out = loss(logits={n: h(features) for n, h in model.heads.items()}, labels=labels, idx=idx, epoch=0)
            out.total_sum.backward()

        heads_and_loss()  # every parameter of the heads has a gradient for the optimizer step below
        costs[v] = (best_ms(heads_and_loss), best_ms(parts[v].optimizer.step, repeats=50))
    logits = torch.randn(len(labels), parts["two_head"].num_classes)
    probs = torch.softmax(logits, dim=1)
    z_m = logits.clone().requires_grad_()
    targets = batch_pseudo_labels(probs=probs, labels=labels, k=2)
    rows.append(("heads + loss, forward + backward (features fixed)", costs["two_head"][0], costs["ce"][0]))
    rows.append(("  of the heads + loss: pseudo-label selection (batch_pseudo_labels)",
                 best_ms(lambda: batch_pseudo_labels(probs=probs, labels=labels, k=2)), 0.0))
    rows.append(("  of the heads + loss: BCE over B x L, forward + backward",
                 best_ms(lambda: F.binary_cross_entropy_with_logits(z_m, targets, reduction="sum").backward()), 0.0))
    rows.append(("optimizer step, every parameter (SGD, momentum, weight decay)", costs["two_head"][1], costs["ce"][1]))
    return rows


def parse_backbone(spec: str) -> tuple[str, int]:
    """'small_cnn:32' or 'torchvision:resnet18:112' -> (backbone name, input side)."""
    name, _, side = spec.rpartition(":")
    if not name or not side.isdigit():
        raise SystemExit(f"--backbones entries are NAME:SIDE (e.g. small_cnn:32), got {spec!r}")
    return name, int(side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn:32", "torchvision:resnet18:112"],
                        help="NAME:SIDE, NAME as model.backbone, SIDE the square input size")
    parser.add_argument("--steps", nargs="+", type=int, default=[12, 2],
                        help="steps per block, one value per backbone (or one for all)")
    parser.add_argument("--rounds", type=int, default=12, help="A/B rounds per backbone (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1081)
    parser.add_argument("--width", type=int, default=16, help="model.width of small_cnn (the demo's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default, 2 here); 1 keeps a shared machine's noise out")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top operators per variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_backbone(s) for s in args.backbones]
    steps = args.steps if len(args.steps) == len(specs) else [args.steps[0]] * len(specs)

    rows, profiles, heads = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_step-") as tmp:
        shards = Path(tmp) / "shards"
        fake_manifest(shards, num_classes=args.num_classes, num_train=args.batch_size * 1000)
        for (backbone, side), num_steps in zip(specs, steps, strict=True):
            generator = torch.Generator().manual_seed(0)
            batch = {
                "image": torch.randn(args.batch_size, 3, side, side, generator=generator),
                "label": torch.randint(0, args.num_classes, (args.batch_size,), generator=generator),
                "idx": torch.arange(args.batch_size),
                "key": [f"k{i}" for i in range(args.batch_size)],
            }
            parts = {v: build(backbone, v, shards=shards, batch_size=args.batch_size, width=args.width) for v in VARIANTS}
            # clock -> variant -> step times; clock -> per-round ratios two_head / ce of block medians
            times = {c: {v: [] for v in VARIANTS} for c in CLOCKS}
            ratios: dict[str, list[float]] = {c: [] for c in CLOCKS}
            start = time.perf_counter()
            for r in range(args.rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                medians: dict[str, dict[str, float]] = {c: {} for c in CLOCKS}
                for v in order:
                    for c, block in zip(CLOCKS, run_block(parts[v], batch, num_steps), strict=True):
                        medians[c][v] = statistics.median(block)
                        if r > 0:
                            times[c][v].extend(block)
                if r > 0:
                    for c in CLOCKS:
                        ratios[c].append(medians[c]["two_head"] / medians[c]["ce"])
            elapsed = time.perf_counter() - start
            for c in CLOCKS:
                med = {v: statistics.median(times[c][v]) for v in VARIANTS}
                q = statistics.quantiles(ratios[c], n=4) if len(ratios[c]) > 1 else [ratios[c][0]] * 3
                rows.append((backbone, side, c, num_steps, len(times[c]["ce"]), med["two_head"], med["ce"],
                             med["two_head"] / med["ce"], statistics.median(ratios[c]), q[0], q[2], elapsed))
            print(f"{backbone} @ {side}px: {elapsed:.0f} s", file=sys.stderr)
            if not heads:  # the heads see only B x D features: one backbone is enough
                heads = head_costs(parts, batch)
            if args.profile:
                for v in VARIANTS:
                    profiles.append((f"{backbone} @ {side}px, {v}", profile_variant(parts[v], batch, num_steps)))

    command = "python benchmarks/bench_train_step.py " + shlex.join(sys.argv[1:])
    print(f"`{command.strip()}` — {date.today().isoformat()}, nproc {os.cpu_count()}, {cpu_model()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
          f"load average at the end {os.getloadavg()[0]:.1f}.")
    print(f"batch {args.batch_size}, {args.num_classes:,} classes, SGD (the engine's optimizer and scheduler), "
          f"fixed random batches; {args.rounds} interleaved rounds of one block per variant, first round dropped.")
    print("wall = perf_counter per step; cpu = this process's CPU time per step (all its threads), which a "
          "competing job on a shared machine disturbs far less than the wall clock.")
    print()
    print("| backbone | input | clock | steps/block | steps timed per variant | two-head step (ms) | CE step (ms) "
          "| ratio of medians | median per-round ratio (IQR) | wall (s) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for backbone, side, c, num_steps, n, t2, t1, ratio, rr, q1, q3, elapsed in rows:
        print(f"| {backbone} | {side} x {side} | {c} | {num_steps} | {n} | {t2 * 1e3:.1f} | {t1 * 1e3:.1f} | {ratio:.3f} "
              f"| {rr:.3f} ({q1:.3f}-{q3:.3f}) | {elapsed:.0f} |")
    print()
    print("What the heads add, timed in isolation (best of 5), the floor of the difference above:")
    print()
    print("| stage | two-head (ms) | CE (ms) | difference (ms) |")
    print("|---|---:|---:|---:|")
    for stage, t2, t1 in heads:
        print(f"| {stage} | {t2:.3f} | {t1:.3f} | {t2 - t1:.3f} |" if t1 else f"| {stage} | {t2:.3f} | - | - |")
    for title, table in profiles:
        print(f"\ntorch.profiler, {title}:\n{table}")


if __name__ == "__main__":
    main()
