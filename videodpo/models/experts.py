"""Two transformers that split the noise levels between them: Wan2.2 A14B's experts.

`transformer` serves the high-noise steps (t >= boundary) and `transformer_2` the
low-noise ones, with `boundary = boundary_ratio * num_train_timesteps`, as diffusers'
Wan pipelines route their denoising steps. `TimestepExperts` is one `nn.Module` with
the pipeline's two components as children (state-dict keys `transformer.*` and
`transformer_2.*`), called like a single transformer: each sample goes to the expert
its timestep belongs to. So the adapter, FSDP, the checkpointer and the sampler treat
it as one model; what is per expert (LoRA, export, which experts train) goes through
`experts_of` and `trained_experts`.

Lockstep: under FSDP every rank must run the same forwards and backwards, or the
all-gathers and reduce-scatters of one rank wait for another's that never come. Ranks
of different data shards draw different timesteps, so an expert may get no sample on
one rank and some on another. With `lockstep` set (by the parallel layout, from
outside), an expert with no sample runs on the first sample and adds zero times its
output to the result: its collectives run, its gradient is exactly zero. An expert
that no sample of a step reached on any rank then drops that zero gradient (the
trainer checks `routed`), so that AdamW's momentum does not move it: the step is the
one a single process takes, where that expert has no gradient at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

EXPERT_NAMES = ("transformer", "transformer_2")  # high noise, low noise (the pipeline's names)
EXPERT_CHOICES = {"both": EXPERT_NAMES, "high": ("transformer",), "low": ("transformer_2",)}
# LoRA export folders, one a trained expert, as Wan2.2 LoRAs are shipped (ComfyUI loads one per model)
EXPORT_DIRS = {"transformer": "high_noise", "transformer_2": "low_noise"}


class TimestepExperts(nn.Module):
    """`transformer` for t >= `boundary`, `transformer_2` below it; either may be absent
    (a frozen reference keeps only the experts that train)."""

    def __init__(self, experts: dict[str, nn.Module], boundary: float, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        unknown = set(experts) - set(EXPERT_NAMES)
        if unknown or not experts:
            raise ValueError(f"experts must be named from {EXPERT_NAMES}, got {sorted(experts)}")
        for name in EXPERT_NAMES:
            if name in experts:
                self.add_module(name, experts[name])
        self.boundary = float(boundary)
        self.num_train_timesteps = num_train_timesteps
        self.trained: tuple[str, ...] = tuple(experts)
        self.lockstep = False  # set from outside under FSDP (see the module docstring)
        self.routed = dict.fromkeys(EXPERT_NAMES, 0)  # samples each expert took with grad, since reset

    # ---- what a single transformer offers ---------------------------------------------

    @property
    def experts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in EXPERT_NAMES if hasattr(self, name)}

    @property
    def config(self) -> Any:
        return next(iter(self.experts.values())).config

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.experts.values())).dtype

    @property
    def _no_split_modules(self) -> list[str]:
        return sorted({n for e in self.experts.values() for n in (getattr(e, "_no_split_modules", None) or [])})

    def train_experts(self, which: str) -> None:
        """Train `both`, the `high`-noise or the `low`-noise expert: the others are frozen."""
        if which not in EXPERT_CHOICES:
            raise ValueError(f"experts must be one of {sorted(EXPERT_CHOICES)}, got {which!r}")
        self.trained = tuple(n for n in EXPERT_CHOICES[which] if n in self.experts)
        for name, expert in self.experts.items():
            if name not in self.trained:
                expert.requires_grad_(False)

    def reset_routed(self) -> None:
        self.routed = dict.fromkeys(EXPERT_NAMES, 0)

    def timestep_range(self) -> tuple[float, float]:
        """The timesteps the trained experts serve: training draws t only there."""
        low = 0.0 if "transformer_2" in self.trained else self.boundary
        high = float(self.num_train_timesteps) if "transformer" in self.trained else self.boundary
        return low, high

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        """True where a sample goes to `transformer` (high noise). A per-token timestep
        (B, L) routes by its largest entry, the sample's noise level."""
        t = timestep if timestep.dim() == 1 else timestep.flatten(1).amax(dim=1)
        return t >= self.boundary

    # ---- forward -------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        high = self.route(timestep)
        groups = {"transformer": high.nonzero().flatten(), "transformer_2": (~high).nonzero().flatten()}
        b = hidden_states.shape[0]
        out: torch.Tensor | None = None
        idle_terms = []
        for name, expert in self.experts.items():
            idx = groups[name]
            if torch.is_grad_enabled():
                self.routed[name] += len(idx)
            if len(idx) == 0:
                if self.lockstep:
                    y = _call(expert, hidden_states[:1], timestep[:1], _rows(kwargs, slice(0, 1)))
                    idle_terms.append(y.sum() * 0)
                continue
            if len(idx) == b:  # the whole batch: no gather or scatter
                y = _call(expert, hidden_states, timestep, kwargs)
                out = y
                continue
            y = _call(expert, hidden_states[idx], timestep[idx], _rows(kwargs, idx))
            if out is None:
                out = y.new_zeros((b, *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        missing = [n for n in EXPERT_NAMES if len(groups[n]) and n not in self.experts]
        if missing or out is None:
            raise RuntimeError(f"timesteps {timestep.flatten().tolist()[:4]} route to {missing}, which this "
                               f"model does not hold (it has {list(self.experts)})")
        for term in idle_terms:
            out = out + term
        return (out,)


def _rows(kwargs: dict[str, Any], index: Any) -> dict[str, Any]:
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _call(expert: nn.Module, hidden: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(kwargs, return_dict=False)
    return expert(hidden_states=hidden, timestep=timestep, **kwargs)[0]


def experts_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every transformer of `model` by its pipeline name; a plain transformer is `transformer`."""
    return model.experts if isinstance(model, TimestepExperts) else {"transformer": model}


def trained_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The transformers of `model` that train (LoRA goes on them; they are exported)."""
    if isinstance(model, TimestepExperts):
        return {n: e for n, e in model.experts.items() if n in model.trained}
    return {"transformer": model}


def iter_expert_state(state_dict: dict[str, torch.Tensor], name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The entries of a `TimestepExperts` state dict that belong to expert `name`, unprefixed."""
    prefix = name + "."
    for key, value in state_dict.items():
        if key.startswith(prefix):
            yield key[len(prefix):], value


class ExpertWeights:
    """Weights for a `TimestepExperts` from one source per expert (each read like a model
    folder's safetensors): key `transformer_2.blocks.0...` reads `blocks.0...` of the
    `transformer_2` source."""

    def __init__(self, sources: dict[str, Any]) -> None:
        self.sources = sources
        self.folder = ", ".join(str(getattr(s, "folder", name)) for name, s in sources.items())

    def _split(self, key: str) -> tuple[Any, str] | None:
        name, _, rest = key.partition(".")
        source = self.sources.get(name)
        return None if source is None else (source, rest)

    def __contains__(self, key: str) -> bool:
        found = self._split(key)
        return found is not None and found[1] in found[0]

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        source, rest = self._split(key)
        return source.rows(rest, start, stop)
