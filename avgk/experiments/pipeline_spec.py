"""Typed pipeline specs: named stages, each one avgk verb, wired by the stages they need.

No Ray, torch or MLflow here: a spec with an unknown verb, a cycle or an input that no stage
produces stops in one line before anything heavy loads. avgk.experiments.pipeline_plan expands a
spec into its cells (load_pipeline); pipelines/pipeline.py walks them.

    pipeline YAML                                  meaning
    name: demo                                     <run.storage>/<name>/ and the MLflow parent run
    base: ../demo.yaml                             the run config every stage starts from (omit: the
                                                   embedded default); relative to this file, else the cwd
    overrides: {train.epochs: 3}                   fixed changes to the base, for every stage
    max_concurrent: 2                              stages and cells running at once
    x-methods: {ce: &ce {loss.name: ce}}           x-...: skipped, a place for YAML anchors
    stages:
      data: {verb: prepare}
      train:
        verb: train
        needs: [data]
        overrides: {eval.ks: [1, 2, 3]}            this stage's own changes
        matrix:                                    one cell per combination
          method: {two_head: {loss.name: two_head}, ce: {loss.name: ce}}
          seed: {key: train.seed, values: [0, 1]}
        exclude:                                   combinations left out: every dimension named
          - {method: ce, seed: [1]}                matches (a list: any of its labels)
      compare: {verb: compare, needs: [train], with: {reference: ce}}

A stage that needs a matrix stage takes, for each of its own cells, the input cells that agree
with it on the matrix dimensions both have: a per-method train after a per-method tune takes its
method's tuned values; a compare with no matrix takes every trained cell. A matrix label may set
the verb's options for its cells with `with.` keys (`ce: {loss.name: ce, with.sweep: ce.yaml}`: a
search space per method). A train stage that needs another train stage starts from that run's
weights (model.pretrained; its heads start fresh): a fine-tuning regime after a pretraining.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from avgk.config import Config, ConfigError, Section, build_config, format_errors
from avgk.experiments.sweep_config import check_key, config_error_detail

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")

VERBS: dict[str, str] = {
    "prepare": "write the data set's shards (synthetic data, or from data.source)",
    "tune": "an `avgk tune` sweep (with.sweep: its file; with.num_samples, with.sweep_overrides: changes to it); "
            "its best values feed the stages that need it",
    "train": "one training run per cell",
    "evaluate": "the scoring job's thresholds and metrics for a trained run",
    "pseudolabel": "the scoring job's global pseudo-labels for a trained run",
    "compare": "paired differences with 95% intervals over the trained runs it needs (with.reference)",
    "register": "the compared winner's model (or the one trained run it needs) into the MLflow registry",
    "summarize": "a study's tables and figures over its trained cells (with.study: the study; avgk study writes it)",
    "predict": "label sets for images with the trained run it needs, or a comparison's winner (with.inputs: files, "
               "folders, a bucket prefix or a shard set; with.k, with.top_k, with.split): the prediction job's "
               "Parquet parts in the cell's folder; run every time, reusing its finished parts",
}
"""The verbs a stage may run, and what each does in a pipeline."""

# What each verb takes from the stages it needs (the verbs of those stages).
INPUTS: dict[str, set[str]] = {
    "prepare": set(),
    "tune": {"prepare"},
    "train": {"prepare", "tune", "train"},  # a needed train: the weights this one starts from
    "evaluate": {"train"},
    "pseudolabel": {"train"},
    "compare": {"train", "evaluate"},
    "register": {"compare", "train"},
    "summarize": {"train"},
    "predict": {"train", "compare"},
}

# Options a verb reads from `with:`, and their defaults.
OPTIONS: dict[str, dict[str, Any]] = {
    "prepare": {},
    "tune": {"sweep": None, "num_samples": None, "sweep_overrides": {}},
    "train": {},
    "evaluate": {"checkpoint": None},
    "pseudolabel": {"checkpoint": "last"},
    "compare": {"reference": None, "k": None},
    "register": {"name": None},
    "summarize": {"study": None},
    "predict": {"inputs": None, "k": None, "top_k": False, "split": "test"},
}

EXTENSION_PREFIX = "x-"
"""Top-level keys starting with x- are the spec author's (YAML anchors shared by stages); the runner skips them."""

# Keys the runner sets itself for every cell: its run folder, its data from the prepare stage.
RUNNER_KEYS = ("run.name", "run.storage")


class PipelineSpecError(ConfigError):
    """A pipeline spec problem: the key, the value and the rule."""


class Dimension(Section):
    """One matrix dimension written as a key and its values (labels: the values as written)."""

    key: str
    values: list[Any] = Field(min_length=1)


class StageSpec(Section):
    verb: str = Field(description="the avgk verb this stage runs: " + ", ".join(VERBS))
    needs: list[str] = Field(default_factory=list, description="the stages whose outputs this one reads")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config key -> value, this stage only")
    matrix: dict[str, dict[str, dict[str, Any]] | Dimension] = Field(
        default_factory=dict, description="dimension -> {label: overrides} or {key, values}: one cell per combination")
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="matrix combinations left out: {dimension: label or [labels]}, all must match")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the verb's own options")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("verb")
    @classmethod
    def _verb(cls, verb: str) -> str:
        if verb not in VERBS:
            raise ValueError(f"unknown verb {verb!r}: one of {', '.join(VERBS)}")
        return verb

    @model_validator(mode="after")
    def _options(self) -> StageSpec:
        unknown = sorted(set(self.with_) - set(OPTIONS[self.verb]))
        if unknown:
            allowed = ", ".join(OPTIONS[self.verb]) or "none"
            raise ValueError(f"with: {unknown} are not options of verb {self.verb!r} (its options: {allowed})")
        return self


class PipelineSpec(Section):
    name: str = Field(min_length=1, description="<run.storage>/<name>/ and the MLflow parent run")
    base: str | None = Field(None, description="the base run config YAML (omit: the embedded default)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, every stage")
    max_concurrent: int = Field(2, ge=1, description="stages and cells running at once")
    stages: dict[str, StageSpec] = Field(min_length=1, description="stage name -> its verb, needs, overrides, matrix")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"name {name!r} must use only letters, digits and _ . + -")
        return name


def check_spec_key(key: str, *, where: str, runner_keys: tuple[str, ...] = RUNNER_KEYS) -> None:
    if key in runner_keys:
        raise PipelineSpecError(f"pipeline spec error: {where} sets {key!r}: the runner names every cell's run folder")
    try:
        check_key(key)
    except ConfigError as err:
        raise PipelineSpecError(f"pipeline spec error: {where}: {config_error_detail(err).removeprefix('sweep config error: ')}"
                                ) from None


# ---------------------------------------------------------------- loading


def base_config(path: Path | None, spec: PipelineSpec) -> Config:
    if spec.base is None:
        return build_config(None)
    candidates = [path.parent / spec.base] if path is not None else []
    candidates.append(Path(spec.base))
    for candidate in candidates:
        if candidate.is_file():
            from avgk.config import load_config

            return load_config(candidate)
    where = f"{str(path.parent)!r} nor to the cwd" if path is not None else "the cwd"
    raise PipelineSpecError(f"pipeline spec error: base={spec.base!r} is neither relative to {where}")


def parse_spec(tree: Any, *, source: str) -> PipelineSpec:
    if not isinstance(tree, dict):
        raise PipelineSpecError(f"pipeline spec {source!r} must hold a mapping, got {type(tree).__name__}")
    tree = {k: v for k, v in tree.items() if not str(k).startswith(EXTENSION_PREFIX)}
    try:
        return PipelineSpec.model_validate(tree)
    except ValidationError as err:
        raise PipelineSpecError(f"pipeline spec error: {format_errors(err).replace('.with_', '.with')}") from None
