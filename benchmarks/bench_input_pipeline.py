"""Benchmark P3: avgk's training input pipeline (WebDataset shards) against torchvision ImageFolder and decode-only.

Run: python benchmarks/bench_input_pipeline.py [--num-images 5000] [--workers 2] [--batch-size 64]
         [--rounds 2] [--transforms product resize-crop] [--keep DIR]
Generates --num-images random-texture 500 x 375 JPEGs (quality 90, 10 classes) as
DIR/images/train/<class>/ (plus one val image per class, which `avgk prepare` needs), then
converts them with `avgk prepare` (imagefolder source, through the CLI entry point, in
process) twice: data.resize_shorter=256 (shrunk to 341 x 256 and re-encoded at prepare time)
and data.resize_shorter=0 (the original bytes). Then, in --rounds interleaved rounds (the
order rotates each round), one pass over the training images of:

  avgk shards        avgk.data.loaders.train_loader (the loader `avgk train` uses), on both
                     shard sets, product defaults (shuffle buffer 1,000);
  ImageFolder        torchvision.datasets.ImageFolder(DIR/images/train) + DataLoader(shuffle,
                     drop_last), the plain-torchvision script;
  decode-only        a DataLoader over the same JPEG files whose dataset only opens and
                     decodes each file to RGB and returns its size: no transform, no image
                     tensor kept; with PIL (ImageFolder's decoder) and with torchvision.io
                     (avgk's loader decodes with it); and PIL over the shard bytes of the
                     resize_shorter=256 set (tar read + decode).

avgk and ImageFolder apply the very same transform object, each of:
  product       avgk.data.transforms.build_transform(train=True, resize=256, crop=224), what
                `avgk train` runs: RandomResizedCrop 224 (scale 0.35-1) + flip + normalise;
  resize-crop   Resize 256 + RandomCrop 224 + flip + normalise (the issue's wording).

avgk's loader normalises in its workers, as `avgk train` does on a CPU; one more row times
the GPU path (uint8 batches, normalize=False, normalised by the consumer: here in the main
process on the CPU, so its cost is counted).
Every pipeline uses --workers loader processes and --batch-size; a pass is timed from the
loader's creation (worker start-up included) to its last batch, in wall time and in CPU time
of this process plus its loader workers. Reported: images/s and images per CPU-second, best
of the rounds, and the ratios of those; then a one-process breakdown of the per-image costs
(decode, transforms, collation) that explains the ratios. (avgk on the original bytes runs
with the product transform only: it decodes what ImageFolder decodes.)
Not collected by pytest (a script, and __test__ = False).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import HEIGHT, NUM_CLASSES, WIDTH, cpu_model, texture

__test__ = False

RESIZE, CROP = 256, 224


# ---------------------------------------------------------------- data


def _write_image(task: tuple[str, int]) -> int:
    path, seed = task
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    texture(np.random.default_rng(seed)).save(path, format="JPEG", quality=90)
    return Path(path).stat().st_size


def make_images(root: Path, num_images: int, processes: int) -> int:
    """root/train/class_<c>/<i>.jpg for i < num_images, and root/val/class_<c>/ with one image each."""
    tasks = [(str(root / "train" / f"class_{i % NUM_CLASSES}" / f"{i:06d}.jpg"), i) for i in range(num_images)]
    tasks += [(str(root / "val" / f"class_{c}" / f"v{c:06d}.jpg"), 10**7 + c) for c in range(NUM_CLASSES)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_write_image, tasks, chunksize=64))


def run_prepare(config: Path, shards: Path, overrides: list[str]) -> float:
    from pipelines.cli import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # line, bars
        code = main(["prepare", str(config), f"data.shards={shards}", *overrides])
    if code != 0:
        raise SystemExit(f"avgk prepare failed with exit code {code}")
    return time.perf_counter() - start


# ---------------------------------------------------------------- the pipelines


def decode_rgb(data_or_path, decoder: str) -> torch.Tensor:
    """Decode to 8-bit RGB with PIL (what ImageFolder and torchvision's default loader use) or with
    torchvision.io (what avgk's loader uses); returns only the size, nothing else is built."""
    if decoder == "pil":
        source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
        with Image.open(source) as image:
            return torch.tensor(image.convert("RGB").size)
    from torchvision.io import ImageReadMode, decode_image, read_file

    raw = torch.frombuffer(bytearray(data_or_path), dtype=torch.uint8) if isinstance(data_or_path, bytes) \
        else read_file(data_or_path)
    return torch.tensor(decode_image(raw, mode=ImageReadMode.RGB).shape[1:])


class DecodeFiles(torch.utils.data.Dataset):
    """Decode-only over files: open + decode to RGB, return the size (nothing else is built)."""

    def __init__(self, paths: list[str], decoder: str = "pil"):
        self.paths, self.decoder = paths, decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_rgb(self.paths[i], self.decoder)


class DecodeShards(torch.utils.data.IterableDataset):
    """Decode-only over shard bytes: tar read + decode to RGB, each worker its own shards."""

    def __init__(self, urls: list[str], decoder: str = "pil"):
        super().__init__()
        self.urls, self.decoder = urls, decoder

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        for sample in wds.tarfile_samples({"url": u} for u in self.urls[worker::num]):
            yield decode_rgb(sample.get("jpg") or sample.get("png"), self.decoder)


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the loader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def count_pass(make_loader: Callable[[], Iterable]) -> tuple[int, float, float]:
    """(images seen, wall seconds, CPU seconds of this process and its loader workers) of one pass.

    Timed from the loader's creation (worker start-up included) to its last batch; the CPU
    time is read once every worker has exited and been reaped.
    """
    cpu_start, start = cpu_seconds(), time.perf_counter()
    seen, batch = 0, None
    loader = make_loader()
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list) else batch
        seen += images.shape[0]
    wall = time.perf_counter() - start
    del loader, batch
    gc.collect()  # an unfinished iterator (train_loader stops after num_batches) shuts its workers down
    deadline = time.monotonic() + 60
    while multiprocessing.active_children() and time.monotonic() < deadline:  # joins the exited ones
        time.sleep(0.01)
    return seen, wall, cpu_seconds() - cpu_start


def transforms() -> dict[str, Callable]:
    """The two train transforms timed, each applied by avgk and by ImageFolder.

    Both are avgk ImageTransforms: ImageFolder calls one per image (geometry, then ToDtype +
    Normalize on that image: the plain torchvision recipe), avgk's loader runs the geometry per
    image and ToDtype + Normalize once per batch (the same values, bit for bit)."""
    from torchvision.transforms import v2

    from avgk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, build_transform

    return {
        # what `avgk train` runs for data.resize=256 data.crop=224
        "product": build_transform(train=True, resize=RESIZE, crop=CROP),
        # the wording, the classic torchvision recipe; train_loader takes any transform
        "resize-crop": ImageTransform(
            geometry=v2.Compose([
                v2.ToImage(),
                v2.Resize(RESIZE, antialias=True),
                v2.RandomCrop(CROP),
                v2.RandomHorizontalFlip(),
                v2.ToPureTensor(),
            ]),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    }


TRANSFORM_TEXT = {
    "product": f"product train transform (RandomResizedCrop {CROP}, scale 0.35-1, + flip + normalise)",
    "resize-crop": f"Resize {RESIZE} + RandomCrop {CROP} + flip + normalise",
}


def build_pipelines(
    *, work: Path, shards: dict[str, Path], num_images: int, workers: int, batch_size: int, chosen: list[str]
) -> dict[tuple[str, str], Callable[[], Iterable]]:
    """(transform name or '-', pipeline name) -> a function creating a fresh loader for one pass."""
    import torchvision

    from avgk.data.loaders import train_loader
    from avgk.data.manifest import read_manifest

    num_batches = num_images // batch_size
    epoch_of = {"n": 0}
    pipelines_: dict[tuple[str, str], Callable[[], Iterable]] = {}
    for name, transform in transforms().items():
        if name not in chosen:
            continue

        def avgk_loader(
            shards_dir: Path, transform: Callable = transform, normalize: bool = True
        ) -> Callable[[], Iterable]:
            def make():
                epoch_of["n"] += 1
                loader = train_loader(
                    shards_dir=shards_dir, split="train", batch_size=batch_size, rank=0, world_size=1,
                    num_workers=workers, epoch=epoch_of["n"], seed=0, transform=transform, num_batches=num_batches,
                    normalize=normalize,
                )
                if normalize:
                    return loader
                # the GPU path: uint8 batches, normalised by the consumer (here in this process, on the CPU)
                return ({**batch, "image": transform.finish(batch["image"])} for batch in loader)
            return make

        folder = torchvision.datasets.ImageFolder(str(work / "images" / "train"), transform=transform)

        def imagefolder(folder=folder):
            return torch.utils.data.DataLoader(
                folder, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True
            )

        pipelines_[(name, AVGK_256)] = avgk_loader(shards["256"])
        if name == "product":  # with the original bytes avgk decodes what ImageFolder decodes: once is enough
            pipelines_[(name, AVGK_0)] = avgk_loader(shards["0"])
            pipelines_[(name, AVGK_UINT8)] = avgk_loader(shards["256"], normalize=False)
        pipelines_[(name, FOLDER)] = imagefolder

    files = sorted(str(p) for p in (work / "images" / "train").rglob("*.jpg"))
    urls = read_manifest(shards["256"]).shard_urls("train")

    def decode_only_files(decoder: str):
        return lambda: torch.utils.data.DataLoader(
            DecodeFiles(files, decoder), batch_size=batch_size, shuffle=True, num_workers=workers
        )

    def decode_only_shards():
        return torch.utils.data.DataLoader(DecodeShards(urls), batch_size=batch_size, num_workers=workers)

    pipelines_[("-", DECODE_FILES)] = decode_only_files("pil")
    pipelines_[("-", DECODE_FILES_TV)] = decode_only_files("torchvision")
    pipelines_[("-", DECODE_SHARDS)] = decode_only_shards
    return pipelines_


AVGK_256 = "avgk shards, resize_shorter=256"
AVGK_0 = "avgk shards, resize_shorter=0 (original bytes)"
AVGK_UINT8 = "avgk shards, resize_shorter=256, uint8 batches normalised in the main process (the GPU path)"
FOLDER = "torchvision ImageFolder + DataLoader"
DECODE_FILES = "decode-only, the JPEG files (500 x 375)"
DECODE_FILES_TV = "decode-only, the JPEG files (500 x 375), torchvision.io (avgk's decoder)"
DECODE_SHARDS = "decode-only, shard bytes of resize_shorter=256 (341 x 256)"


# ---------------------------------------------------------------- per-image costs, one process


def per_image_costs(work: Path, shards_256: Path, count: int = 100) -> list[tuple[str, float]]:
    """Milliseconds per image of each stage, in this process (1 torch thread, like a loader worker)."""
    import webdataset as wds

    from avgk.data.decoding import Collate
    from avgk.data.manifest import read_manifest

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = sorted((work / "images" / "train").rglob("*.jpg"))[:count]
        big = [p.read_bytes() for p in files]
        small = []
        for sample in wds.tarfile_samples({"url": u} for u in read_manifest(shards_256).shard_urls("train")):
            small.append(sample["jpg"])
            if len(small) == count:
                break
        chain = transforms()
        transform = chain["product"]

        def decode(data: bytes) -> Image.Image:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")

        def per_item(fn: Callable, items: list) -> float:
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for item in items:
                    fn(item)
                best = min(best, (time.perf_counter() - start) / len(items))
            return best * 1e3

        from avgk.data.decoding import decode_sample_image_uint8

        rows = [
            ("decode a 500 x 375 JPEG (the files), PIL", per_item(decode, big)),
            ("decode a 341 x 256 JPEG (resize_shorter=256 shards), PIL", per_item(decode, small)),
            ("decode a 500 x 375 JPEG to a uint8 tensor, avgk's decoder (torchvision.io)",
             per_item(lambda b: decode_sample_image_uint8({"jpg": b}), big)),
            ("decode a 341 x 256 JPEG to a uint8 tensor, avgk's decoder (torchvision.io)",
             per_item(lambda b: decode_sample_image_uint8({"jpg": b}), small)),
        ]
        decoded_big, decoded_small = [decode(b) for b in big], [decode(b) for b in small]
        rows.append(("product train transform of a 500 x 375 image", per_item(transform, decoded_big)))
        rows.append(("product train transform of a 341 x 256 image", per_item(transform, decoded_small)))
        rows.append(("resize-crop transform of a 500 x 375 image", per_item(chain["resize-crop"], decoded_big)))
        rows.append(("resize-crop transform of a 341 x 256 image (its resize is a no-op)",
                     per_item(chain["resize-crop"], decoded_small)))
        tensors_small = [decode_sample_image_uint8({"jpg": b}) for b in small]
        rows.append(("  its geometry alone on the decoded uint8 tensor (what avgk's loader runs per 341 x 256 image)",
                     per_item(transform.geometry, tensors_small)))
        samples = [{"image": transform.geometry(t), "label": 0, "idx": i, "key": "k"}
                   for i, t in enumerate(tensors_small[:64])]
        collate = Collate(transform)
        stack = per_item(lambda _: collate(samples), range(5)) / len(samples)
        rows.append(("stack 64 uint8 images and finish the batch (ToDtype + Normalize once), per image", stack))
        batch = collate(samples)["image"]

        def to_shared(_):
            batch.clone().share_memory_()

        clone = per_item(lambda _: batch.clone(), range(5))
        rows.append(("copy a batch into shared memory (per image; what a worker paid before collating there)",
                     max(0.0, per_item(to_shared, range(5)) - clone) / len(samples)))
        return rows
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes, every pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--transforms", nargs="+", choices=["product", "resize-crop"], default=["product", "resize-crop"])
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    import avgk.data.prepare  # noqa: F401 - import time stays out of the timings

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_input_pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = work / "images"
        if not (images / "train").is_dir():
            start = time.perf_counter()
            total = make_images(images, args.num_images, processes=os.cpu_count() or 1)
            print(f"generated {args.num_images} JPEGs ({total / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
        input_mb = sum(p.stat().st_size for p in (images / "train").rglob("*.jpg")) / 1e6
        config = work / "bench.yaml"
        config.write_text(
            f"data:\n  source: imagefolder\n  root: {images}\n  resize: {RESIZE}\n  crop: {CROP}\n"
            f"  shard_maxcount: 250\n  loader_workers: {args.workers}\n"
        )
        shards, prepare_s = {}, {}
        for resize in ("256", "0"):
            shards[resize] = work / f"shards-{resize}"
            prepare_s[resize] = run_prepare(
                config, shards[resize], [f"data.resize_shorter={resize}", f"data.prepare_workers={os.cpu_count() or 1}"]
            )
            print(f"prepare resize_shorter={resize}: {prepare_s[resize]:.1f} s", file=sys.stderr)
        shards_mb = {r: sum(p.stat().st_size for p in (s / "train").glob("*.tar")) / 1e6 for r, s in shards.items()}

        pipelines_ = build_pipelines(
            work=work, shards=shards, num_images=args.num_images, workers=args.workers, batch_size=args.batch_size,
            chosen=args.transforms,
        )
        keys = list(pipelines_)
        rates: dict[tuple[str, str], list[float]] = {k: [] for k in keys}  # images per wall second
        cpu_rates: dict[tuple[str, str], list[float]] = {k: [] for k in keys}  # images per CPU second
        seen_of: dict[tuple[str, str], int] = {}
        start_all = time.perf_counter()
        count_pass(pipelines_[("-", DECODE_SHARDS)])  # warm-up: imports, page cache
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # the order rotates every round
                seen, wall, cpu = count_pass(pipelines_[key])
                seen_of[key] = seen
                rates[key].append(seen / wall)
                cpu_rates[key].append(seen / cpu)
                print(f"round {r + 1} {key[0]} {key[1]}: {seen / wall:.0f} images/s, {seen / cpu:.0f} images per CPU-s",
                      file=sys.stderr)
        elapsed = time.perf_counter() - start_all
        costs = per_image_costs(work, shards["256"])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    def ratio(table: dict[tuple[str, str], list[float]], a: tuple[str, str], b: tuple[str, str]) -> float:
        return max(table[a]) / max(table[b])

    command = "python benchmarks/bench_input_pipeline.py " + shlex.join(sys.argv[1:])
    print(f"`{command.strip()}` — {date.today().isoformat()}, nproc {os.cpu_count()}, {cpu_model()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, Pillow {Image.__version__}, "
          f"load average at the end {os.getloadavg()[0]:.1f}.")
    print(f"{args.num_images} random-texture {WIDTH} x {HEIGHT} JPEGs (q90, {input_mb:.0f} MB); shards: "
          f"resize_shorter=256 {shards_mb['256']:.0f} MB (prepare {prepare_s['256']:.1f} s), "
          f"resize_shorter=0 {shards_mb['0']:.0f} MB (prepare {prepare_s['0']:.1f} s); "
          f"{args.workers} loader workers, batch {args.batch_size}; {args.rounds} interleaved rounds after one "
          f"warm-up pass ({elapsed:.0f} s).")
    print("Rates are the best of the rounds and ratios divide best rates (other work on the machine only ever "
          "slows a pass down). 'CPU' divides by the CPU time of the main process and its loader workers, which "
          "a competing job disturbs less than the wall clock.")
    print()
    print("| transform | pipeline | images per pass | images/s (wall) | images per CPU-s "
          "| vs ImageFolder (wall / CPU) | vs decode-only files (wall / CPU) "
          "| vs decode-only files, torchvision.io (wall / CPU) | vs decode-only shard bytes (wall / CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        transform, name = key
        folder = (transform, FOLDER) if transform != "-" else None
        versus_folder = (f"{ratio(rates, key, folder):.2f}x / {ratio(cpu_rates, key, folder):.2f}x"
                         if folder else "-")
        print(f"| {TRANSFORM_TEXT.get(transform, 'none')} | {name} | {seen_of[key]} "
              f"| {max(rates[key]):.0f} | {max(cpu_rates[key]):.0f} | {versus_folder} "
              f"| {ratio(rates, key, ('-', DECODE_FILES)):.0%} / {ratio(cpu_rates, key, ('-', DECODE_FILES)):.0%} "
              f"| {ratio(rates, key, ('-', DECODE_FILES_TV)):.0%} / {ratio(cpu_rates, key, ('-', DECODE_FILES_TV)):.0%} "
              f"| {ratio(rates, key, ('-', DECODE_SHARDS)):.0%} / {ratio(cpu_rates, key, ('-', DECODE_SHARDS)):.0%} |")
    print()
    print("Per-image cost of each stage in one process (1 torch thread, as in a loader worker), best of 3:")
    print()
    print("| stage | ms per image |")
    print("|---|---:|")
    for stage, ms in costs:
        print(f"| {stage} | {ms:.3f} |")


if __name__ == "__main__":
    main()
