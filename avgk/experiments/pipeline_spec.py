"""Typed pipeline specs: named stages, each one avgk verb, wired by the stages they need.

No Ray, torch or MLflow here: a spec with an unknown verb, a cycle or an input that no stage
produces stops in one line before anything heavy loads. pipelines/pipeline.py walks the graph.

    pipeline YAML                                  meaning
    name: demo                                     <run.storage>/<name>/ and the MLflow parent run
    base: ../demo.yaml                             the run config every stage starts from (omit: the
                                                   embedded default); relative to this file, else the cwd
    overrides: {train.epochs: 3}                   fixed changes to the base, for every stage
    max_concurrent: 2                              stages and cells running at once
    stages:
      data: {verb: prepare}
      train:
        verb: train
        needs: [data]
        overrides: {eval.ks: [1, 2, 3]}            this stage's own changes
        matrix:                                    one cell per combination
          method: {two_head: {loss.name: two_head}, ce: {loss.name: ce}}
          seed: {key: train.seed, values: [0, 1]}
      compare: {verb: compare, needs: [train], with: {reference: ce}}

A stage that needs a matrix stage takes, for each of its own cells, the input cells that agree
with it on the matrix dimensions both have: a per-method train after a per-method tune takes its
method's tuned values; a compare with no matrix takes every trained cell.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from avgk.config import Config, ConfigError, Section, build_config, find_config_file, format_errors, parse_overrides
from avgk.experiments.sweep_config import check_key, config_error_detail, config_for, read_plan

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")

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
}
"""The verbs a stage may run, and what each does in a pipeline."""

# What each verb takes from the stages it needs (the verbs of those stages).
INPUTS: dict[str, set[str]] = {
    "prepare": set(),
    "tune": {"prepare"},
    "train": {"prepare", "tune"},
    "evaluate": {"train"},
    "pseudolabel": {"train"},
    "compare": {"train", "evaluate"},
    "register": {"compare", "train"},
    "summarize": {"train"},
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
}

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
        if not _NAME.match(name):
            raise ValueError(f"name {name!r} must use only letters, digits and _ . + -")
        return name


# ---------------------------------------------------------------- the expanded graph


@dataclass(frozen=True)
class Cell:
    """One unit of work: a stage, or one combination of its matrix."""

    stage: str
    verb: str
    labels: tuple[tuple[str, str], ...]  # (dimension, label), in the stage's matrix order
    config: Config
    options: dict[str, Any]
    inputs: tuple[str, ...]  # ids of the cells this one reads
    values: dict[str, Any] = field(default_factory=dict)  # the dotted overrides that made this cell's config

    @property
    def name(self) -> str:
        return "-".join(label for _, label in self.labels) or "all"

    @property
    def id(self) -> str:
        return f"{self.stage}[{self.name}]" if self.labels else self.stage


@dataclass(frozen=True)
class Plan:
    spec: PipelineSpec
    base: Config
    cells: dict[str, Cell]  # in an order where every cell follows its inputs
    stage_order: list[str]

    @property
    def root(self) -> str:
        return f"{self.base.run.storage.rstrip('/')}/{self.spec.name}"

    def of_stage(self, stage: str) -> list[Cell]:
        return [c for c in self.cells.values() if c.stage == stage]


def _label(value: Any) -> str:
    text = str(value)
    if not _NAME.match(text):
        raise PipelineSpecError(f"pipeline spec error: matrix value {value!r} cannot name a cell (letters, digits, _ . + -)")
    return text


def _dimension_cells(dim: str, entry: dict[str, dict[str, Any]] | Dimension, stage: str) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(entry, Dimension):
        _check_keys(entry.key, where=f"stages.{stage}.matrix.{dim}.key")
        return [(_label(v), {entry.key: v}) for v in entry.values]
    if not entry:
        raise PipelineSpecError(f"pipeline spec error: stages.{stage}.matrix.{dim} has no labels")
    out = []
    for label, overrides in entry.items():
        _label(label)
        for key in overrides or {}:
            _check_keys(key, where=f"stages.{stage}.matrix.{dim}.{label}")
        out.append((label, dict(overrides or {})))
    return out


def _check_keys(key: str, *, where: str, runner_keys: tuple[str, ...] = RUNNER_KEYS) -> None:
    if key in runner_keys:
        raise PipelineSpecError(f"pipeline spec error: {where} sets {key!r}: the runner names every cell's run folder")
    try:
        check_key(key)
    except ConfigError as err:
        raise PipelineSpecError(f"pipeline spec error: {where}: {config_error_detail(err).removeprefix('sweep config error: ')}"
                                ) from None


def stage_order(spec: PipelineSpec) -> list[str]:
    """The stages so that each follows the ones it needs; an unknown need or a cycle is an error."""
    for name, stage in spec.stages.items():
        if not _NAME.match(name):
            raise PipelineSpecError(f"pipeline spec error: stage name {name!r} must use only letters, digits and _ . + -")
        for need in stage.needs:
            if need not in spec.stages:
                raise PipelineSpecError(
                    f"pipeline spec error: stages.{name}.needs names {need!r}, which no stage produces "
                    f"(stages: {', '.join(spec.stages)})")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = [*path[path.index(name):], name]
            raise PipelineSpecError(f"pipeline spec error: stages form a cycle: {' -> '.join(cycle)}")
        state[name] = "open"
        for need in spec.stages[name].needs:
            visit(need, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in spec.stages:
        visit(name, [])
    for name, stage in spec.stages.items():  # after the cycles: a cycle is named as one
        for need in stage.needs:
            if spec.stages[need].verb not in INPUTS[stage.verb]:
                takes = ", ".join(sorted(INPUTS[stage.verb])) or "nothing"
                raise PipelineSpecError(
                    f"pipeline spec error: stages.{name} ({stage.verb}) cannot read stage {need!r} "
                    f"({spec.stages[need].verb}); a {stage.verb} stage reads: {takes}")
    return order


def _matching(cell_labels: dict[str, str], candidates: list[Cell]) -> list[Cell]:
    """The input cells that agree with `cell_labels` on every dimension both have."""
    return [c for c in candidates if all(cell_labels.get(d, lab) == lab for d, lab in c.labels)]


def build_plan(spec: PipelineSpec, base: Config) -> Plan:
    """Every cell's Config (validated) and inputs, in dependency order."""
    order = stage_order(spec)
    base_tree = base.to_dict()
    cells: dict[str, Cell] = {}
    by_stage: dict[str, list[Cell]] = {}
    for name in order:
        stage = spec.stages[name]
        for key in stage.overrides:
            _check_keys(key, where=f"stages.{name}.overrides")
        dims = [(dim, _dimension_cells(dim, entry, name)) for dim, entry in stage.matrix.items()]
        combos = itertools.product(*(choices for _, choices in dims)) if dims else [()]
        options = {**OPTIONS[stage.verb], **stage.with_}
        by_stage[name] = []
        for combo in combos:
            labels = tuple((dim, label) for (dim, _), (label, _) in zip(dims, combo, strict=True))
            values: dict[str, Any] = dict(stage.overrides)
            for _, overrides in combo:
                values.update(overrides)
            inputs = []
            label_map = dict(labels)
            for need in stage.needs:
                matched = _matching(label_map, by_stage[need])
                if not matched:
                    raise PipelineSpecError(
                        f"pipeline spec error: stages.{name}[{'-'.join(label_map.values())}] matches no cell of "
                        f"stage {need!r}: their matrices share dimensions with no common label")
                inputs += [c.id for c in matched]
            try:
                config = config_for(base_tree, values)
            except ConfigError as err:
                raise PipelineSpecError(
                    f"pipeline spec error: stages.{name} {values}: {config_error_detail(err)}") from None
            cell = Cell(stage=name, verb=stage.verb, labels=labels, config=config, options=options,
                        inputs=tuple(inputs), values=values)
            if cell.id in cells:
                raise PipelineSpecError(f"pipeline spec error: stages.{name}: two cells are named {cell.id!r} "
                                        "(matrix labels joined by '-' must differ)")
            cells[cell.id] = cell
            by_stage[name].append(cell)
        _check_options(spec, name, by_stage)
    return Plan(spec=spec, base=base, cells=cells, stage_order=order)


def _check_options(spec: PipelineSpec, name: str, by_stage: dict[str, list[Cell]]) -> None:
    stage = spec.stages[name]
    options = {**OPTIONS[stage.verb], **stage.with_}
    if stage.verb == "tune" and not options["sweep"]:
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a tune stage needs with.sweep (a sweep YAML)")
    if stage.verb == "compare" and options["reference"] is None:
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a compare stage needs with.reference (a label)")
    if stage.verb == "summarize" and not isinstance(options["study"], dict):
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a summarize stage needs with.study (a study; "
                                "avgk study writes it)")
    if stage.verb == "register" and not options["name"]:
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a register stage needs with.name (a model name)")
    cells = {c.id: c for cs in by_stage.values() for c in cs}
    if stage.verb == "prepare":  # two data sets written into one folder would mix
        written: dict[str, Cell] = {}
        for cell in by_stage[name]:
            other = written.setdefault(cell.config.data.shards, cell)
            if other is not cell and other.config.data != cell.config.data:
                raise PipelineSpecError(
                    f"pipeline spec error: {other.id} and {cell.id} write different data sets into one "
                    f"data.shards={cell.config.data.shards!r}: give each its own data.shards")
    for cell in by_stage[name]:
        read = [cells[i] for i in cell.inputs]
        if stage.verb == "compare":
            _check_compare(cell, [c for c in read if c.verb in ("train", "evaluate")])
        if stage.verb == "summarize" and any("method" not in dict(c.labels) for c in read):
            raise PipelineSpecError(f"pipeline spec error: {cell.id} (summarize) needs trained cells with a 'method' "
                                    "matrix dimension")
        if stage.verb in ("evaluate", "pseudolabel") and len([c for c in read if c.verb == "train"]) != 1:
            raise PipelineSpecError(
                f"pipeline spec error: {cell.id} ({stage.verb}) reads one trained run, and its needs give it "
                f"{len([c for c in read if c.verb == 'train'])}: give the stage the train stage's matrix")
        if stage.verb == "register" and len(read) != 1:
            raise PipelineSpecError(
                f"pipeline spec error: {cell.id} (register) registers one model: it needs one compare, or one "
                f"trained run per cell (it reads {len(read)})")


def compare_label(cell: Cell, source: Cell) -> str:
    """How a compare cell names a run it reads: the input's matrix labels that are neither a seed nor
    shared with the compare cell (a compare per regime labels its runs by method alone)."""
    own = dict(cell.labels)
    return "-".join(lab for dim, lab in source.labels if dim != "seed" and dim not in own) or source.name


def _check_compare(cell: Cell, runs: list[Cell]) -> None:
    reference = cell.options["reference"]
    labels = [(compare_label(cell, r), dict(r.labels).get("seed", "")) for r in runs]
    names = sorted({label for label, _ in labels})
    if reference not in names:
        raise PipelineSpecError(f"pipeline spec error: {cell.id}.with.reference={reference!r} is not a label of the "
                                f"runs it compares ({', '.join(names) or 'none'})")
    if len(names) < 2:
        raise PipelineSpecError(f"pipeline spec error: {cell.id} compares runs of one label {names}: it needs two methods")
    twice = sorted({pair for pair in labels if labels.count(pair) > 1})
    if twice:
        raise PipelineSpecError(
            f"pipeline spec error: {cell.id} would compare several runs as {twice[0][0]!r} with seed "
            f"{twice[0][1] or '(none)'}: give it a matrix over the other dimensions, or name the seed dimension 'seed'")
    k = cell.options["k"]
    for run in runs:
        wanted = k if k is not None else run.config.loss.k
        if float(wanted) not in [float(x) for x in run.config.eval.ks]:
            raise PipelineSpecError(f"pipeline spec error: {cell.id}: K={wanted:g} is not among {run.id}'s eval.ks "
                                    f"{run.config.eval.ks}")


# ---------------------------------------------------------------- loading


def _base(path: Path | None, spec: PipelineSpec) -> Config:
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
    try:
        return PipelineSpec.model_validate(tree)
    except ValidationError as err:
        raise PipelineSpecError(f"pipeline spec error: {format_errors(err).replace('.with_', '.with')}") from None


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """The spec at `path`, its base Config and every cell, validated.

    `overrides` (`key=value`) with a Config section's key (train.epochs=1) go to every stage's
    config, after the spec's own overrides; other keys change the spec itself (max_concurrent=1,
    stages.train.matrix.seed.values=[0]).
    """
    file = find_config_file(path)
    tree, config_items = read_plan(file, overrides, kind="pipeline", error=PipelineSpecError)
    try:
        config_overrides = dict(parse_overrides(config_items))
    except ConfigError as err:
        raise PipelineSpecError(str(err)) from None
    spec = parse_spec(tree, source=str(file))
    for key in {**spec.overrides, **config_overrides}:
        _check_keys(key, where="overrides", runner_keys=("run.name",))  # run.storage: where the pipeline folder goes
    base = _base(file, spec)
    try:
        base = config_for(base.to_dict(), {**spec.overrides, **config_overrides})
    except ConfigError as err:
        raise PipelineSpecError(f"pipeline spec error: overrides: {config_error_detail(err)}") from None
    return build_plan(spec, base)
