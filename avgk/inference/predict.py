"""Set-valued prediction for new images: the average-K label set of a trained run (or its top-K set),
for images in memory (`SetPredictor`) or image files as JSON lines (`run_predict`, `avgk predict`).

Legend: N images, L classes. Images are preprocessed by the checkpoint config's eval transform
and scored by the head its thresholds were calibrated on, exactly as the final evaluation does;
a label is in the average-K set when its float32 score is >= the float32 lambda_K (avgk.evaluation.metrics).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from avgk.config import Config
from avgk.config.model import scoreable_heads
from avgk.data.manifest import read_manifest
from avgk.evaluation import set_rules
from avgk.evaluation.metrics import format_k
from avgk.evaluation.set_rules import CalibratedRule
from avgk.method.losses import head_scores, loss_class
from avgk.models import networks as models
from avgk.models.inputs import image_transform
from avgk.records.runs import resolve_checkpoint, saved_run_config
from avgk.runtime import storage
from avgk.training import checkpoints

__all__ = [
    "ImageInput", "LabelSet", "SetPredictor", "decode_image", "iter_image_files", "model_only_checkpoint", "run_predict",
]

ImageInput = Image.Image | str | os.PathLike[str] | bytes | bytearray
THRESHOLDS_FILE = "thresholds.json"


@dataclass(frozen=True)
class LabelSet:
    """One image's predicted set: class ids, names and scores, highest score first."""

    ids: list[int]
    names: list[str]
    scores: list[float]

    @property
    def size(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.ids, "names": self.names, "scores": self.scores, "set_size": self.size}


def decode_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path or encoded bytes (as the shard reader decodes)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        source: Any = io.BytesIO(bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        source = Path(image)
    else:
        raise TypeError(f"an image must be a PIL image, a file path or encoded bytes, got {type(image).__name__}")
    with Image.open(source) as opened:
        rgb: Image.Image = opened.convert("RGB")
        return rgb


def model_only_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint that inference needs (no optimizer, RNG or loss tables)."""
    if not isinstance(state, dict) or not {"model", "config", "num_classes"} <= set(state):
        raise ValueError("not an avgk training checkpoint (a dict with 'model', 'config' and 'num_classes')")
    return {"model": state["model"], "config": state["config"], "num_classes": int(state["num_classes"])}


class SetPredictor:
    """Average-K (or top-K) label sets from a checkpoint and the thresholds calibrated with it."""

    def __init__(
        self,
        *,
        checkpoint: dict[str, Any],
        thresholds: dict[str, Any],
        class_names: Sequence[str] | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ):
        """checkpoint: a loaded checkpoint.pt; thresholds: the thresholds.json document."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        state = model_only_checkpoint(checkpoint)
        # The weights come from the checkpoint: never look for the backbone's local pretrained file.
        config = Config.model_validate(state["config"])
        config.model.pretrained = None
        self.config = config
        self.num_classes = state["num_classes"]
        self.score_head = str(thresholds["score_head"])
        heads = loss_class(config.loss.name).heads
        available = scoreable_heads(heads)  # loss.score_head=fused: the two heads' geometric mean
        if self.score_head not in available:
            raise ValueError(f"thresholds were calibrated on head {self.score_head!r}, the model has {list(heads)}")
        self.thresholds = {str(k): float(v) for k, v in thresholds["thresholds"].items()}
        if not self.thresholds:
            raise ValueError("thresholds.json holds no calibrated K")
        self.set_rules = set_rules.rules_from_json(thresholds.get("set_rules") or {})
        for rule in self.set_rules:
            if rule.head is not None and rule.head not in available:
                raise ValueError(f"set rule {rule.key} was calibrated on head {rule.head!r}, the model has {list(heads)}")
        self.heads = tuple(dict.fromkeys([self.score_head, *(r.head for r in self.set_rules if r.head is not None)]))
        """The heads this predictor's choices score: the score head (K) and the set rules' heads."""
        names = [str(c) for c in range(self.num_classes)] if class_names is None else [str(n) for n in class_names]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names must name the model's {self.num_classes} classes, got {len(names)} names")
        self.class_names = names
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        model = checkpoints.build_trained_model(config, num_classes=self.num_classes, model_state=state["model"])
        self.model = model.to(self.device).eval()
        self.transform = image_transform(config, train=False)

    # ------------------------------------------------------------ loading

    @classmethod
    def from_files(
        cls,
        *,
        checkpoint: str,
        thresholds: str,
        class_names: str | Sequence[str] | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> SetPredictor:
        """From a checkpoint.pt, a thresholds.json and class names (a JSON list file, a list, or None: ids)."""
        if isinstance(class_names, (str, os.PathLike)):
            class_names = json.loads(storage.read_bytes(str(class_names)))
        return cls(
            checkpoint=checkpoints.load_checkpoint_file_uri(storage.absolute(str(checkpoint))),
            thresholds=storage.read_json(storage.absolute(str(thresholds))),
            class_names=class_names,
            batch_size=batch_size,
            device=device,
        )

    @classmethod
    def from_run(
        cls,
        run_dir: str,
        checkpoint: str | None = None,
        *,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> SetPredictor:
        """A run directory's checkpoint ("best" | "last" | PATH) with its thresholds.json and class names.

        checkpoint=None takes the one the run's evaluation used (its eval.checkpoint), the one
        thresholds.json was calibrated with; another checkpoint reuses those thresholds as they are.
        """
        run_dir = storage.absolute(run_dir)
        saved = saved_run_config(run_dir) if storage.exists(run_dir) else None
        default = saved.eval.checkpoint if saved is not None else "best"
        checkpoint_file = resolve_checkpoint(run_dir, checkpoint, default=default)
        thresholds_file = storage.join(run_dir, THRESHOLDS_FILE)
        if not storage.exists(thresholds_file):
            raise FileNotFoundError(
                f"no {THRESHOLDS_FILE} in run directory {run_dir}: evaluate it first (`avgk evaluate CONFIG --run DIR`)"
            )
        state = checkpoints.load_checkpoint_file_uri(checkpoint_file)
        return cls(
            checkpoint=state,
            thresholds=storage.read_json(thresholds_file),
            class_names=class_names_of(state),
            batch_size=batch_size,
            device=device,
        )

    # ------------------------------------------------------------ prediction

    @property
    def ks(self) -> list[str]:
        """The calibrated K (metrics.json keys: "1", "1.5", ...)."""
        return sorted(self.thresholds, key=float)

    def threshold(self, k: float) -> float:
        key = format_k(k)
        if key not in self.thresholds:
            raise ValueError(f"k={key} was not calibrated for this run; calibrated K: {', '.join(self.ks)}")
        return self.thresholds[key]

    def score(self, images: Sequence[ImageInput], *, head: str | None = None) -> np.ndarray:
        """float32 N x L scores of `head` (default: the head average-K was calibrated on), in batches of batch_size."""
        head = head or self.score_head
        return self.score_heads(images, heads=(head,))[head]

    @torch.inference_mode()
    def score_heads(self, images: Sequence[ImageInput], *, heads: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """float32 N x L scores of each of `heads` (default: every head of self.heads) from one forward pass."""
        heads = tuple(heads or self.heads)
        chunks = {head: [np.zeros((0, self.num_classes), dtype=np.float32)] for head in heads}
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(decode_image(im)) for im in images[start : start + self.batch_size]])
            batch = batch.to(self.device)
            if self.config.model.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with models.autocast(self.config, self.device):
                logits = self.model(batch)
            for head in heads:
                chunks[head].append(head_scores(logits, head).float().cpu().numpy())
        return {head: np.concatenate(parts) for head, parts in chunks.items()}

    def head_of(self, *, k: float | None = None, top_k: bool = False, rule: str | None = None,
                coverage: float | None = None) -> str:
        """The head whose scores a choice's sets threshold (sets_of takes that head's scores)."""
        chosen = self.rule(k=k, top_k=top_k, rule=rule, coverage=coverage)
        if isinstance(chosen, CalibratedRule) and chosen.head is not None:
            return chosen.head
        return self.score_head

    def predict(self, images: Sequence[ImageInput], *, k: float | None = None, top_k: bool = False,
                rule: str | None = None, coverage: float | None = None) -> list[LabelSet]:
        """Per image, the average-K set for a calibrated k, (top_k=True) the k best labels, or the set of a
        calibrated set rule at a calibrated coverage target (eval.set_rules)."""
        choice: dict[str, Any] = dict(k=k, top_k=top_k, rule=rule, coverage=coverage)
        head = self.head_of(**choice)  # an uncalibrated choice fails before any scoring
        return self.sets_of(self.score(list(images), head=head), **choice)

    def rule(self, *, k: float | None = None, top_k: bool = False, rule: str | None = None,
             coverage: float | None = None) -> np.float32 | CalibratedRule | None:
        """The float32 lambda_K of a calibrated k, None for top-K (k checked: an integer in [1, L]), or the
        calibrated set rule `rule` at `coverage`."""
        if rule is not None or coverage is not None:
            if rule is None or coverage is None:
                raise ValueError(f"a set rule needs both a rule name and a coverage target, got rule={rule} "
                                 f"coverage={coverage}")
            if k is not None or top_k:
                raise ValueError("choose K (k, top_k) or a set rule (rule, coverage), not both")
            return set_rules.select(self.set_rules, name=rule, coverage=coverage)
        if k is None:
            raise ValueError("choose a calibrated K, or a set rule and its coverage target")
        if top_k:
            if float(k) != int(k) or not 1 <= int(k) <= self.num_classes:
                raise ValueError(f"top-K needs an integer k in [1, {self.num_classes}], got {k}")
            return None
        threshold: np.float32 = np.float32(self.threshold(k))
        return threshold

    def sets_of(self, scores_NL: np.ndarray, *, k: float | None = None, top_k: bool = False, rule: str | None = None,
                coverage: float | None = None) -> list[LabelSet]:
        """The label sets of N x L scores of the choice's head (head_of): every place that labels uses this."""
        chosen = self.rule(k=k, top_k=top_k, rule=rule, coverage=coverage)
        members_NL = chosen.members(scores_NL) if isinstance(chosen, CalibratedRule) else None
        sets = []
        for row, scores_L in enumerate(scores_NL):
            order_L = np.argsort(-scores_L, kind="stable")  # ties: lower class id first
            if members_NL is not None:
                ids = order_L[members_NL[row][order_L]]
            elif chosen is None:
                assert k is not None  # rule() checked it
                ids = order_L[: int(k)]
            else:
                ids = order_L[scores_L[order_L] >= chosen]
            sets.append(self.label_set(ids, scores_L))
        return sets

    def label_set(self, ids: Iterable[int], scores_L: np.ndarray) -> LabelSet:
        """The set of these class ids with their names and scores (the order given: highest score first)."""
        ids = [int(i) for i in ids]
        return LabelSet(ids=ids, names=[self.class_names[i] for i in ids], scores=[float(scores_L[i]) for i in ids])


def class_names_of(checkpoint: dict[str, Any]) -> list[str] | None:
    """Class names by id from the checkpoint config's shard manifest, or None when it is not reachable."""
    shards = checkpoint["config"]["data"]["shards"]
    try:
        manifest = read_manifest(shards)
    except (OSError, ValueError):
        return None
    if manifest.num_classes != int(checkpoint["num_classes"]):
        return None
    return [manifest.classes[i] for i in range(manifest.num_classes)]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def iter_image_files(paths: Sequence[str]) -> Iterator[Path]:
    """The given files, and every image file under the given folders (recursively, sorted)."""
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")


def run_predict(
    *,
    run: str,
    k: float | None,
    paths: Sequence[str],
    top_k: bool = False,
    batch_size: int = 64,
    checkpoint: str | None = None,
    out: IO[str] | None = None,
    progress: bool = True,
    rule: str | None = None,
    coverage: float | None = None,
) -> int:
    """One JSON line per image on `out` (default: sys.stdout at call time); unreadable files give {"path", "error"}.

    Returns how many failed.
    """
    out = out if out is not None else sys.stdout  # not a default argument: that binds the stream at import
    from tqdm import tqdm

    predictor = SetPredictor.from_run(run, checkpoint, batch_size=batch_size)
    choice: dict[str, Any] = dict(k=k, top_k=top_k, rule=rule, coverage=coverage)
    predictor.rule(**choice)  # an uncalibrated choice fails before any image is read
    files = list(iter_image_files(paths))
    num_failed = 0
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            images, good = [], []
            for path in files[start : start + batch_size]:
                try:
                    images.append(decode_image(path))
                    good.append(path)
                except Exception as err:  # a corrupt or non-image file is reported, not fatal
                    num_failed += 1
                    out.write(json.dumps({"path": str(path), "error": f"{type(err).__name__}: {err}"}) + "\n")
            for path, label_set in zip(good, predictor.predict(images, **choice), strict=True):
                out.write(json.dumps({"path": str(path), **label_set.to_dict()}) + "\n")
            out.flush()
            bar.update(len(files[start : start + batch_size]))
    return num_failed
