"""Process-group plumbing. Everything here also works on one process without torchrun (then it is a no-op)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_true(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise AND of boolean flags over processes, in a single all-reduce."""
    if not is_active():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v > 0.5) for v in t.tolist()]


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    # NCCL reduces CUDA tensors only: logging statistics live on the CPU, so they travel through the GPU there
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    out = values.to(device).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (for logging; every rank calls it)."""
    if not is_active():
        return values
    return _all_reduce_sum(values) / dist.get_world_size()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over processes (every rank calls it)."""
    if not is_active():
        return values
    return _all_reduce_sum(values)


def gather_objects(obj):
    """List of ``obj`` from every rank (on every rank)."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params) -> None:
    """All-reduce the gradients of ``params`` to their mean over processes (what DDP does), in one flat buffer.

    Every process calls it with the same parameters, so the collective is never rank-divergent; a parameter without
    a gradient on this process contributes zeros.
    """
    if not is_active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
