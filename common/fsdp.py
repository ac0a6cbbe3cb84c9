"""FSDP2 and activation checkpointing, applied to a model from outside.

`apply_fsdp` shards each transformer block with `fully_shard`, then the root, the way
torchtitan's `parallelize.py` does, so model code (diffusers, transformers or our own)
is never edited. Blocks are found by type: the largest `nn.ModuleList` of identical
modules (`blocks` in Wan, `transformer_blocks` in CogVideoX, `model.layers` in Qwen).
Activation checkpointing wraps a block's forward in non-reentrant
`torch.utils.checkpoint`, which keeps state-dict keys unchanged.

Host-lean set-up: build the model on the meta device, shard it, `materialize` the
shards, then `load_weights` from `SafetensorsWeights`: every rank reads from the
safetensors files only the rows of each tensor it keeps (FSDP2 shards dim 0), through
memory-mapped slices, so no rank holds a full copy of the model at any time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from common.errors import ConfigError

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

    With `block_types`, every module of those types. Otherwise the modules whose class
    the model names in `_no_split_modules` (diffusers and transformers models declare it;
    a wrapper such as peft's or `TimestepExperts` finds it on what it wraps), kept where
    they sit in an `nn.ModuleList`: a declared non-repeated piece (CogVideoX names its
    patch embedding too) is not a block. Base classes count (FSDP2 subclasses each block).
    """
    if block_types:
        return [m for m in model.modules() if isinstance(m, block_types)]
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    if not names:
        raise ValueError(
            f"{type(model).__name__} declares no `_no_split_modules` (the class names of its "
            "transformer blocks); declare it on the model or pass block_types")
    blocks = [child for m in model.modules() if isinstance(m, nn.ModuleList)
              for child in m if any(c.__name__ in names for c in type(child).__mro__)]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__}: no module of the classes in `_no_split_modules` "
            f"({', '.join(sorted(names))}) sits in an nn.ModuleList")
    return blocks


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
    # pinned host memory needs an accelerator; on a CPU-only machine offload unpinned
    pin = torch.accelerator.is_available()
    offload = CPUOffloadPolicy(pin_memory=pin) if cpu_offload else OffloadPolicy()
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


class SafetensorsWeights:
    """The tensors of a model folder's safetensors files (one file, or shards listed in
    `*.safetensors.index.json`), read a row range at a time with plain file reads.

    Not through `safe_open`'s memory map: mapped pages count in the process's RSS
    (with read-ahead, most of the file), while `readinto` a tensor of just the rows keeps
    the rank's memory to what it keeps.
    """

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if indexes:
            files = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{self.folder}: no *.safetensors weights to load")
        self.entries: dict[str, tuple[Path, int, torch.dtype, list[int]]] = {}
        for name in files:
            path = self.folder / name
            with path.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in self.DTYPES:
                    raise ConfigError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which cannot be loaded")
                start = 8 + size + info["data_offsets"][0]
                self.entries[key] = (path, start, self.DTYPES[info["dtype"]], list(info["shape"]))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        path, offset, dtype, shape = self.entries[key]
        if start is None or not shape:
            start, stop = 0, (shape[0] if shape else 1)
        row_numel = math.prod(shape[1:]) if shape else 1
        out = torch.empty([stop - start, *shape[1:]] if shape else [], dtype=dtype)
        row_bytes = row_numel * out.element_size()
        with path.open("rb") as fh:
            fh.seek(offset + start * row_bytes)
            if out.numel():
                fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out


class StateDictWeights:
    """Tensors already in memory (an in-memory model's state dict), read like files."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[key]
        return t if start is None or t.dim() == 0 else t[start:stop]


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int | None, int | None]:
    """(this rank's local tensor, first row, end row) of a parameter; rows None = all."""
    if not isinstance(tensor, DTensor):
        return tensor, None, None
    local = tensor.to_local()
    if all(not isinstance(p, Shard) for p in tensor.placements):
        return local, None, None
    if tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(f"loading weights into placements {tensor.placements}")
    rows, world = tensor.shape[0], tensor.device_mesh.size()
    chunk = math.ceil(rows / world)  # torch.chunk's split, which FSDP2 uses on dim 0
    start = min(rows, tensor.device_mesh.get_local_rank() * chunk)
    stop = min(rows, start + chunk)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"expected {stop - start} local rows of {tuple(tensor.shape)}, got {tuple(local.shape)}")
    return local, start, stop


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Allocate the meta parameters of `model` (FSDP2-sharded or not) on `device`,
    uninitialised; real buffers (rotary tables built in `__init__`) keep their values."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)


@torch.no_grad()
def load_weights(
    model: nn.Module, weights: SafetensorsWeights | StateDictWeights, rename: Callable[[str], str] | None = None
) -> list[str]:
    """Copy `weights` into `model`'s parameters and persistent buffers; a parameter that
    FSDP2 shards takes only this rank's rows (only those are read). `rename` maps a
    model name to its key in `weights`. Returns the parameters `weights` lacks."""
    missing = []
    skip = _non_persistent_buffers(model)
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n not in skip]
    for name, tensor in named:
        key = rename(name) if rename is not None else name
        if key not in weights:
            if isinstance(tensor, nn.Parameter):
                missing.append(name)
            continue
        local, start, stop = _local_rows(tensor)
        local.copy_(weights.rows(key, start, stop))
    return missing


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def drop_unsynced_gradients(model: nn.Module) -> None:
    """Forget the gradients FSDP2 accumulated unsharded while gradient sync was off
    (`set_requires_gradient_sync(False)`), e.g. when a step with a non-finite loss is
    skipped mid-accumulation; `optimizer.zero_grad` only clears the sharded ones.

    FSDP2 has no public call for this; it reads the per-parameter state that
    `torch.distributed.fsdp` keeps for gradient accumulation.
    """
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


def full_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers on the CPU (a collective: every rank takes part).

    `rank0_only`: only rank 0 gets them (the others get `{}`), gathered one tensor at a time
    straight to its CPU memory; for writers such as an export. Otherwise every rank gets
    its own CPU copy (what comparisons across ranks need)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    if rank0_only:
        return state
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded gradients on the CPU, by parameter name (collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().cpu().clone()
    return out
