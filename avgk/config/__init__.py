"""Typed, self-validating run configuration: YAML files plus `key.sub=value` overrides.

The defaults are the embedded demo (`avgk demo`): 100 synthetic classes, a small CNN,
a few minutes on a 2-core CPU. configs/*.yaml override them for real data sets.
One module per section (data, model and loss, train, eval, run); `loading` builds a Config;
`registry` names every loss, backbone family and data source a config may give.
Layer 2 of avgk: may import avgk.runtime (storage URIs), nothing above it.
Importing this package imports neither torch nor Ray, so a config error answers at once.
"""

from avgk.config.base import ConfigError, Section, flatten
from avgk.config.data import DataConfig, SyntheticConfig
from avgk.config.evaluation import EvalConfig
from avgk.config.loading import (
    build_config,
    bundled_configs_dir,
    config_keys,
    find_config_file,
    format_errors,
    load_config,
    parse_overrides,
    save_config,
)
from avgk.config.model import LossConfig, ModelConfig
from avgk.config.registry import BACKBONES, LOSSES, SOURCES, Registry
from avgk.config.run import Config, RunConfig, TrackingConfig
from avgk.config.train import OPTIMIZER_DEFAULTS, TWO_HEAD_ML_LR_SCALE, LrScaleConfig, TrainConfig

__all__ = [
    "BACKBONES",
    "LOSSES",
    "OPTIMIZER_DEFAULTS",
    "SOURCES",
    "TWO_HEAD_ML_LR_SCALE",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "LrScaleConfig",
    "ModelConfig",
    "Registry",
    "RunConfig",
    "Section",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "build_config",
    "bundled_configs_dir",
    "config_keys",
    "find_config_file",
    "flatten",
    "format_errors",
    "load_config",
    "parse_overrides",
    "save_config",
]
