"""A pipeline spec expanded into its graph: every cell's Config (validated), its options and inputs, in
dependency order, and the checks that need the cells (a compare's labels, a scoring stage's one run).

avgk.experiments.pipeline_spec holds the spec's typed model and its verbs; load_pipeline reads a spec
file and returns the Plan that pipelines/pipeline.py walks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avgk.config import Config, ConfigError, find_config_file, parse_overrides
from avgk.experiments.pipeline_spec import (
    INPUTS,
    NAME_PATTERN,
    OPTIONS,
    Dimension,
    PipelineSpec,
    PipelineSpecError,
    StageSpec,
    base_config,
    check_spec_key,
    parse_spec,
)
from avgk.experiments.sweep_config import config_error_detail, config_for, read_plan


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
    if not NAME_PATTERN.match(text):
        raise PipelineSpecError(f"pipeline spec error: matrix value {value!r} cannot name a cell (letters, digits, _ . + -)")
    return text


def _dimension_cells(dim: str, entry: dict[str, dict[str, Any]] | Dimension, stage: str) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(entry, Dimension):
        check_spec_key(entry.key, where=f"stages.{stage}.matrix.{dim}.key")
        return [(_label(v), {entry.key: v}) for v in entry.values]
    if not entry:
        raise PipelineSpecError(f"pipeline spec error: stages.{stage}.matrix.{dim} has no labels")
    out = []
    for label, overrides in entry.items():
        _label(label)
        for key in overrides or {}:
            if not key.startswith(WITH_PREFIX):  # the verb's options: checked with the stage's own
                check_spec_key(key, where=f"stages.{stage}.matrix.{dim}.{label}")
        out.append((label, dict(overrides or {})))
    return out


WITH_PREFIX = "with."
"""A matrix label's key that sets the verb's option of its cells rather than a config key."""


def _split_options(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A cell's matrix values as (config overrides, verb options set by `with.` keys)."""
    config = {k: v for k, v in values.items() if not k.startswith(WITH_PREFIX)}
    options = {k.removeprefix(WITH_PREFIX): v for k, v in values.items() if k.startswith(WITH_PREFIX)}
    return config, options


def _excluded(stage: str, spec: StageSpec, dims: list[tuple[str, list[tuple[str, dict[str, Any]]]]]
              ) -> list[dict[str, set[str]]]:
    """The stage's exclude entries as {dimension: labels}, each checked against its matrix."""
    labels = {dim: [label for label, _ in choices] for dim, choices in dims}
    rules = []
    for n, entry in enumerate(spec.exclude):
        if not entry:
            raise PipelineSpecError(f"pipeline spec error: stages.{stage}.exclude[{n}] is empty: name a dimension")
        rule = {}
        for dim, wanted in entry.items():
            if dim not in labels:
                raise PipelineSpecError(f"pipeline spec error: stages.{stage}.exclude[{n}] names dimension {dim!r}, "
                                        f"not one of its matrix ({', '.join(labels) or 'none'})")
            values = {str(v) for v in (wanted if isinstance(wanted, list) else [wanted])}
            unknown = sorted(values - set(labels[dim]))
            if unknown:
                raise PipelineSpecError(f"pipeline spec error: stages.{stage}.exclude[{n}].{dim}: {unknown} are not "
                                        f"labels of that dimension ({', '.join(labels[dim])})")
            rule[dim] = values
        rules.append(rule)
    return rules


def stage_order(spec: PipelineSpec) -> list[str]:
    """The stages so that each follows the ones it needs; an unknown need or a cycle is an error."""
    for name, stage in spec.stages.items():
        if not NAME_PATTERN.match(name):
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
            check_spec_key(key, where=f"stages.{name}.overrides")
        dims = [(dim, _dimension_cells(dim, entry, name)) for dim, entry in stage.matrix.items()]
        combos = itertools.product(*(choices for _, choices in dims)) if dims else [()]
        excluded = _excluded(name, stage, dims)
        by_stage[name] = []
        for combo in combos:
            labels = tuple((dim, label) for (dim, _), (label, _) in zip(dims, combo, strict=True))
            if any(all(dict(labels)[dim] in wanted for dim, wanted in rule.items()) for rule in excluded):
                continue
            values: dict[str, Any] = dict(stage.overrides)
            for _, overrides in combo:
                values.update(overrides)
            values, own_options = _split_options(values)
            unknown = sorted(set(own_options) - set(OPTIONS[stage.verb]))
            if unknown:
                allowed = ", ".join(OPTIONS[stage.verb]) or "none"
                raise PipelineSpecError(f"pipeline spec error: stages.{name}.matrix sets with.{unknown[0]}, not an "
                                        f"option of verb {stage.verb!r} (its options: {allowed})")
            options = {**OPTIONS[stage.verb], **stage.with_, **own_options}
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
        if not by_stage[name]:
            raise PipelineSpecError(f"pipeline spec error: stages.{name}.exclude leaves no cell of its matrix")
        _check_options(spec, name, by_stage)
    return Plan(spec=spec, base=base, cells=cells, stage_order=order)


def _check_options(spec: PipelineSpec, name: str, by_stage: dict[str, list[Cell]]) -> None:
    stage = spec.stages[name]
    options = {**OPTIONS[stage.verb], **stage.with_}
    if stage.verb == "tune" and not all(cell.options["sweep"] for cell in by_stage[name]):
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a tune stage needs with.sweep (a sweep YAML), "
                                "in its with: or in each matrix label's with.sweep")
    if stage.verb == "compare" and options["reference"] is None:
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a compare stage needs with.reference (a label)")
    if stage.verb == "summarize" and not isinstance(options["study"], dict):
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a summarize stage needs with.study (a study; "
                                "avgk study writes it)")
    if stage.verb == "predict" and not (isinstance(options["inputs"], list) and options["inputs"]
                                        and all(isinstance(i, str) for i in options["inputs"])):
        raise PipelineSpecError(f"pipeline spec error: stages.{name}: a predict stage needs with.inputs, a list of "
                                f"files, folders, bucket prefixes or one shard set, got {options['inputs']!r}")
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
        if stage.verb == "train" and len([c for c in read if c.verb == "train"]) > 1:
            raise PipelineSpecError(
                f"pipeline spec error: {cell.id} starts from one trained run (model.pretrained), and its needs give it "
                f"{len([c for c in read if c.verb == 'train'])}: give the needed train stage one cell, or the same matrix")
        if stage.verb == "predict" and len(read) != 1:
            raise PipelineSpecError(
                f"pipeline spec error: {cell.id} (predict) labels with one model: it needs one compare, or one "
                f"trained run per cell (it reads {len(read)})")
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
        check_spec_key(key, where="overrides", runner_keys=("run.name",))  # run.storage: where the pipeline folder goes
    base = base_config(file, spec)
    try:
        base = config_for(base.to_dict(), {**spec.overrides, **config_overrides})
    except ConfigError as err:
        raise PipelineSpecError(f"pipeline spec error: overrides: {config_error_detail(err)}") from None
    return build_plan(spec, base)
