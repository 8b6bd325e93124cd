"""The only place that talks to torch.distributed: rank queries and sum reductions."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Elementwise sum of `array` over all ranks (the identity on one process).

    Counts and histograms are int64 and stay exact; float sums are reduced in float64.
    """
    if not is_distributed():
        return array
    dtype = torch.int64 if np.issubdtype(array.dtype, np.integer) else torch.float64
    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype).to(_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy().astype(array.dtype, copy=False)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all ranks) concatenated along dim 0, rank order."""
    if not is_distributed():
        return tensor
    device = tensor.device
    local = tensor.contiguous().to(_reduce_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(device)
