"""How a videodpo run spreads over ranks: data, FSDP, pair and context parallelism.

`build_layout(cfg.parallel)` reads the launcher's environment, builds the named mesh
of `common.distributed` and keeps the groups the training step needs: the data rank
(ranks of one pair group and one cp group read the same pairs and draw the same noise),
the pair group (rank 0 runs the preferred sample, rank 1 the rejected one) and the cp
group. The model is parallelized from outside by `ParallelLayout.parallelize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.context_parallel import build_cp_groups
from common.cp_plans import apply_context_parallel
from common.distributed import ParallelDims, build_mesh, init_distributed
from common.errors import ConfigError
from common.fsdp import apply_activation_checkpointing, apply_fsdp
from common.pair_parallel import (
    fsdp_mesh,
    gather_pair_errors,
    pair_group,
    reduce_gradients,
    set_fsdp_gradient_reduction,
)
from videodpo.config import ParallelConfig
from videodpo.models.cp_plans import cp_plan_for
from videodpo.models.experts import TimestepExperts, experts_of


@dataclass
class ParallelLayout:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    pair_rank: int = 0
    pair_size: int = 1
    cp_size: int = 1
    mesh: Any = None
    fsdp: bool = False  # set by parallelize: gradients are reduced by FSDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, dim: str) -> Any:
        return None if self.mesh is None else self.mesh[dim].get_group()

    def parallelize(self, model: nn.Module, cfg: ParallelConfig, trainable: bool) -> nn.Module:
        """Context parallelism, activation checkpointing (policy) and FSDP2, from outside."""
        if self.cp_size > 1:
            ulysses = self.cp_size if cfg.cp_mode == "ulysses" else 1
            groups = build_cp_groups(self.mesh, ulysses=ulysses)
            for expert in experts_of(model).values():
                apply_context_parallel(expert, groups, cp_plan_for(expert))
        if self.world_size > 1 and isinstance(model, TimestepExperts):
            model.lockstep = True  # ranks that route differently still run the same collectives
        ac_every = cfg.activation_checkpointing if trainable else 0
        if self.sharded(cfg):
            # The pair and cp ranks each hold a share of one sample's gradient: FSDP's
            # reduction becomes a sum over those shares and a mean over data ranks.
            apply_fsdp(model, mesh=fsdp_mesh(self.mesh), param_dtype=cfg.param_dtype or None,
                       cpu_offload=cfg.reference_cpu_offload and not trainable, ac_every=ac_every)
            if trainable:
                set_fsdp_gradient_reduction(model, self.mesh)
        else:
            if ac_every:
                apply_activation_checkpointing(model, ac_every)
            if self.world_size > 1:  # every rank holds the whole model: start from rank 0's
                for tensor in model.state_dict().values():
                    dist.broadcast(tensor, src=0)
        self.fsdp = self.sharded(cfg)
        return model

    def sharded(self, cfg: ParallelConfig) -> bool:
        return self.world_size > 1 and cfg.fsdp

    def gather_pair(self, errors: torch.Tensor) -> torch.Tensor:
        """This rank's per-sample errors -> [preferred; rejected] from both pair ranks."""
        return torch.cat(gather_pair_errors(errors, pair_group(self.mesh)))

    def reduce_gradients(self, model: nn.Module) -> None:
        """Without FSDP: sum gradient shares over pair and cp, average over data ranks."""
        if self.world_size == 1 or self.fsdp:
            return
        reduce_gradients(model.parameters(), self.mesh)

    def all_ranks_agree(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() == 0.0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def build_layout(cfg: ParallelConfig) -> ParallelLayout:
    info = init_distributed()
    if info.world_size == 1:
        if cfg.pair != 1 or cfg.cp != 1:
            raise ConfigError(f"parallel.pair={cfg.pair} / parallel.cp={cfg.cp} need that many ranks (torchrun)")
        return ParallelLayout(device=info.device)
    try:
        dims = ParallelDims(dp_shard=cfg.dp_shard, cp=cfg.cp, pair=cfg.pair).resolve(info.world_size)
    except ValueError as err:
        raise ConfigError(f"parallel: {err}") from None
    mesh = build_mesh(dims, info.device.type)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return ParallelLayout(
        device=info.device, rank=info.rank, world_size=info.world_size,
        dp_rank=dp_mesh.get_local_rank(), dp_size=dp_mesh.size(),
        pair_rank=mesh["pair"].get_local_rank(), pair_size=dims.pair, cp_size=dims.cp, mesh=mesh,
    )
