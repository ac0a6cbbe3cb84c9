"""Process-group set-up from torchrun / accelerate environment, and the named mesh.

`init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and by
`accelerate launch`) and starts gloo on the CPU or nccl on CUDA; with none set it is a
single process. `ParallelDims` says how the world splits into data-parallel replicas,
FSDP shards, pair groups and context-parallel groups, and `build_mesh` makes the
matching `DeviceMesh` with dimension names `dp_replicate`, `dp_shard`, `pair`, `cp`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

logger = logging.getLogger(__name__)

MESH_DIMS = ("dp_replicate", "dp_shard", "pair", "cp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Start the default process group if the launcher asked for one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # A group someone else started on gloo keeps this process on the CPU.
    on_gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    if torch.cuda.is_available() and not on_gloo:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("process group: %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_and_world() -> tuple[int, int]:
    return rank(), world_size()


def is_main_process() -> bool:
    return rank() == 0


def rank_share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s items when `items` is dealt round-robin over `world` ranks
    (`items[rank::world]`): every item goes to exactly one rank, and shares differ in
    length by at most one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    return list(items[rank::world])


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live for a collective on `group`: the current CUDA device
    under NCCL, the CPU under gloo (or with no process group)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_values(
    values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """`values` reduced over `group`, on the device they came from; NCCL needs them on
    the GPU, so bookkeeping tensors made on the CPU travel there and back."""
    if not dist.is_initialized():
        return values
    t = values.to(collective_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.to(values.device)


def global_sum(value: float) -> float:
    """`value` summed over all ranks (float64, so counts stay exact)."""
    return float(all_reduce_values(torch.tensor([float(value)], dtype=torch.float64)).item())


def global_max(value: float) -> float:
    """The largest `value` over all ranks."""
    flag = torch.tensor([float(value)], dtype=torch.float64)
    return float(all_reduce_values(flag, op=dist.ReduceOp.MAX).item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return global_max(1.0 if flag else 0.0) > 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class ParallelDims:
    """How the ranks are laid out. `dp_shard=-1` takes whatever the others leave."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    pair: int = 1

    def resolve(self, world: int) -> ParallelDims:
        for name in ("dp_replicate", "cp", "pair"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.pair not in (1, 2):
            raise ValueError(f"parallel.pair must be 1 or 2 (a pair has two samples), got {self.pair}")
        rest = self.dp_replicate * self.cp * self.pair
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world % rest:
                raise ValueError(
                    f"world size {world} is not divisible by dp_replicate*cp*pair = "
                    f"{self.dp_replicate}*{self.cp}*{self.pair} = {rest}"
                )
            dp_shard = world // rest
        if dp_shard < 1 or dp_shard * rest != world:
            raise ValueError(
                f"dp_replicate*dp_shard*pair*cp = {self.dp_replicate}*{dp_shard}*{self.pair}*"
                f"{self.cp} = {dp_shard * rest} does not equal the world size {world}"
            )
        return ParallelDims(self.dp_replicate, dp_shard, self.cp, self.pair)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}


def build_mesh(dims: ParallelDims, device_type: str | None = None) -> DeviceMesh:
    """A 4-D named mesh (dp_replicate, dp_shard, pair, cp) over the whole world.

    Every dimension is present, size 1 or not, so callers can always ask for
    `mesh["cp"]` or flatten `("dp_replicate", "dp_shard", "pair")` for gradient
    reduction. The innermost dimension is cp: its ranks are neighbours, which is
    where fast links are on a real node.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dims = dims.resolve(world_size())
    sizes = tuple(dims.sizes[name] for name in MESH_DIMS)
    return init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
