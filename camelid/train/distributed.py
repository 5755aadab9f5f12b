"""torchrun support: one process per device, DDP or FSDP2 (`fully_shard`), with no change to the model.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address); we only read them. Without
them (or with WORLD_SIZE=1) everything here is a no-op and training runs in one plain process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from camelid.errors import CamelidError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CamelidError("device cuda was asked for but no CUDA GPU is visible; use device=cpu")
        return torch.device("cuda", local_rank if name == "cuda" else torch.device(name).index)
    return torch.device(name)


def setup(device: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the run (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wrap(model: nn.Module, mode: str, info: DistInfo, blocks: nn.ModuleList | None = None) -> nn.Module:
    """DDP: a full replica per process, gradients all-reduced. FSDP2: parameters sharded per block (`blocks`)
    and gathered just in time. Both wrap from the outside; the model class never knows."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in blocks if blocks is not None else []:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root holds the embedding, final norm and (tied) output head
    return model


def all_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over processes (gloo has no AVG, so SUM then divide)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
