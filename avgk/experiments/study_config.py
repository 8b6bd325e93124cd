"""Typed reproduction-study configuration: methods x ambiguity rates x seeds on the synthetic data.

No Ray here; pipelines/study.py runs the cells. Every cell's Config is built and validated
when the study loads, so a typo in a method's overrides fails before anything trains.

    study YAML                                   meaning
    name: synthetic-study                        <run.storage>/<name>/ and the MLflow parent run
    base: ../smoke.yaml                          relative to the study file, else to the cwd
    overrides: {train.epochs: 8}                 fixed changes to the base config
    methods:                                     label -> overrides of that method
      ce: {loss.name: ce}
      two_head: {loss.name: two_head}
      two_head_mu0.3: {loss.name: two_head, loss.ml_weight: 0.3}
    ambiguity_rates: [0, 0.25, 0.5, 0.75]        one synthetic data set each (data.synthetic.ambiguity_rate)
    seeds: [0, 1, 2]                             train.seed; the data set is the same for every seed
    reference: ce                                gains are method minus this, paired by seed
    focus: [two_head]                            also drawn alone in the gain figures
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from avgk.config import Config, ConfigError, Section, find_config_file, format_errors
from avgk.evaluation.metrics import format_k
from avgk.experiments.pipeline_plan import Plan, build_plan
from avgk.experiments.pipeline_spec import PipelineSpec, PipelineSpecError
from avgk.experiments.sweep_config import check_key, config_error_detail, config_for, read_plan, resolve_base

# Keys a study sets itself for each cell: a method may not override them.
CELL_KEYS = ("data.shards", "data.synthetic.ambiguity_rate", "train.seed", "run.name", "run.storage")
_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


class StudyConfigError(ConfigError):
    """A study configuration problem: the key, the value and the rule."""


class StudyConfig(Section):
    """A grid of training runs over the synthetic data, summarised against a reference method."""

    name: str = Field(min_length=1, description="study name: <run.storage>/<name>/ and the MLflow parent run")
    base: str = Field(description="base run config YAML, relative to the study file (else to the cwd)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, fixed for every cell")
    methods: dict[str, dict[str, Any]] = Field(min_length=1, description="method label -> dotted overrides")
    ambiguity_rates: list[float] = Field(min_length=1, description="data.synthetic.ambiguity_rate values, in [0, 1]")
    seeds: list[int] = Field(min_length=1, description="train.seed values (model init, data order, augmentation)")
    reference: str = Field("ce", description="the method every gain is measured against")
    headline_k: float | None = Field(None, gt=0, description="K of the figures; default: loss.k of the base")
    focus: list[str] = Field(default_factory=list, description="methods also drawn alone in the gain figures")
    max_concurrent: int = Field(2, ge=1, description="cells training at once (one Ray task each)")
    cpus_per_cell: float = Field(1.0, gt=0, description="Ray CPUs (and torch threads, rounded up) per cell")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if "/" in name or name in {".", ".."}:
            raise ValueError(f"name must be a plain folder name, got {name!r}")
        return name

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for label, overrides in methods.items():
            if not _LABEL.match(label):
                raise ValueError(f"method label {label!r} must use only letters, digits and _ . + -")
            fixed = sorted(set(overrides or {}) & set(CELL_KEYS))
            if fixed:
                raise ValueError(f"methods[{label!r}] sets {fixed}: the study sets these keys for each cell")
        return {label: dict(overrides or {}) for label, overrides in methods.items()}

    @field_validator("ambiguity_rates")
    @classmethod
    def _rates(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not 0.0 <= r <= 1.0]
        if bad:
            raise ValueError(f"ambiguity_rates must lie in [0, 1], got {bad}")
        if len(set(rates)) != len(rates):
            raise ValueError(f"ambiguity_rates must be distinct, got {rates}")
        return rates

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if self.reference not in self.methods:
            raise ValueError(f"reference={self.reference!r} is not one of the methods {sorted(self.methods)}")
        unknown = [m for m in self.focus if m not in self.methods]
        if unknown:
            raise ValueError(f"focus names {unknown}, which are not methods {sorted(self.methods)}")
        fixed = sorted(set(self.overrides) & set(CELL_KEYS))
        if fixed:
            raise ValueError(f"overrides set {fixed}: the study sets these keys for each cell")
        return self

    def flat(self) -> dict[str, Any]:
        """study.* params for the MLflow parent run."""
        out = {f"study.{k}": v for k, v in self.model_dump(mode="json", exclude={"methods", "overrides"}).items()}
        out.update({f"study.overrides.{k}": v for k, v in self.overrides.items()})
        out.update({f"study.methods.{label}": str(o) for label, o in self.methods.items()})
        return out


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    method: str
    ambiguity: float
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return cell_name(self.method, self.ambiguity, self.seed)


def cell_name(method: str, ambiguity: float, seed: int) -> str:
    return f"{method}-a{format_k(ambiguity)}-s{seed}"


def data_dir(root: str, ambiguity: float) -> str:
    """The shards of one ambiguity rate, shared by every method and seed."""
    return f"{root}/data/ambiguity-{format_k(ambiguity)}"


def study_root(study: StudyConfig, base: Config) -> str:
    return f"{base.run.storage.rstrip('/')}/{study.name}"


def build_cells(study: StudyConfig, base: Config) -> list[Cell]:
    """Every (method, ambiguity, seed) cell's Config, validated; ambiguity-major so data sets are built in turn."""
    if base.data.source != "synthetic":
        raise StudyConfigError(
            f"study config error: the study runs on the synthetic data (its ambiguity knob), got data.source={base.data.source!r}"
        )
    if "://" in base.run.storage:
        raise StudyConfigError(
            f"study config error: a study writes its tables and figures on local disk, got run.storage={base.run.storage!r}"
        )
    k = study.headline_k if study.headline_k is not None else base.loss.k
    if k not in base.eval.ks:
        raise StudyConfigError(f"study config error: headline_k={k:g} must be one of eval.ks {base.eval.ks}")
    root = study_root(study, base)
    tree = base.to_dict()
    cells = []
    for ambiguity in study.ambiguity_rates:
        for method, overrides in study.methods.items():
            for seed in study.seeds:
                name = cell_name(method, ambiguity, seed)
                values = {
                    **overrides,
                    "data.shards": data_dir(root, ambiguity),
                    "data.synthetic.ambiguity_rate": ambiguity,
                    "train.seed": seed,
                    "run.name": name,
                    "run.storage": f"{root}/runs",
                }
                try:
                    config = config_for(tree, values)
                except ConfigError as err:
                    raise StudyConfigError(
                        f"study config error: methods[{method!r}] {overrides}: {config_error_detail(err)}"
                    ) from None
                cells.append(Cell(method=method, ambiguity=ambiguity, seed=seed, config=config))
    return cells


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, Config, list[Cell]]:
    """The study config, its resolved base Config and every cell, all validated.

    `overrides` (`key=value`) go to the base config when the key starts with a Config section
    (data., train., ...), else to the study itself (seeds=[0], max_concurrent=1).
    """
    path = find_config_file(path)
    tree, base_overrides = read_plan(path, overrides, kind="study", error=StudyConfigError)
    try:
        study = StudyConfig.model_validate(tree)
    except ValidationError as err:
        raise StudyConfigError(f"study config error: {format_errors(err)}") from None
    for key in (k for o in study.methods.values() for k in o):
        try:
            check_key(key)
        except ConfigError as err:
            raise StudyConfigError(str(err).replace("sweep config error", "study config error")) from None
    base = resolve_base(path, study.base, study.overrides, base_overrides, kind="study", error=StudyConfigError)
    return study, base, build_cells(study, base)


def study_plan(study: StudyConfig, base: Config) -> Plan:
    """The study as a pipeline (avgk.experiments.pipeline_spec): one data set per ambiguity rate, a training
    per method x rate x seed (cells named as before: <method>-a<rate>-s<seed>), the summary over them all."""
    root = study_root(study, base)
    rates = {f"a{format_k(a)}": {"data.synthetic.ambiguity_rate": a, "data.shards": data_dir(root, a)}
             for a in study.ambiguity_rates}
    spec = PipelineSpec.model_validate({
        "name": study.name,
        "max_concurrent": study.max_concurrent,
        "stages": {
            "prepare": {"verb": "prepare", "matrix": {"ambiguity": rates}},  # shards in <root>/data/ambiguity-<a>
            "train": {"verb": "train", "needs": ["prepare"], "overrides": {"train.cpus_per_worker": study.cpus_per_cell},
                      "matrix": {"method": study.methods, "ambiguity": rates,
                                 "seed": {f"s{seed}": {"train.seed": seed} for seed in study.seeds}}},
            "summary": {"verb": "summarize", "needs": ["train"], "with": {"study": study.model_dump(mode="json")}},
        },
    })
    try:
        return build_plan(spec, base)
    except PipelineSpecError as err:
        raise StudyConfigError(str(err).replace("pipeline spec error", "study config error")) from None
