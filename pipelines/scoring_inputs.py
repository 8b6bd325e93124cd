"""What a scoring job reads before it starts: a run's checkpoint, checked against the shards it will score."""

from __future__ import annotations

import dataclasses

import torch

from avgk.config import Config
from avgk.data.manifest import Manifest, read_manifest
from avgk.method.losses import loss_class
from avgk.records.runs import resolve_checkpoint, run_dir_of, saved_run_config, with_absolute_paths
from avgk.training import checkpoints


@dataclasses.dataclass
class ScoringModel:
    """What a scoring actor needs: the weights, and the config they were trained with."""

    model_state: dict[str, torch.Tensor]
    config: Config
    """The checkpoint's own config: architecture, heads, eval transform, precision and batching."""
    num_classes: int
    uri: str

    @property
    def heads(self) -> tuple[str, ...]:
        return loss_class(self.config.loss.name).heads


def load_scoring_model(uri: str) -> ScoringModel:
    """The model part of a training checkpoint (optimizer and RNG states are dropped)."""
    state = checkpoints.load_checkpoint_file_uri(uri)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{uri} is not an avgk training checkpoint (a dict with 'model' and 'config')")
    return ScoringModel(
        model_state=state["model"],
        config=Config.model_validate(state["config"]),
        num_classes=int(state["num_classes"]),
        uri=uri,
    )


def load_job_inputs(
    config: Config, *, run: str | None, checkpoint: str | None
) -> tuple[Config, str, ScoringModel, Manifest]:
    """Checks the inputs (before any Ray start) and loads the checkpoint: (config, run_dir, model, manifest)."""
    config = with_absolute_paths(config)
    run_dir = run_dir_of(config, run)
    saved = saved_run_config(run_dir)
    default = (saved or config).eval.checkpoint
    uri = resolve_checkpoint(run_dir, checkpoint, default=default)
    scoring = load_scoring_model(uri)
    manifest = read_manifest(config.data.shards)
    if scoring.num_classes != manifest.num_classes:
        raise ValueError(
            f"the checkpoint {uri} has L={scoring.num_classes} classes, the shards at {config.data.shards} have "
            f"{manifest.num_classes}"
        )
    config.validate_num_classes(manifest.num_classes)
    return config, run_dir, scoring, manifest
