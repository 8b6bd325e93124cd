"""A run's MLflow pyfunc model: encoded images in, average-K label sets out; logging it into a run.

The model class lives in avgk (not pipelines/) and imports no Ray, so the model carries all the
code it needs as `code_paths`: avgk's own package folder, copied into the model's `code/` folder,
which MLflow puts first on sys.path before unpickling the model. The model therefore loads, and
`mlflow models serve --env-manager local` serves it, where avgk is not installed; the third-party
packages are pinned in its pip requirements.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from PIL import Image, UnidentifiedImageError

from avgk.inference.predict import (
    THRESHOLDS_FILE,
    LabelSet,
    SetPredictor,
    class_names_of,
    decode_image,
    model_only_checkpoint,
)
from avgk.records import runs
from avgk.runtime import console, outbox, storage
from avgk.training import checkpoints

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

__all__ = ["PYFUNC_NAME", "AvgKSetModel", "code_paths", "log_pyfunc_model", "pip_requirements", "pyfunc_signature"]

PYFUNC_NAME = "avgk_model"
IMAGE_COLUMN = "image"
MAX_ERRORS_SHOWN = 5


class AvgKSetModel(PythonModel):
    """Image bytes (column "image") -> average-K label sets as JSON strings (column "label_set").

    params: k (a calibrated K, default the training's loss.k when calibrated) and top_k, or rule and
    coverage (a set rule of eval.set_rules at one of its calibrated coverage targets). A row that
    is not an image, or a K that was not calibrated, raises an MLflow INVALID_PARAMETER_VALUE error
    naming the rows or the calibrated K: `mlflow models serve` answers it with HTTP 400 and that
    message instead of a stack trace.
    """

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = SetPredictor.from_files(
            checkpoint=context.artifacts["checkpoint"],
            thresholds=context.artifacts["thresholds"],
            class_names=context.artifacts["class_names"],
        )

    def predict(
        self, context: PythonModelContext | None, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        params = params or {}
        frame = model_input
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame({IMAGE_COLUMN: list(model_input)})
        column = IMAGE_COLUMN if IMAGE_COLUMN in frame.columns else frame.columns[0]
        rule, coverage = params.get("rule"), params.get("coverage")
        if rule is not None or coverage is not None:  # a set rule (eval.set_rules) instead of K
            choice: dict[str, Any] = dict(rule=rule, coverage=None if coverage is None else float(coverage))
        else:
            k = params.get("k")
            choice = dict(k=float(k) if k is not None else float(self.predictor.ks[0]),
                          top_k=bool(params.get("top_k", False)))
        values = list(frame[column])
        sets: list[LabelSet] = []
        errors: list[str] = []
        # One batch of decoded images in memory at a time; after a bad row, the rest is only decoded
        # (to name every bad row), not scored.
        for start in range(0, len(values), self.predictor.batch_size):
            images = decode_rows(values[start : start + self.predictor.batch_size], first_row=start, errors=errors)
            if errors:
                continue
            try:
                sets += self.predictor.predict(images, **choice)
            except ValueError as err:  # an uncalibrated K or rule, a top-K out of range: the request's fault
                raise MlflowException.invalid_parameter_value(str(err)) from err
        if errors:
            shown = "; ".join(errors[:MAX_ERRORS_SHOWN]) + ("; ..." if len(errors) > MAX_ERRORS_SHOWN else "")
            raise MlflowException.invalid_parameter_value(
                f"column {str(column)!r} must hold encoded images (PNG, JPEG, ...; base64 in JSON requests), "
                f"{len(errors)} of {len(values)} rows do not: {shown}"
            )
        label_sets: pd.DataFrame = pd.DataFrame({"label_set": [json.dumps(s.to_dict()) for s in sets]})
        return label_sets


def decode_rows(values: Sequence[Any], *, first_row: int, errors: list[str]) -> list[Image.Image]:
    """The RGB images of the rows that decode; each row that does not adds "row N: why" to `errors`."""
    images = []
    for row, value in enumerate(values, start=first_row):
        try:
            images.append(decode_image(value))
        except UnidentifiedImageError:  # its message names a BytesIO object, not the row
            errors.append(f"row {row}: UnidentifiedImageError (not an image format PIL reads)")
        except Exception as err:  # PIL raises several types for truncated or malformed images
            errors.append(f"row {row}: {type(err).__name__}: {err}")
    return images


def pyfunc_signature(*, default_k: float) -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "label_set")]),
        params=ParamSchema([ParamSpec("k", "double", float(default_k)), ParamSpec("top_k", "boolean", False),
                            ParamSpec("rule", "string", None), ParamSpec("coverage", "double", None)]),
    )


def code_paths() -> list[str]:
    """avgk's package folder: the model's only code (the model class, SetPredictor and what they import)."""
    return [str(Path(__file__).resolve().parents[1])]


def pip_requirements() -> list[str]:
    """The third-party packages the model's code imports, pinned to this environment's versions.

    Explicit, so MLflow does not infer the environment (slow); avgk itself travels as code_paths.
    webdataset and tqdm: avgk.inference.predict imports avgk.data, which reads shards with them.
    """
    from importlib.metadata import version

    names = ["torch", "torchvision", "timm", "mlflow", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "pyarrow",
             "webdataset", "tqdm"]
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


def log_pyfunc_model_or_queue(uri: str, run_id: str, run_dir: str, *, checkpoint: str,
                              register_as: str | None = None) -> str | None:
    """log_pyfunc_model, queued in the run's outbox (avgk.runtime.outbox) if its tracking server does
    not answer: the model URI, or None when queued."""
    sent = outbox.send(log_pyfunc_model, uri, run_id,
                       {"run_dir": run_dir, "checkpoint": checkpoint, "register_as": register_as})
    return str(sent.value) if sent.delivered else None


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
    calibrated = sorted(float(k) for k in thresholds["thresholds"])
    loss_k = float(state["config"]["loss"]["k"])
    default_k = loss_k if loss_k in calibrated else calibrated[0]
    names = class_names_of(state) or [str(c) for c in range(int(state["num_classes"]))]
    client = MlflowClient(tracking_uri=uri)
    status = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory() as tmp, using_tracking_uri(uri):
        import torch

        files = {"checkpoint": Path(tmp) / runs.CHECKPOINT_FILE, "thresholds": Path(tmp) / THRESHOLDS_FILE,
                 "class_names": Path(tmp) / "class_names.json"}
        torch.save(model_only_checkpoint(state), files["checkpoint"])
        files["thresholds"].write_text(json.dumps(thresholds))
        files["class_names"].write_text(json.dumps(names))
        mlflow.start_run(run_id=run_id)
        try:
            with quiet_mlflow():
                info = mlflow.pyfunc.log_model(
                    name=PYFUNC_NAME,
                    python_model=AvgKSetModel(),
                    artifacts={key: str(path) for key, path in files.items()},
                    code_paths=code_paths(),
                    signature=pyfunc_signature(default_k=default_k),
                    pip_requirements=pip_requirements(),
                    registered_model_name=register_as,
                )
        finally:
            mlflow.end_run()
            if status != "FINISHED":  # end_run closed it; the run's owner ends it with its real status
                client.update_run(run_id, status=status)
    model_uri: str = info.model_uri
    return model_uri


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI (what `models:/` URIs and fluent calls resolve through) for a block.

    Restored as it was: unset when nothing had set one. Restoring `get_tracking_uri()` instead sets
    MLflow's default, which exports MLFLOW_TRACKING_URI=sqlite:///mlflow.db to the process, and every
    later run in it then writes to a store in the working directory.
    """
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # typed str | Path, but None unsets it (as wanted)
