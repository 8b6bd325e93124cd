"""The GPU check: what avgk does on a CUDA machine, measured, in one table.

Run: benchmarks/gpu/check.sh            (on a CUDA machine; under 8 minutes on one modern GPU)
     benchmarks/gpu/check.sh --cpu      (the same steps on the CPU at toy sizes: checks the script itself)

Rows:
  amp-<dtype>     images/s of the product training step (avgk.training.engine.train_epoch: uint8 batch
                  normalised on the device, autocast, GradScaler for fp16, AdamW step) of
                  timm:resnet50 at 224 px, two-head loss, fp32 / bf16 / fp16
  uint8 input     the loader path a GPU run takes (workers emit uint8, normalised on the
                  device by avgk.models.inputs.model_input): images/s from shards to a normalised
                  device batch, and its largest difference from the CPU-normalised batch
  ray train       `avgk train` with train.use_gpu=true, 1 Ray worker: wall time, exit status
  scoring job     `avgk evaluate` on GPU (Ray Data actors with a GPU each): wall time, exit status
Each row that fails prints its one-line error and the check goes on; the exit status is the
number of failed rows. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__test__ = False

ROOT = Path(__file__).resolve().parents[2]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(shards: str, overrides: list[str]):
    from avgk.config import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"data.shards={shards}", *overrides])


def prepare_data(*, shards: str, size: int, num_train: int) -> None:
    from avgk.data.prepare import prepare

    config = _config(shards, [f"data.synthetic.image_size={size}", f"data.resize={size}", f"data.crop={size}",
                              f"data.synthetic.num_train={num_train}", "data.synthetic.num_val=256",
                              "data.synthetic.num_test=256", "data.synthetic.num_classes=100",
                              "data.shard_maxcount=256"])
    prepare(config, progress=False)


def amp_rows(*, shards: str, device, backbone: str, size: int, batch: int, steps: int) -> list[tuple[str, str, str]]:
    import torch

    from avgk.training import engine

    rows = []
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 100, (batch,), generator=generator)
    sample = {"image": images, "label": labels, "idx": torch.arange(batch), "key": [str(i) for i in range(batch)]}
    for amp in ("none", "bf16", "fp16"):
        try:
            config = _config(shards, [f"model.backbone={backbone}", f"data.resize={size}", f"data.crop={size}",
                                      f"train.amp={amp}", f"train.batch_size={batch}", "train.log_every=1000000",
                                      "model.channels_last=true"])
            parts = engine.build_parts(config, device=device)
            scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
            engine.train_epoch(parts, epoch=0, batches=[sample] * 3, scaler=scaler, log=lambda _: None)  # warm-up
            _sync(device)
            start = time.perf_counter()
            stats = engine.train_epoch(parts, epoch=0, batches=[sample] * steps, scaler=scaler, log=lambda _: None)
            _sync(device)
            seconds = time.perf_counter() - start
            memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
            rows.append((f"amp {amp}", f"{steps * batch / seconds:,.0f} img/s",
                         f"{backbone} {size} px, batch {batch}, {steps} steps, "
                         f"loss {stats.loss_sum / stats.num_samples:.3f}{memory}"))
            del parts
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        except Exception as err:  # one failed row must not hide the others
            rows.append((f"amp {amp}", "FAILED", f"{type(err).__name__}: {err}".splitlines()[0][:200]))
    return rows


def input_row(*, shards: str, device, size: int, batch: int, workers: int) -> tuple[str, str, str]:
    from avgk.data.loaders import eval_loader, train_loader
    from avgk.data.manifest import read_manifest
    from avgk.models.inputs import image_transform, model_input

    try:
        config = _config(shards, [f"data.resize={size}", f"data.crop={size}", f"train.batch_size={batch}"])
        num_train = read_manifest(shards).splits["train"].num_samples
        loader = train_loader(shards_dir=shards, batch_size=batch, rank=0, world_size=1, num_workers=workers,
                              epoch=0, seed=0, transform=image_transform(config, train=True),
                              num_batches=num_train // batch, pin_memory=device.type == "cuda", normalize=False)
        count = 0
        start = time.perf_counter()
        for b in loader:
            x = model_input(b["image"], device=device, config=config)
            count += x.shape[0]
        _sync(device)
        seconds = time.perf_counter() - start
        # The same val samples normalised on the CPU (loader) and on the device (uint8 path).
        common = dict(shards_dir=shards, split="val", batch_size=64, rank=0, world_size=1, num_workers=0,
                      transform=image_transform(config, train=False))
        on_cpu = next(iter(eval_loader(**common, normalize=True)))["image"]
        on_device = model_input(next(iter(eval_loader(**common, normalize=False)))["image"], device=device, config=config)
        diff = (on_device.float().cpu() - on_cpu.float()).abs().max().item()
        return ("uint8 input", f"{count / seconds:,.0f} img/s",
                f"{count} images {size} px, {workers} loader workers; largest difference from CPU normalisation {diff:.1e}")
    except Exception as err:
        return ("uint8 input", "FAILED", f"{type(err).__name__}: {err}".splitlines()[0][:200])


def cli_row(name: str, argv: list[str], *, expect: Path) -> tuple[str, str, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not expect.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        return (name, "FAILED", f"exit {proc.returncode}: {lines[-1][:200]}")
    accuracy = json.loads(expect.read_text())["test"]["avg_k_accuracy"]
    return (name, f"{seconds:.0f} s", f"exit 0; avgk {argv[0]}; test avg-2 {accuracy['2']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("benchmarks/gpu/check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "--cpu runs the same steps on the CPU at toy sizes", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda", 0) if not args.cpu else torch.device("cpu")
    size, batch, steps, backbone = (32, 8, 2, "timm:resnet18") if args.cpu else (224, 128, 30, "timm:resnet50")
    gpu_flag = [] if args.cpu else ["train.use_gpu=true"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avgk-gpu-check-") as tmp:
        shards, runs = f"{tmp}/shards", f"{tmp}/runs"
        prepare_data(shards=shards, size=size, num_train=512 if args.cpu else 2048)
        rows = amp_rows(shards=shards, device=device, backbone=backbone, size=size, batch=batch, steps=steps)
        rows.append(input_row(shards=shards, device=device, size=size, batch=batch, workers=1 if args.cpu else 8))
        common = ["configs/smoke.yaml", f"run.storage={runs}", "tracking.enabled=false", *gpu_flag]
        smoke_shards = f"{tmp}/smoke"
        rows.append(cli_row("ray train", ["train", *common, f"data.shards={smoke_shards}", "train.epochs=2"],
                            expect=Path(runs) / "smoke" / "metrics.json"))
        (Path(runs) / "smoke" / "metrics.json").unlink(missing_ok=True)
        rows.append(cli_row("scoring job", ["evaluate", *common, f"data.shards={smoke_shards}", "--run", f"{runs}/smoke"],
                            expect=Path(runs) / "smoke" / "metrics.json"))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\navgk GPU check — {datetime.date.today()}, {name}, torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"command: benchmarks/gpu/check.sh{' --cpu' if args.cpu else ''}\n")
    print("| step | result | details |\n|---|---:|---|")
    for step, result, details in rows:
        print(f"| {step} | {result} | {details} |")
    return sum(result == "FAILED" for _, result, _ in rows)


if __name__ == "__main__":
    sys.exit(main())
