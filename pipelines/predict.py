"""`avgk predict` (label sets of image files as JSON lines) and the run's MLflow pyfunc model.

Nothing here imports Ray: the pyfunc model is logged from the training's rank 0 and served
wherever MLflow loads it (avgk must be importable there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import mlflow
import pandas as pd

from avgk import checkpoints, console, runs, storage
from avgk.predict import THRESHOLDS_FILE, SetPredictor, class_names_of, decode_image, model_only_checkpoint

__all__ = ["AvgKSetModel", "iter_image_files", "log_pyfunc_model", "pyfunc_signature", "run_predict"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PYFUNC_NAME = "avgk_model"


# ====================================================================== avgk predict


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
    k: float,
    paths: Sequence[str],
    top_k: bool = False,
    batch_size: int = 64,
    checkpoint: str | None = None,
    out: IO[str] | None = None,
    progress: bool = True,
) -> int:
    """One JSON line per image on `out` (default: sys.stdout at call time); unreadable files give {"path", "error"}.

    Returns how many failed.
    """
    out = out if out is not None else sys.stdout  # not a default argument: that binds the stream at import
    from tqdm import tqdm

    predictor = SetPredictor.from_run(run, checkpoint, batch_size=batch_size)
    if not top_k:
        predictor.threshold(k)  # an uncalibrated K fails before any image is read
    elif float(k) != int(k):
        raise ValueError(f"--top-k needs an integer --k, got {k}")
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
            for path, label_set in zip(good, predictor.predict(images, k=k, top_k=top_k)):
                out.write(json.dumps({"path": str(path), **label_set.to_dict()}) + "\n")
            out.flush()
            bar.update(len(files[start : start + batch_size]))
    return num_failed


# ====================================================================== MLflow pyfunc


class AvgKSetModel(mlflow.pyfunc.PythonModel):
    """Image bytes (column "image") -> average-K label sets as JSON strings (column "label_set").

    params: k (a calibrated K, default the training's loss.k when calibrated) and top_k.
    """

    def load_context(self, context) -> None:
        self.predictor = SetPredictor.from_files(
            checkpoint=context.artifacts["checkpoint"],
            thresholds=context.artifacts["thresholds"],
            class_names=context.artifacts["class_names"],
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        column = "image" if "image" in frame.columns else frame.columns[0]
        k = params.get("k")
        k = float(k) if k is not None else float(self.predictor.ks[0])
        sets = self.predictor.predict(list(frame[column]), k=k, top_k=bool(params.get("top_k", False)))
        return pd.DataFrame({"label_set": [json.dumps(s.to_dict()) for s in sets]})


def pyfunc_signature(*, default_k: float):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label_set")]),
        params=ParamSchema([ParamSpec("k", "double", float(default_k)), ParamSpec("top_k", "boolean", False)]),
    )


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not infer the environment (slow); avgk itself must be installed.
    from importlib.metadata import version

    names = ["torch", "torchvision", "timm", "mlflow", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "pyarrow"]
    return [f"{name}=={version(name)}" for name in names]


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """While the model is logged: no CloudPickle notice (the model class is avgk's own), no
    input-example hint (the signature says what the model takes), no per-file progress bars.
    `avgk -v` shows them."""
    if console.verbose():
        yield
        return
    previous = {name: logging.getLogger(name).level for name in ("mlflow.pyfunc", "mlflow.models.model")}
    progress = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        for name in previous:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
            yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
        if progress is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = progress


def log_pyfunc_model(
    uri: str,
    run_id: str,
    run_dir: str,
    *,
    checkpoint: str,
    register_as: str | None = None,
) -> str:
    """Log the run's checkpoint (weights only), thresholds.json and class names as a pyfunc model.

    Registers it under `register_as` when given. The MLflow run keeps its status (the driver
    ends it). Returns the model URI.
    """
    from mlflow.tracking import MlflowClient

    run_dir = storage.absolute(run_dir)
    state = checkpoints.load_checkpoint_file_uri(checkpoint)
    thresholds = storage.read_json(storage.join(run_dir, THRESHOLDS_FILE))
    calibrated = sorted((float(k) for k in thresholds["thresholds"]))
    loss_k = float(state["config"]["loss"]["k"])
    default_k = loss_k if loss_k in calibrated else calibrated[0]
    names = class_names_of(state) or [str(c) for c in range(int(state["num_classes"]))]
    client = MlflowClient(tracking_uri=uri)
    status = client.get_run(run_id).info.status
    previous_uri = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        files = {"checkpoint": Path(tmp) / runs.CHECKPOINT_FILE, "thresholds": Path(tmp) / THRESHOLDS_FILE,
                 "class_names": Path(tmp) / "class_names.json"}
        torch.save(model_only_checkpoint(state), files["checkpoint"])
        files["thresholds"].write_text(json.dumps(thresholds))
        files["class_names"].write_text(json.dumps(names))
        mlflow.set_tracking_uri(uri)
        try:
            mlflow.start_run(run_id=run_id)
            try:
                with quiet_mlflow():
                    info = mlflow.pyfunc.log_model(
                        name=PYFUNC_NAME,
                        python_model=AvgKSetModel(),
                        artifacts={key: str(path) for key, path in files.items()},
                        signature=pyfunc_signature(default_k=default_k),
                        pip_requirements=_pip_requirements(),
                        registered_model_name=register_as,
                    )
            finally:
                mlflow.end_run()
                if status != "FINISHED":  # end_run closed it; the run's owner ends it with its real status
                    client.update_run(run_id, status=status)
        finally:
            mlflow.set_tracking_uri(previous_uri)
    return info.model_uri
