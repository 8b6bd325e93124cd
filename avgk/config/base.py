"""What every config section shares: the error type, strict sections, and dotted-key flattening."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, phrased for a person: the key, the value and the rule."""


class Section(BaseModel):
    # Unknown keys are errors (a mistyped key must fail, not be silently ignored);
    # assignment is validated so overrides applied after load obey the same rules.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
