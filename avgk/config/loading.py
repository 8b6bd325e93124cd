"""Building a Config: YAML files (or the configs shipped with avgk), `key.sub=value` overrides, readable errors, the key list."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from avgk.config.base import ConfigError
from avgk.config.run import Config


def format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif "input" in e and e["type"] not in {"value_error", "assertion_error"}:
            parts.append(f"{loc}={e['input']!r}: {msg}" if loc else msg)
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings -> (key, YAML-parsed value)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote lists as "
                              f"'{key}=[a, b]'") from None
        parsed.append((key.strip(), value))
    return parsed


def build_config(tree: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    tree = copy.deepcopy(tree or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"config error: {format_errors(err)}") from None


def bundled_configs_dir() -> Path | None:
    """The configs/ folder installed with the wheel (<prefix>/share/avgk/configs), if there is one."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        folder = Path(prefix) / "share" / "avgk" / "configs"
        if folder.is_dir():
            return folder
    return None


def find_config_file(path: str | Path) -> Path:
    """`path` when it exists; else the config of that name that ships with avgk, so that the README's
    commands work outside a checkout: `configs/smoke.yaml`, `smoke.yaml` and `smoke` all name the
    installed configs/smoke.yaml (likewise `configs/sweeps/smoke.yaml`). Anything else is returned as given."""
    path = Path(path)
    bundled = bundled_configs_dir()
    if path.exists() or path.is_absolute() or bundled is None:
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    candidate = bundled.joinpath(*parts) if parts else bundled
    if not candidate.suffix:
        candidate = candidate.with_suffix(".yaml")
    return candidate if candidate.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None: the embedded defaults) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = find_config_file(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory: pass a YAML file (e.g. configs/demo.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    return build_config(tree, overrides)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, description) of every config key, in declaration order."""
    model = model or Config
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        assert annotation is not None  # every field of a config section is annotated
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_keys(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        if get_origin(annotation) is Literal:
            kind = "one of " + " | ".join(str(v) for v in get_args(annotation))
        else:
            kind = str(annotation).replace("typing.", "") if get_args(annotation) else annotation.__name__
        rows.append((f"{prefix}{name}", kind, default, field.description or ""))
    return rows
