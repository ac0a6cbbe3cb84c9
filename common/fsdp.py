"""FSDP2 and activation checkpointing, applied to a model from outside.

`apply_fsdp` shards each transformer block with `fully_shard`, then the root, the way
torchtitan's `parallelize.py` does, so model code (diffusers, transformers or our own)
is never edited. Blocks are found by type: the largest `nn.ModuleList` of identical
modules (`blocks` in Wan, `transformer_blocks` in CogVideoX, `model.layers` in Qwen).
Activation checkpointing wraps a block's forward in non-reentrant
`torch.utils.checkpoint`, which keeps state-dict keys unchanged.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def to_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def find_blocks(model: nn.Module, block_types: tuple[type, ...] | None = None) -> list[nn.Module]:
    """The repeated transformer blocks of `model`.

    With `block_types`, every module of those types; otherwise the children of the
    `nn.ModuleList` of identical modules that holds the most parameters.
    """
    if block_types:
        return [m for m in model.modules() if isinstance(m, block_types)]
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = children, size
    return best


def apply_activation_checkpointing(
    model: nn.Module, every: int = 1, block_types: tuple[type, ...] | None = None
) -> int:
    """Recompute every `every`-th block in backward instead of keeping its activations."""
    if every < 1:
        return 0
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        # A KV cache filled in forward would be filled again by the recomputation
        # (keys twice as long as queries); transformers turns it off the same way.
        config.use_cache = False
        logger.info("activation checkpointing: use_cache turned off")
    count = 0
    for i, block in enumerate(find_blocks(model, block_types)):
        if i % every or getattr(block, "_activation_checkpointed", False):
            continue
        block.forward = _checkpointed_forward(block.forward)
        block._activation_checkpointed = True
        count += 1
    logger.info("activation checkpointing on %d blocks (every %d)", count, every)
    return count


def _checkpointed_forward(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    block_types: tuple[type, ...] | None = None,
    param_dtype: str | torch.dtype | None = None,
    reduce_dtype: str | torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    ac_every: int = 0,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` with FSDP2 over `mesh` (1-D; None = the whole world), blocks first.

    Activation checkpointing (`ac_every` > 0) is applied before sharding, so that the
    recomputation sits inside FSDP's unshard / reshard hooks. With no process group
    this only applies activation checkpointing and returns the model as it is.
    """
    if ac_every:
        apply_activation_checkpointing(model, ac_every, block_types)
    if not dist.is_initialized():
        logger.info("no process group: FSDP not applied")
        return model
    mp_policy = MixedPrecisionPolicy(param_dtype=to_dtype(param_dtype), reduce_dtype=to_dtype(reduce_dtype))
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = find_blocks(model, block_types)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload,
                reshard_after_forward=reshard_after_forward)
    logger.info(
        "FSDP2: %d blocks + root over %d ranks, param dtype %s, reduce dtype %s, cpu offload %s",
        len(blocks), mesh.size() if mesh is not None else dist.get_world_size(),
        to_dtype(param_dtype) or "unchanged", to_dtype(reduce_dtype), cpu_offload,
    )
    return model


def drop_unsynced_gradients(model: nn.Module) -> None:
    """Forget the gradients FSDP2 accumulated unsharded while gradient sync was off
    (`set_requires_gradient_sync(False)`), e.g. when a step with a non-finite loss is
    skipped mid-accumulation; `optimizer.zero_grad` only clears the sharded ones.

    FSDP2 has no public call for this; it reads the per-parameter state that
    `torch.distributed.fsdp` keeps for gradient accumulation.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers on the CPU (every rank takes part; all get them)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach().cpu().clone()
    return out


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded gradients on the CPU, by parameter name (collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().cpu().clone()
    return out
