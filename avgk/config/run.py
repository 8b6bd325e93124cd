"""The whole run's config (every section, and the rules that span sections), tracking and where a run lives."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from avgk.config.base import Section, flatten
from avgk.config.data import DataConfig
from avgk.config.evaluation import EvalConfig
from avgk.config.model import LossConfig, ModelConfig
from avgk.config.train import TWO_HEAD_ML_LR_SCALE, TrainConfig


class TrackingConfig(Section):
    """MLflow."""

    enabled: bool = True
    uri: str | None = Field(
        None, description="tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///<run.storage>/mlflow.db"
    )
    experiment: str = "avgk"
    log_model: bool = Field(
        True, description="log the trained model as an MLflow pyfunc model (image bytes -> label sets) at the end"
    )
    register_model: str | None = Field(
        None, description="model registry name to register the logged pyfunc model under; None: not registered"
    )

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        if self.register_model is not None:
            if not self.register_model.strip() or self.register_model != self.register_model.strip():
                raise ValueError(
                    f"tracking.register_model must be a non-empty name without surrounding spaces, got {self.register_model!r}"
                )
            if not (self.enabled and self.log_model):
                raise ValueError(
                    f"tracking.register_model={self.register_model!r} needs tracking.enabled=true and "
                    f"tracking.log_model=true, got enabled={self.enabled} log_model={self.log_model}"
                )
        return self


class RunConfig(Section):
    """Where a run lives."""

    name: str = Field("demo", min_length=1, description="run name: <storage>/<name> is the run directory")
    storage: str = Field("runs", description="local folder or pyarrow filesystem URI (s3://, gs://) holding runs")
    resume: Literal["auto", "never", "force"] = Field(
        "auto",
        description="an existing run directory: auto = resume when its config.yaml matches (else stop, naming "
        "the differing keys); never = stop; force = resume with this config",
    )

    object_store_retry_s: float = Field(
        180.0, ge=0,
        description="seconds a read or write of shards, manifests, checkpoints or pseudo-labels in object storage "
        "(s3://, gs://) keeps retrying while the store does not answer, before the job stops naming the URI "
        "(an outage shorter than this costs no restart); 0: no retry",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if "/" in name or name in {".", ".."}:
            raise ValueError(f"run.name must be a plain folder name, got {name!r}")
        return name


class Config(Section):
    """A whole avgk run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.data.source == "synthetic":
            self.validate_num_classes(self.data.synthetic.num_classes)
        largest_k = max(*self.eval.ks, self.loss.effective_pseudo_k)
        if self.eval.top_t is not None and self.eval.top_t <= largest_k:
            raise ValueError(
                f"eval.top_t must be > the largest K it serves (eval.ks and loss.pseudo_k: {largest_k:g}), "
                f"got {self.eval.top_t}: the scoring jobs keep top_t scores per sample and need rank round(K N) + 1"
            )
        if (self.train.mixup_alpha or self.train.cutmix_alpha) and self.loss.name != "ce":
            # Mixed images have two weighted labels: the two-head pseudo-labels and the single-positive
            # baselines are defined from one observed label per image, so there is no correct target.
            raise ValueError(
                f"train.mixup_alpha / train.cutmix_alpha need loss.name=ce (soft targets for the softmax "
                f"cross-entropy), got loss.name={self.loss.name!r}: the other losses take one observed label per image"
            )
        return self

    def validate_num_classes(self, num_classes: int) -> None:
        """Rules that need L, which real data sets only reveal in their manifest."""
        for k in self.eval.ks:
            if k >= num_classes:
                raise ValueError(f"eval.ks: K must be < number of classes {num_classes}, got {k}")
        if self.loss.k >= num_classes:
            raise ValueError(f"loss.k must be < number of classes {num_classes}, got {self.loss.k}")
        if self.loss.effective_pseudo_k >= num_classes:
            raise ValueError(f"loss.pseudo_k must be < number of classes {num_classes}, got {self.loss.effective_pseudo_k}")

    @property
    def multilabel_lr_scale(self) -> float:
        """train.lr_scale.multilabel, or its default for the loss."""
        scale = self.train.lr_scale.multilabel
        if scale is not None:
            return scale
        return TWO_HEAD_ML_LR_SCALE if self.loss.name == "two_head" else 1.0

    @property
    def run_dir(self) -> str:
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict())
