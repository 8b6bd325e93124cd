"""Typed hyper-parameter sweep configuration: a base run config, a search space over its keys, a scheduler.

No Ray here (avgk/ stays Ray-free): the search space is plain data; pipelines/tune.py turns it into
ray.tune domains. Every searched key is checked against Config before anything starts: the sampled
values of each domain (bounds, every choice) are put into the base config and validated, so a typo
(`loss.ml_wieght`) or an out-of-range bound fails with one line naming the key, the value and the rule.

    sweep YAML                                   meaning
    name: smoke-sweep                            <run.storage>/<name>/ and the MLflow parent run
    base: ../smoke.yaml                          relative to the sweep file, else to the cwd
    overrides: {train.epochs: 3}                 fixed changes to the base config
    space:
      train.lr: {loguniform: [0.001, 0.1]}       any Config key, dotted
      loss.pseudo_k: {choice: [1.5, 2, 3]}
      loss.ml_weight: {grid: [0.5, 2]}           every value, crossed with num_samples
    num_samples: 4
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from avgk.config import Config, ConfigError, Section, build_config, find_config_file, format_errors, load_config

# domain name -> (number of bounds, integer-valued)
RANGE_DOMAINS: dict[str, tuple[int, bool]] = {
    "uniform": (2, False),
    "loguniform": (2, False),
    "quniform": (3, False),  # [low, high, q]
    "qloguniform": (3, False),
    "randint": (2, True),  # [low, high): high excluded, as in ray.tune.randint
    "lograndint": (2, True),
}
LIST_DOMAINS = ("choice", "grid")
DOMAINS = (*LIST_DOMAINS, *RANGE_DOMAINS)


class SweepConfigError(ConfigError):
    """A sweep configuration problem: the key, the value and the rule."""


class Domain(Section):
    """One searched key: exactly one of the domain kinds, e.g. {loguniform: [0.1, 10]}."""

    kind: Literal["choice", "grid", "uniform", "loguniform", "quniform", "qloguniform", "randint", "lograndint"]
    values: list[Any] = Field(min_length=1, description="the options (choice, grid) or [low, high(, q)]")

    @model_validator(mode="after")
    def _check(self) -> Domain:
        if self.kind in LIST_DOMAINS:
            return self
        size, integer = RANGE_DOMAINS[self.kind]
        spec = f"{self.kind}: [low, high{', q' if size == 3 else ''}]"
        if len(self.values) != size or not all(_is_number(v) for v in self.values):
            raise ValueError(f"{spec} needs {size} numbers, got {self.values}")
        low, high = self.values[0], self.values[1]
        if integer and not all(float(v).is_integer() for v in self.values):
            raise ValueError(f"{spec} needs integers, got {self.values}")
        if not low < high:
            raise ValueError(f"{spec} needs low < high, got {self.values}")
        if self.kind.startswith(("log", "qlog")) and low <= 0:
            raise ValueError(f"{spec} needs low > 0, got {self.values}")
        if size == 3 and not self.values[2] > 0:
            raise ValueError(f"{spec} needs q > 0, got {self.values}")
        return self

    def probe_values(self) -> list[Any]:
        """Values this domain can produce that are worth validating: every option, or both bounds."""
        if self.kind in LIST_DOMAINS:
            return list(self.values)
        low, high = self.values[0], self.values[1]
        if self.kind in ("randint", "lograndint"):
            return [int(low), int(high) - 1]
        if self.kind in ("quniform", "qloguniform"):
            q = self.values[2]
            return [_quantize(low, q, low), _quantize(high, q, low)]
        return [float(low), float(high), float(math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _quantize(value: float, q: float, low: float) -> float:
    # ray.tune rounds samples to a multiple of q.
    return max(round(value / q) * q, low)


class SchedulerConfig(Section):
    """Trial scheduling: ASHA early stopping on the validation metric, or FIFO (none)."""

    name: Literal["asha", "fifo", "none"] = Field("asha", description="asha, or fifo/none (every trial runs to the end)")
    metric: str = Field("val_avg_k_accuracy", description="reported metric that ranks trials (also picks the best)")
    mode: Literal["max", "min"] = "max"
    time_attr: Literal["epoch", "training_iteration"] = Field(
        "epoch", description="ASHA time unit; epoch survives a resumed trial, training_iteration restarts at 1"
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: last rung bound; default: train.epochs of the base config")


class SweepConfig(Section):
    """A hyper-parameter sweep: one TorchTrainer per trial, a parent MLflow run, the best trial evaluated on test."""

    name: str = Field(min_length=1, description="sweep name: <run.storage>/<name>/ and the MLflow parent run")
    base: str = Field(description="base run config YAML, relative to the sweep file (else to the cwd)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, fixed for every trial")
    space: dict[str, Domain] = Field(min_length=1, description="dotted Config key -> domain")
    num_samples: int = Field(1, ge=1, description="samples of the space (grid domains multiply this)")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once; default (and upper bound): as many as the cluster's CPUs/GPUs fit"
    )
    trial_cpus: float = Field(
        1.0, gt=0, description="CPUs of a trial's driver function (its Train workers' CPUs come from train.*)"
    )
    seed: int | None = Field(0, description="seed of the random search (None: unseeded)")
    evaluate_best: bool = Field(True, description="evaluate the best trial on test with the evaluation job")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if "/" in name or name in {".", ".."}:
            raise ValueError(f"name must be a plain folder name, got {name!r}")
        return name

    @field_validator("space", mode="before")
    @classmethod
    def _space(cls, space: Any) -> Any:
        if not isinstance(space, dict):
            return space
        out = {}
        for key, spec in space.items():
            if isinstance(spec, Domain):
                out[key] = spec
                continue
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
                raise ValueError(
                    f"space[{key!r}] must be a mapping with exactly one of {', '.join(DOMAINS)} "
                    f"(e.g. {{loguniform: [0.1, 10]}}), got {spec!r}"
                )
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list):
                raise ValueError(f"space[{key!r}].{kind} must be a list, got {values!r}")
            try:
                out[key] = Domain(kind=kind, values=values)
            except ValidationError as err:
                raise ValueError(f"space[{key!r}]: {format_errors(err)}") from None
        return out

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        both = sorted(set(self.space) & set(self.overrides))
        if both:
            raise ValueError(f"keys both searched and fixed in overrides: {both}")
        return self

    def flat(self) -> dict[str, Any]:
        """sweep.* params for the MLflow parent run."""
        out = {f"sweep.{k}": v for k, v in self.model_dump(mode="json", exclude={"space", "overrides"}).items()
               if not isinstance(v, dict)}
        out.update({f"sweep.scheduler.{k}": v for k, v in self.scheduler.model_dump(mode="json").items()})
        out.update({f"sweep.space.{k}": f"{d.kind}{d.values}" for k, d in self.space.items()})
        out.update({f"sweep.overrides.{k}": v for k, v in self.overrides.items()})
        return out


# ---------------------------------------------------------------- keys and values against Config


def check_key(key: str) -> None:
    """A dotted key must name a Config field (not a section); near misses are suggested."""
    model: type[BaseModel] | None = Config
    for part in key.split("."):
        if model is None:  # inside a dict-valued field (train.extra_resources.<name>): any name goes
            return
        field = model.model_fields.get(part)
        if field is None:
            known = sorted(Config().flat())
            suggestion = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {suggestion[0]!r}?" if suggestion else ""
            raise SweepConfigError(f"sweep config error: unknown config key {key!r}{hint}")
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None:
        raise SweepConfigError(f"sweep config error: {key!r} is a config section, not a key")


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config tree with dotted keys set to values (no YAML re-parsing: types are kept)."""
    tree = copy.deepcopy(tree)
    for dotted, value in values.items():
        node = tree
        *sections, leaf = dotted.split(".")
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                raise SweepConfigError(f"sweep config error: {dotted!r}: {section!r} is not a section")
            node = child
        node[leaf] = value
    return tree


def config_for(tree: dict[str, Any], values: dict[str, Any]) -> Config:
    """The Config of one trial: the base tree with these (sampled) values."""
    return build_config(with_values(tree, values))


def validate_space(sweep: SweepConfig, base_tree: dict[str, Any]) -> None:
    """Every searched key exists, and every probe value of each domain makes a valid Config.

    Each key's probes are tried with the other keys at their first probe value, then every key at
    its last probe together: enough to catch typos, wrong types and out-of-range bounds.
    """
    for key in sweep.space:
        check_key(key)
    firsts = {key: domain.probe_values()[0] for key, domain in sweep.space.items()}
    lasts = {key: domain.probe_values()[-1] for key, domain in sweep.space.items()}
    for key, domain in sweep.space.items():
        for value in domain.probe_values():
            _try(base_tree, {**firsts, key: value}, key=key, value=value, domain=domain)
    try:
        config_for(base_tree, lasts)
    except ConfigError as err:
        raise SweepConfigError(f"sweep config error: space values {lasts} together: {config_error_detail(err)}") from None


def _try(tree: dict[str, Any], values: dict[str, Any], *, key: str, value: Any, domain: Domain) -> None:
    try:
        config_for(tree, values)
    except ConfigError as err:
        raise SweepConfigError(
            f"sweep config error: space[{key!r}] = {value!r} (from {domain.kind} {domain.values}): {config_error_detail(err)}"
        ) from None


def config_error_detail(err: ConfigError) -> str:
    """A ConfigError's message without its "config error: " prefix, to follow a sweep's or study's own."""
    return str(err).removeprefix("config error: ")


# ---------------------------------------------------------------- loading


def _parse_value(raw: str) -> Any:
    return yaml.safe_load(raw) if raw.strip() else None


# ---------------------------------------------------------------- files that name a base config (sweeps, studies)


def read_plan(path: Path, overrides: list[str] | None, *, kind: str, error: type[ConfigError]
              ) -> tuple[dict[str, Any], list[str]]:
    """A sweep or study YAML as a tree with its own overrides applied, and the base-config overrides.

    `overrides` (`key=value`) go to the base config when the key starts with a Config section
    (data., train., run., ...), else into the file's own tree (num_samples=2, seeds=[0]).
    """
    if path.is_dir():
        raise error(f"{kind} config file {str(path)!r} is a directory: pass a YAML file")
    if not path.is_file():
        raise error(f"{kind} config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{kind} config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise error(f"{kind} config file {str(path)!r} must hold a mapping, got {type(tree).__name__}")
    # YAML anchors (&methods ... *methods) share one object, and deepcopy keeps the sharing: a copy per
    # use, so that an override of one place (one pipeline stage's matrix) does not change the others
    tree = json.loads(json.dumps(tree, default=str))
    sections = set(Config.model_fields)
    base_overrides: list[str] = []
    own_values: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise error(f"override {item!r} must look like key.sub=value")
        if key.split(".")[0] in sections:
            base_overrides.append(item)
        else:
            own_values[key] = _parse_value(raw)
    return with_values(tree, own_values), base_overrides


def resolve_base(path: Path, base: str, file_overrides: dict[str, Any], cli_overrides: list[str], *,
                 kind: str, error: type[ConfigError]) -> Config:
    """The base Config a sweep or study names: its YAML, then the file's overrides, then the command line's."""
    base_path = path.parent / base
    if not base_path.is_file() and Path(base).is_file():
        base_path = Path(base)
    if not base_path.is_file():
        raise error(f"{kind} config error: base={base!r} is neither relative to {str(path.parent)!r} nor to the cwd")
    for key in file_overrides:
        try:
            check_key(key)
        except ConfigError as err:
            raise error(str(err).replace("sweep config error", f"{kind} config error")) from None
    config = load_config(base_path)
    try:
        config = config_for(config.to_dict(), file_overrides)
    except ConfigError as err:
        raise error(f"{kind} config error: overrides {file_overrides}: {config_error_detail(err)}") from None
    # The command line's config keys win over the file's overrides.
    return build_config(config.to_dict(), cli_overrides)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    """The sweep config and its resolved base Config, both validated (the search space included).

    `overrides` (`key=value`) go to the base config when the key starts with a Config section
    (data., train., run., ...), else to the sweep itself (num_samples=2, scheduler.name=fifo).
    """
    path = find_config_file(path)
    tree, base_overrides = read_plan(path, overrides, kind="sweep", error=SweepConfigError)
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as err:
        # The space validator names the key itself: "space[...]", not "space: space[...]".
        message = format_errors(err).replace("space: space[", "space[")
        raise SweepConfigError(f"sweep config error: {message}") from None
    base = resolve_base(path, sweep.base, sweep.overrides, base_overrides, kind="sweep", error=SweepConfigError)
    validate_space(sweep, base.to_dict())
    return sweep, base
