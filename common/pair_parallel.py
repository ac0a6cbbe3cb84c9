"""Pair parallelism: the two samples of a preference pair on two ranks.

In a pair group of 2 ranks (mesh dimension `pair` of `common.distributed.build_mesh`),
pair rank 0 runs the preferred sample and pair rank 1 the rejected one, each through
the policy and the reference model, so each rank holds the activations of one video.
Only the per-sample errors cross ranks: `gather_pair_errors` all-gathers them with
autograd, both ranks compute the same DPO loss, and each rank's backward reaches its
own sample. With pair size 1 the same calls run both samples in one batch.

Both ranks of a pair, and all cp ranks of each, must draw the same timestep and noise;
the trainer seeds its generators per data-parallel rank, which those ranks share.

Gradient convention (shared with `common.context_parallel`): every rank's gradient is
its share, the share of its sample (pair) and of its tokens (cp). The gradient of the
loss is the SUM over pair and cp and the MEAN over data-parallel ranks:
- without FSDP: `reduce_gradients(model.parameters(), mesh)` after backward;
- with FSDP2: shard over `fsdp_mesh(mesh)` (dp_shard x pair x cp flattened), then call
  `set_fsdp_gradient_reduction(model, mesh)`: FSDP's reduce-scatter then sums over the
  flattened mesh and divides by the data-parallel size only (a plain sum and a division,
  which gloo supports, instead of NCCL's pre-multiplied sum).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

__all__ = [
    "PairGroup",
    "data_parallel_size",
    "fsdp_mesh",
    "gather_pair_errors",
    "pair_group",
    "reduce_gradients",
    "set_fsdp_gradient_reduction",
]


@dataclass(frozen=True)
class PairGroup:
    """This rank's place in its pair: `rank` 0 runs the preferred sample, 1 the rejected."""

    group: ProcessGroup | None  # None when the pair is not split (size 1)
    size: int = 1
    rank: int = 0

    @property
    def is_preferred(self) -> bool:
        return self.rank == 0


def pair_group(mesh: DeviceMesh | None) -> PairGroup:
    """The pair group of `mesh` (dimension `pair`); size 1 without a mesh."""
    if mesh is None or mesh["pair"].size() == 1:
        return PairGroup(None)
    sub = mesh["pair"]
    if sub.size() != 2:
        raise ValueError(f"the pair dimension must have size 1 or 2, got {sub.size()}")
    return PairGroup(sub.get_group(), 2, sub.get_local_rank())


class _GatherPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, errors, group, rank):
        ctx.rank = rank
        parts = [torch.empty_like(errors) for _ in range(2)]
        dist.all_gather(parts, errors.contiguous(), group=group)
        return parts[0], parts[1]

    @staticmethod
    def backward(ctx, grad_w, grad_l):
        # both ranks computed the same loss: each keeps the gradient of its own sample
        return (grad_w if ctx.rank == 0 else grad_l), None, None


def gather_pair_errors(errors: torch.Tensor, pair: PairGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample errors of this rank -> `(errors_preferred, errors_rejected)`, each (B,).

    Pair size 2: `errors` is (B,) for this rank's samples, all-gathered with autograd.
    Pair size 1: `errors` is (2B,), `[preferred; rejected]`, and is split in two.
    """
    if pair.size == 1:
        if errors.shape[0] % 2:
            raise ValueError(f"pair size 1 expects [preferred; rejected] errors, got {errors.shape[0]}")
        preferred, rejected = errors.chunk(2, dim=0)
        return preferred, rejected
    return _GatherPair.apply(errors, pair.group, pair.rank)


def _flatten(mesh: DeviceMesh, dims: tuple[str, ...]) -> DeviceMesh:
    name = "_".join(dims)
    if len(dims) == 1:
        return mesh[dims[0]]
    try:
        return mesh[name]  # flattened before
    except (KeyError, RuntimeError, ValueError):
        return mesh[dims]._flatten(name)


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh to shard parameters over: dp_shard x pair x cp, flattened."""
    return _flatten(mesh, ("dp_shard", "pair", "cp"))


def data_parallel_size(mesh: DeviceMesh | None) -> int:
    if mesh is None:
        return 1
    return mesh["dp_replicate"].size() * mesh["dp_shard"].size()


@torch.no_grad()
def reduce_gradients(parameters: Iterable[torch.nn.Parameter], mesh: DeviceMesh | None) -> None:
    """Sum gradients over pair and cp, average them over data parallelism (no FSDP)."""
    if mesh is None or mesh.size() == 1:
        return
    if mesh.size() != dist.get_world_size():
        raise ValueError("reduce_gradients expects a mesh over the whole world")
    dp = data_parallel_size(mesh)
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            if dp > 1:
                p.grad.div_(dp)


def set_fsdp_gradient_reduction(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """For a model sharded with FSDP2 over `fsdp_mesh(mesh)`: sum gradients over pair and
    cp, average over data parallelism (instead of FSDP's mean over the whole mesh)."""
    factor = float(data_parallel_size(mesh))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(factor)
            module.set_force_sum_reduction_for_comms(True)
