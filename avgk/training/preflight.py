"""Checks a run must pass before any work starts: data written, Ray started or an MLflow run opened
(the config against the prepared data is avgk.data.prepare.check_data).

Everything here runs on the driver in well under a second and raises a ConfigError whose one
line names the key, the value and the rule; the same problems found on a Ray worker would cost
a cluster start-up, a run folder and a FAILED MLflow run each.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from avgk.config import Config, ConfigError


def check_backbone(name: str) -> None:
    """A registered family and an architecture its library knows (avgk.models.backbones), as a ConfigError."""
    from avgk.models import backbones

    try:
        backbones.check(name)
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None


def check_reachable(uri: str, *, timeout: float = 10.0) -> None:
    """An http(s) tracking server must accept a connection within `timeout` s (local stores always pass)."""
    parsed = urlparse(uri)
    if parsed.scheme not in {"http", "https"}:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ConfigError(f"tracking error: the MLflow server at tracking.uri={uri!r} is not reachable ({reason}): "
                          "start it, fix tracking.uri, or set tracking.enabled=false") from None


def check_storage(storage: str) -> None:
    """A local run.storage must be creatable: no file where a folder of its path must be."""
    if "://" in storage:
        return
    for folder in (Path(storage), *Path(storage).parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"config error: run.storage={storage!r} is under {str(folder)!r}, a file: "
                                  "run.storage must be a folder (or a path where one can be made)")
            return


def check_pretrained(config: Config) -> None:
    """model.pretrained exists, is a weights file and fits the backbone: built once here, on the
    driver, instead of failing on every worker after the cluster started."""
    if not config.model.pretrained:
        return
    from avgk.models.networks import build_backbone  # imports torch: only when there are weights to check

    try:
        build_backbone(config.model)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config error: {str(err).strip().splitlines()[0]}") from None


def require_gpus(config: Config, *, found: float, where: str) -> None:
    """train.use_gpu=true needs one GPU per training worker; `where` says whose GPUs `found` counts."""
    if config.train.use_gpu and found < config.train.num_workers:
        raise ConfigError(
            f"config error: train.use_gpu=true with train.num_workers={config.train.num_workers} needs that many GPUs, "
            f"{where} {found:g}: set train.use_gpu=false, or run on a cluster with GPUs"
        )


def check_local_gpus(config: Config) -> None:
    """train.use_gpu on a local cluster (no RAY_ADDRESS): the GPUs must be on this machine, found
    at once rather than after Ray started and waited for them."""
    if not config.train.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    require_gpus(config, found=torch.cuda.device_count(), where="RAY_ADDRESS names no cluster and this machine has")


def check_before_start(config: Config, *, resume: bool = True) -> None:
    """The checks that need neither data nor Ray: a stale run directory (`resume`), the backbone and
    its weights, the run storage, local GPUs, the tracking server.

    `config` with absolute paths (avgk.records.runs.with_absolute_paths), as the run will write them.
    """
    from avgk.records import tracking
    from avgk.records.runs import check_resume

    check_storage(config.run.storage)
    if resume:
        check_resume(config)
    check_backbone(config.model.backbone)
    check_pretrained(config)
    check_local_gpus(config)
    if config.tracking.enabled:
        check_reachable(tracking.tracking_uri(config))
