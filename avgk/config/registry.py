"""Names a config may give for a loss, a backbone family or a data source, and where each one lives.

One pattern for all three. Each registry is a torch-free table, name -> "module:attribute", and that
table is the single source of truth: a config validates its names against it before torch loads,
and `get` imports the module the first time the name is used. A built-in name is one line in a
table below. Code outside avgk adds its own names with the one decorator, `registry.register(name)`,
in a module imported before the config that names them is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


class Registry:
    """Named implementations of one kind, resolved lazily from "module:attribute" paths."""

    def __init__(self, kind: str, *, key: str, table: Mapping[str, str]) -> None:
        self.kind = kind
        self.key = key
        """The config key that names an entry (for errors): 'loss.name'."""
        self._paths: dict[str, str] = dict(table)
        self._loaded: dict[str, Any] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def check(self, name: str) -> str:
        """`name` if it is registered, else ValueError naming the key, the value and every registered name."""
        if name not in self._paths:
            raise ValueError(f"{self.key}={name!r} is not a registered {self.kind}; registered: {', '.join(self.names)}")
        return name

    def path(self, name: str) -> str:
        """Where the entry lives: 'module:attribute'."""
        return self._paths[self.check(name)]

    def get(self, name: str) -> Any:
        """The registered object, its module imported on first use."""
        if name not in self._loaded:
            module, _, attribute = self.path(name).partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator adding `name` for the decorated object; ValueError if the name is taken."""

        def add(obj: Any) -> Any:
            if name in self._paths:
                raise ValueError(f"{self.kind} {name!r} is registered already, by {self._paths[name]}")
            self._paths[name] = f"{obj.__module__}:{getattr(obj, '__qualname__', name)}"
            self._loaded[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Removes a name added by `register` (tests; built-in names stay)."""
        self._paths.pop(name, None)
        self._loaded.pop(name, None)


LOSSES = Registry(
    "loss",
    key="loss.name",
    table={
        "two_head": "avgk.method.losses.two_head:TwoHeadLoss",
        "ce": "avgk.method.losses.two_head:CrossEntropyLoss",
        "an": "avgk.method.losses.baselines:AnLoss",
        "an_ls": "avgk.method.losses.baselines:AnLsLoss",
        "wan": "avgk.method.losses.baselines:WanLoss",
        "epr": "avgk.method.losses.baselines:EprLoss",
        "role": "avgk.method.losses.role:RoleLoss",
        "em": "avgk.method.losses.baselines:EmLoss",
        "em_apl": "avgk.method.losses.baselines:EmAplLoss",
    },
)
"""Training losses (`loss.name`): classes deriving from avgk.method.losses.Loss."""

BACKBONES = Registry(
    "backbone family",
    key="model.backbone",
    table={
        "small_cnn": "avgk.models.backbones:SMALL_CNN",
        "timm": "avgk.models.backbones:TIMM",
        "torchvision": "avgk.models.backbones:TORCHVISION",
    },
)
"""Backbone families (the part of `model.backbone` before ':'): avgk.models.backbones.Family objects."""

SOURCES = Registry(
    "data source",
    key="data.source",
    table={
        "synthetic": "avgk.data.sources.synthetic:from_config",
        "imagefolder": "avgk.data.sources.imagefolder:from_config",
        "plantnet300k": "avgk.data.sources.plantnet300k:from_config",
        "cifar100": "avgk.data.sources.cifar100:from_config",
    },
)
"""Source converters for `avgk prepare` (`data.source`): (DataConfig, ConvertOptions) -> Manifest."""
