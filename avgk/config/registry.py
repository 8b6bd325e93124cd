"""Names a config may give for a loss, a backbone family or a data source, and where each one lives.

One pattern for all three. Each registry is a torch-free table, name -> "module:attribute", and that
table is the single source of truth: a config validates its names against it before torch loads,
and `get` imports the module the first time the name is used. A built-in name is one line in a
table below. Code outside avgk adds its own names with the one decorator, `registry.register(name)`,
in a module that an installed package names as an entry point of the registry's group
(`avgk.losses`, `avgk.backbones`, `avgk.sources`): every process that meets an unknown name, a Ray
worker included, imports those modules once before it refuses the name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any


class Registry:
    """Named implementations of one kind, resolved lazily from "module:attribute" paths."""

    def __init__(self, kind: str, *, key: str, table: Mapping[str, str], plugins: str) -> None:
        self.kind = kind
        self.key = key
        """The config key that names an entry (for errors): 'loss.name'."""
        self.plugins = plugins
        """The entry-point group whose modules register names from outside avgk."""
        self._paths: dict[str, str] = dict(table)
        self._loaded: dict[str, Any] = {}
        self._plugins_loaded = False

    def load_plugins(self) -> None:
        """Imports, once, every module installed packages name under the entry-point group `plugins`."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry_point in entry_points(group=self.plugins):
            entry_point.load()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def check(self, name: str) -> str:
        """`name` if it is registered, else ValueError naming the key, the value and every registered name."""
        if name not in self._paths:
            self.load_plugins()
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
            if hasattr(obj, "__qualname__"):  # a class or a function
                where = f"{obj.__module__}:{obj.__qualname__}"
            else:  # an instance (a backbone Family): the module that registered it
                caller = inspect.currentframe()
                module = caller.f_back.f_globals.get("__name__", "?") if caller and caller.f_back else "?"
                where = f"{module}:{name}"
            self._paths[name] = where
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
    plugins="avgk.losses",
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
    plugins="avgk.backbones",
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
    plugins="avgk.sources",
    table={
        "synthetic": "avgk.data.sources.synthetic:from_config",
        "imagefolder": "avgk.data.sources.imagefolder:from_config",
        "plantnet300k": "avgk.data.sources.plantnet300k:from_config",
        "cifar100": "avgk.data.sources.cifar100:from_config",
        "digits": "avgk.data.sources.digits:from_config",
    },
)
"""Source converters for `avgk prepare` (`data.source`): (DataConfig, ConvertOptions) -> Manifest."""
