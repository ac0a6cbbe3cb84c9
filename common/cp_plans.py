"""Context parallelism applied to a model from outside, by the plan its family declares.

A `ContextParallelPlan` says, by module path, where the token sequence is split across
the cp group and where it is gathered back (forward hooks), which attention modules get
a context-parallel processor (diffusers' `set_processor`), and, for transformers models,
which attention function to register with `AttentionInterface`. Plans live beside the
model adapters that declare them (`videodpo/models/cp_plans.py`,
`llmpost/cp_plan.py`), as finetrainers' `_cp_plan` and torchtitan's per-model
`parallelize.py` do; this module applies any plan and names no model family.

    handle = apply_context_parallel(model, groups, plan)   # ... handle.remove()

Sequences whose length does not divide by the cp size are zero-padded at the end; the
plan records the true length (`records_length`) and processors pass it on as
`seq_len`, so padded keys are never attended to. Gradients follow
`common.context_parallel`'s convention: each rank's parameter gradient is its tokens'
share, summed over the cp group.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from common.context_parallel import LAYOUTS, CPGroups, gather_sequence, split_sequence

__all__ = [
    "CP_ATTENTION_NAME",
    "CPHandle",
    "CPState",
    "ContextParallelPlan",
    "GatherOutput",
    "SplitInput",
    "SplitOutput",
    "apply_context_parallel",
]

CP_ATTENTION_NAME = "context_parallel"


@dataclass
class CPState:
    """Shared by the hooks and processors of one model: the groups, the sequence layout
    and, during a forward, the true (unpadded) number of split tokens."""

    groups: CPGroups
    layout: str = "contiguous"
    seq_len: int | None = None

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's shard of `x` along `dim`. Plain slicing: its backward leaves zeros
        outside the shard, so the layers before the split get this rank's share too."""
        if self.groups.size == 1:  # (a None group would mean the whole world to torch)
            return x
        return split_sequence(x, dim, self.groups.cp, grad="local", layout=self.layout)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence from every rank's shard, padding dropped."""
        if self.groups.size == 1:
            return x
        return gather_sequence(x, dim, self.groups.cp, seq_len=self.seq_len, layout=self.layout)


@dataclass(frozen=True)
class SplitInput:
    """Split an input of a module along `dim` before its forward. The input is found by
    keyword `name`, else at position `index`; a tuple of tensors is split element-wise."""

    name: str
    dim: int
    index: int | None = None
    records_length: bool = False  # its length along `dim` is the true sequence length


@dataclass(frozen=True)
class SplitOutput:
    """Split a module's output (a tensor or a tuple of tensors) along `dim`."""

    dim: int
    records_length: bool = False


@dataclass(frozen=True)
class GatherOutput:
    """Gather a module's output along `dim` from every rank's shard."""

    dim: int


Spec = SplitInput | SplitOutput | GatherOutput


@dataclass(frozen=True)
class ContextParallelPlan:
    """What one model family needs to run on sequence shards.

    `hooks`: module path (`""` is the model itself) -> what to split or gather there.
    `processors`: module path pattern (`*` matches any part, e.g. `blocks.*.attn1`) ->
    a factory `CPState -> processor` set with the module's `set_processor`.
    `check_inputs(args, kwargs)`: called before each forward of the model; raises for
    inputs the plan does not handle.
    `attention_function` / `is_attention_module`: a transformers attention function,
    registered as `CP_ATTENTION_NAME` and selected in the config; every module for which
    `is_attention_module` holds gets the `CPState` as `module.context_parallel_state`.
    `layout`: how sequences are split (`common.context_parallel.LAYOUTS`); causal
    models use `zigzag` so that every rank does the same work.
    """

    hooks: dict[str, tuple[Spec, ...]] = field(default_factory=dict)
    processors: dict[str, Callable[[CPState], Any]] = field(default_factory=dict)
    check_inputs: Callable[[tuple, dict], None] | None = None
    attention_function: Callable[..., Any] | None = None
    is_attention_module: Callable[[nn.Module], bool] | None = None
    layout: str = "contiguous"


@dataclass
class CPHandle:
    """What `apply_context_parallel` changed; `remove()` puts the model back."""

    state: CPState | None = None
    hooks: list = field(default_factory=list)
    processors: list[tuple[nn.Module, Any]] = field(default_factory=list)
    attention_modules: list[nn.Module] = field(default_factory=list)
    attn_implementation: tuple[nn.Module, str | None] | None = None

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module, processor in self.processors:
            module.set_processor(processor)
        for module in self.attention_modules:
            del module.context_parallel_state
        if self.attn_implementation is not None:
            model, name = self.attn_implementation
            _set_attn_implementation(model, name)
        self.hooks, self.processors, self.attention_modules = [], [], []
        self.attn_implementation = None


def _split_value(value: Any, dim: int, state: CPState, records_length: bool) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_split_value(v, dim, state, records_length) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if records_length:
        state.seq_len = value.shape[dim]
    return state.split(value, dim)


def _split_input_hook(spec: SplitInput, state: CPState):
    def hook(module, args, kwargs):
        if spec.name in kwargs:
            kwargs[spec.name] = _split_value(kwargs[spec.name], spec.dim, state, spec.records_length)
        elif spec.index is not None and len(args) > spec.index:
            args = list(args)
            args[spec.index] = _split_value(args[spec.index], spec.dim, state, spec.records_length)
            args = tuple(args)
        return args, kwargs

    return hook


def _output_hook(spec: SplitOutput | GatherOutput, state: CPState):
    def hook(module, args, output):
        if isinstance(spec, GatherOutput):
            return state.gather(output, spec.dim)
        return _split_value(output, spec.dim, state, spec.records_length)

    return hook


def _check_hook(check: Callable[[tuple, dict], None]):
    def hook(module, args, kwargs):
        check(args, kwargs)

    return hook


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise TypeError(
            f"context-parallel plan: {type(model).__name__} has no module {path!r}"
        ) from None


def _set_attn_implementation(model: nn.Module, name: str | None) -> None:
    if hasattr(model, "set_attn_implementation") and name is not None:
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def apply_context_parallel(model: nn.Module, groups: CPGroups, plan: ContextParallelPlan) -> CPHandle:
    """Make `model` run on the sequence shards of `groups` as `plan` declares."""
    if plan.layout not in LAYOUTS:
        raise ValueError(f"context-parallel plan: layout must be one of {LAYOUTS}, got {plan.layout!r}")
    state = CPState(groups, layout=plan.layout)
    handle = CPHandle(state=state)
    if plan.check_inputs is not None:
        handle.hooks.append(model.register_forward_pre_hook(_check_hook(plan.check_inputs), with_kwargs=True))
    for path, specs in plan.hooks.items():
        module = _submodule(model, path)
        for spec in specs:
            if isinstance(spec, SplitInput):
                hook = _split_input_hook(spec, state)
                handle.hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handle.hooks.append(module.register_forward_hook(_output_hook(spec, state)))
    for pattern, factory in plan.processors.items():
        matched = [m for name, m in model.named_modules() if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise TypeError(f"context-parallel plan: no module of {type(model).__name__} matches {pattern!r}")
        for module in matched:
            handle.processors.append((module, module.processor))
            module.set_processor(factory(state))
    if plan.attention_function is not None:
        _apply_attention_function(model, plan, state, handle)
    return handle


def _apply_attention_function(
    model: nn.Module, plan: ContextParallelPlan, state: CPState, handle: CPHandle
) -> None:
    AttentionInterface.register(CP_ATTENTION_NAME, plan.attention_function)
    selects = plan.is_attention_module or (lambda module: False)
    for module in model.modules():
        if selects(module):
            module.context_parallel_state = state
            handle.attention_modules.append(module)
    if not handle.attention_modules:
        raise TypeError(f"context-parallel plan: no attention modules found in {type(model).__name__}")
    handle.attn_implementation = (model, model.config._attn_implementation)
    _set_attn_implementation(model, CP_ATTENTION_NAME)
