"""Data sources by name: `avgk prepare` converts `data.source` with the converter registered under it.

A new source is one function `(data: DataConfig, options: ConvertOptions) -> Manifest` decorated with
`@register_source("<name>")` in a module of this package, and its name in avgk.config.SOURCE_NAMES
(configs validate without importing the converters; registering a name missing there fails at import).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from avgk.config import SOURCE_NAMES, DataConfig

if TYPE_CHECKING:
    from avgk.data.manifest import Manifest  # noqa: F401  (named in Converter)
    from avgk.data.sources.common import ConvertOptions  # noqa: F401

Converter = Callable[[DataConfig, "ConvertOptions"], "Manifest"]
SOURCES: dict[str, Converter] = {}


def register_source(name: str) -> Callable[[Converter], Converter]:
    def register(converter: Converter) -> Converter:
        if name not in SOURCE_NAMES:
            raise ValueError(f"source {name!r} is not in avgk.config.SOURCE_NAMES {SOURCE_NAMES}: add it there")
        if name in SOURCES:
            raise ValueError(f"source {name!r} is registered twice")
        SOURCES[name] = converter
        return converter

    return register


def converter_for(name: str) -> Converter:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"data.source={name!r} has no converter; known: {', '.join(sorted(SOURCES))}") from None
