"""torch.distributed's rendezvous store on the node's own address, not on every interface.

Ray Train's TorchConfig lets rank 0's `init_process_group` start the TCPStore server, and torch
binds that server to the wildcard address whatever host it is given: during training rank 0 listened
on `*:<port>`, reachable from any network the node is on, while everything else (Ray, Gloo, MLflow)
listens on the node's address (127.0.0.1 locally). Here rank 0 binds a socket to its node's address
itself and hands it to the TCPStore server (`master_listen_fd`); every rank, rank 0 included, then
joins as a client (torch's `TORCHELASTIC_USE_AGENT_STORE` contract: the server at
MASTER_ADDR:MASTER_PORT is already there).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import ray
from ray.train.backend import BackendConfig
from ray.train.torch.config import TorchConfig

from pipelines.ray_private import (
    TorchBackend,
    is_v1_worker_group,
    set_torch_distributed_env_vars,
    setup_torch_process_group,
)

if TYPE_CHECKING:
    from pipelines.ray_private import BaseWorkerGroup

_SERVED: dict[str, object] = {}
"""The rank-0 worker's store server and its socket: alive as long as the worker group."""


def _serve_store(*, world_size: int, timeout_s: int) -> tuple[str, int]:
    """On rank 0: a TCPStore server listening on this node's address only; (address, port)."""
    from torch.distributed import TCPStore

    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(max(128, world_size))
    port = listener.getsockname()[1]
    store = TCPStore(address, port, world_size, is_master=True, master_listen_fd=listener.fileno(),
                     wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    _SERVED.update(store=store, socket=listener)
    return address, port


def _join_store(*, address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"


def _stop_store() -> None:
    _SERVED.clear()


class _OwnAddressBackend(TorchBackend):
    def on_start(self, worker_group: BaseWorkerGroup, backend_config: BackendConfig) -> None:
        torch_config = cast(TorchConfig, backend_config)  # OwnAddressTorchConfig's: backend_cls is this class
        world_size = len(worker_group)
        address, port = worker_group.execute_single(0, _serve_store, world_size=world_size,
                                                    timeout_s=torch_config.timeout_s)
        worker_group.execute(_join_store, address=address, port=port)
        if not is_v1_worker_group(worker_group):  # as Ray's own backend: LOCAL_RANK and the rest
            worker_group.execute(set_torch_distributed_env_vars)
        ray.get([  # type: ignore[arg-type]  # ray.types.ObjectRef, Ray's typing stand-in, is not ray.get's ObjectRef
            worker_group.execute_single_async(i, setup_torch_process_group, backend=torch_config.backend,
                                              world_rank=i, world_size=world_size, init_method="env://",
                                              timeout_s=torch_config.timeout_s)
            for i in range(world_size)
        ])

    def on_shutdown(self, worker_group: BaseWorkerGroup, backend_config: BackendConfig) -> None:
        super().on_shutdown(worker_group, backend_config)
        worker_group.execute_single(0, _stop_store)


@dataclass
class OwnAddressTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store listens on the node's address (127.0.0.1 locally)."""

    @property
    def backend_cls(self) -> type[_OwnAddressBackend]:
        return _OwnAddressBackend
