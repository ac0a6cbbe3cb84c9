"""General data as a regularizer: project the target update per parameter group.

Each step, the gradient the scarce target batch asks for (g_T, of the mean target loss)
is replaced, group by group, by its projection onto a feasible set built from the
per-sample gradients g_1..g_n of a general batch (docs/design.md section 5, solved by
`common.projector`). The update b * g_T + sum_i a_i g_i is written into `.grad`; an
optimizer step follows as usual. Usage (the whole API):

    reg = DataRegularizer(model, RegularizerConfig(feasible="subset", granularity="layer",
                                                   fraction=0.5, n_general=8, path="ghost"))
    stats = reg.step(loss_fn, target_batch, general_batch)   # fills p.grad
    optimizer.step(); optimizer.zero_grad()

`loss_fn(model, batch) -> Tensor (B,)` returns one loss per sample (mean over that
sample's tokens, say); batches are any pytree of tensors with the sample dimension
first and are passed to `loss_fn` unchanged. `general_batch` holds n_general samples.
`stats` is a `RegularizerStats` (losses, norms, cosine of update and g_T).

Granularity: `layer` = every module that owns trainable parameters (a Linear with its
bias, an embedding, a norm); `block` = every transformer block (`common.fsdp.find_blocks`),
modules outside the blocks being one group each; `model` = one group.

Paths, which give the same update (tests/common/test_regularizer.py):
- `materialized`: per-sample gradients of every parameter with `torch.func` (vmap of
  grad, or grad per sample where the model's control flow defeats vmap, as HF padding
  masks do); the reference; n + B_T full gradients in memory; single process only.
- `ghost`: one forward per batch and one backward that stops at module outputs (no
  weight gradients). For `nn.Linear` the Gram entries come from layer inputs X and output
  gradients G: <g_i, g_j> = sum_{s,t} (X_i X_j^T)_{st} (G_i G_j^T)_{st}, the target
  column being the block of all target tokens. With `granularity="layer"` on one
  process each layer is solved and written as soon as its Gram is known, and under
  `ghost_pairs="auto"` a layer whose n per-sample gradients are cheaper to form than
  the token x token products (long sequences) gets them formed for that layer alone
  and freed before the next; `ghost_pairs="ghost"` never forms them.
  Embeddings use the touched rows only; other modules (norms, convs) get per-sample
  gradients of their own few parameters from their captured input and output gradient (a
  module that sees k rows per sample, as CogVideoX's patch conv sees B x F frames, is
  handled per sample block). Parameters owned by a module that also has children (Wan's
  `scale_shift_table` in the root and in every block) are "tapped": during the general
  pass the parameter is swapped for its expansion to n rows, so each row's gradient is
  one sample's; this needs a leading dimension of 1 (it broadcasts over the batch). The update of
  each layer is b * g_T + (a-weighted G)^T X, formed from the captured tensors.
  Memory: each Linear's input and output gradient are kept until the step ends (about
  one more copy of the Linear activations), never n gradients of a group.
- `sketch`: as `ghost`, but the Gram block of a Linear with at least `sketch_min_numel`
  weights is estimated from Kronecker Gaussian sketches P_o G^T X P_i^T of size
  sketch_dim x sketch_dim (a side no larger than sketch_dim is kept exact). The estimate
  is unbiased; each entry's standard deviation is at most
  sqrt(2/k_o + 2(1 + 2/k_o)/k_i) * |g_i| |g_j| (k_o, k_i the sketched sizes, or infinity
  for an exact side). Only the Gram is approximate: the update is formed exactly from
  the approximate coefficients.

FSDP2 (`fully_shard`, 1-D mesh, parameters sharded on dim 0): every rank passes the
SAME target and general batches; each rank forms the Gram terms of the parameter rows
it owns, one all-reduce sums all groups' Gram matrices, and each rank writes the update
of its own rows. Data-parallel splitting of the batches over ranks is not supported.

This file hooks the modules, runs the passes, groups, solves and reports; the per-module
Gram blocks and update writers of the ghost and sketch paths are in `common.ghost_grams`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils._pytree import tree_map

from common.errors import ConfigError
from common.fsdp import find_blocks
from common.ghost_grams import (
    Record,
    embedding_gram,
    generic_gram,
    linear_gram,
    own_params,
    set_grad,
    tapped_gram,
)
from common.projector import FEASIBLE_SETS, Feasible, solve_coefficients

Granularity = Literal["model", "block", "layer"]
GradientPath = Literal["materialized", "ghost", "sketch"]
GhostPairs = Literal["auto", "ghost"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
PATHS: tuple[str, ...] = get_args(GradientPath)
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class RegularizerConfig:
    feasible: Feasible = "subset"
    granularity: Granularity = "layer"
    fraction: float = 0.5  # share of general samples kept by `subset`
    n_general: int = 8  # general samples per step (size of the general batch)
    path: GradientPath = "ghost"
    ghost_pairs: GhostPairs = "auto"  # may a Linear's per-sample gradients be formed
    max_layer_numel: int = 1 << 27  # cap on one layer's n per-sample gradients under "auto"
    ghost_chunk: int = 4096  # token rows per block of the T x T ghost products
    sketch_dim: int = 256  # k of each sketch factor
    sketch_min_numel: int = 1 << 22  # Linear layers with at least this many weights are sketched
    seed: int = 0  # sketches are drawn from (seed, step)
    target_source: str = ""  # name of the target data, read by the calling track
    general_source: str = ""  # name of the general data, read by the calling track

    def __post_init__(self) -> None:
        choices = {
            "feasible": FEASIBLE_SETS,
            "granularity": GRANULARITIES,
            "path": PATHS,
            "ghost_pairs": get_args(GhostPairs),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"regularizer.{key}: {getattr(self, key)!r} is not one of {allowed}"
                )
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"regularizer.fraction: expected a number in (0, 1], got {self.fraction}")
        if self.n_general < 1:
            raise ConfigError(f"regularizer.n_general: expected >= 1, got {self.n_general}")
        if self.sketch_dim < 1:
            raise ConfigError(f"regularizer.sketch_dim: expected >= 1, got {self.sketch_dim}")


@dataclass
class RegularizerStats:
    target_loss: float
    general_loss: float
    target_grad_norm: float  # |g_T| over all groups
    update_norm: float  # |d|
    cos_update_target: float  # <d, g_T> / (|d| |g_T|)
    aligned_general: float  # share of general samples with <g_i, g_T> > 0 (whole model)
    groups: int


@dataclass
class _Group:
    name: str
    modules: list[str] = field(default_factory=list)


class _Capture(torch.autograd.Function):
    """Identity on a module output whose backward stores the output gradient."""

    @staticmethod
    def forward(ctx, out, anchor, record):  # noqa: ARG004 - anchor only links the graph
        ctx.record = record
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.record.grad_out = grad.detach()
        return grad, torch.zeros(()), None


class DataRegularizer:
    """Writes the projected target update into `.grad` of the model's trainable params."""

    def __init__(self, model: nn.Module, config: RegularizerConfig) -> None:
        self.model = model
        self.config = config
        self.steps = 0
        self.modules = _parameter_modules(model)
        if not self.modules:
            raise ConfigError("regularizer: the model has no trainable parameters")
        self.groups = _build_groups(model, self.modules, config.granularity)
        self.sharded = any(
            isinstance(p, DTensor) for m in self.modules.values() for p in own_params(m).values()
        )
        if self.sharded and config.path == "materialized":
            raise ConfigError(
                "regularizer.path: 'materialized' is the single-process reference; "
                "use 'ghost' or 'sketch' with FSDP"
            )
        # modules that own parameters but also have children (a transformer block's or
        # the root's modulation table): their own parameters are tapped, not hooked
        self.tapped = {
            name for name, m in self.modules.items()
            if not isinstance(m, (nn.Linear, nn.Embedding)) and any(
                own_params(c) for c in m.modules() if c is not m)
        }
        if config.path != "materialized":
            self._check_ghost_support()

    # ------------------------------------------------------------------ public
    def step(self, loss_fn: LossFn, target_batch: Any, general_batch: Any) -> RegularizerStats:
        """Compute the projected update for one step and write it into `.grad`."""
        n = _batch_size(general_batch)
        if n != self.config.n_general:
            raise ConfigError(
                f"regularizer.n_general is {self.config.n_general} but the general batch "
                f"holds {n} samples"
            )
        if self.config.path == "materialized":
            grams, coefs, losses = self._materialized(loss_fn, target_batch, general_batch)
        else:
            grams, coefs, losses = self._ghost(loss_fn, target_batch, general_batch)
        self.steps += 1
        return _stats(grams, coefs, losses, len(self.groups))

    def _solve_all(self, grams: dict[str, torch.Tensor]):
        """Sum partial Gram matrices over shards (one all-reduce), then solve every group."""
        if self.sharded:
            stacked = torch.stack([grams[g.name] for g in self.groups])
            dist.all_reduce(stacked, group=self._shard_group())
            grams = {g.name: stacked[i] for i, g in enumerate(self.groups)}
        return grams, {name: self._solve(gram) for name, gram in grams.items()}

    def _solve(self, gram: torch.Tensor) -> torch.Tensor:
        b, a = solve_coefficients(gram, self.config.feasible, self.config.fraction)
        return torch.as_tensor(np.concatenate([[b], a]), dtype=torch.float64)

    # ------------------------------------------------------------ materialized
    def _materialized(self, loss_fn, target_batch, general_batch):
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        frozen = {k: p.detach() for k, p in self.model.named_parameters() if not p.requires_grad}
        buffers = dict(self.model.named_buffers())
        wrapper = _LossModule(self.model, loss_fn)

        def sample_loss(trainable, sample):
            batch = tree_map(lambda t: t.unsqueeze(0), sample)
            state = _prefix({**frozen, **buffers, **trainable})
            loss = torch.func.functional_call(wrapper, state, (batch,))[0]
            return loss, loss

        grad_fn = torch.func.grad(sample_loss, has_aux=True)
        vmapped = torch.func.vmap(grad_fn, in_dims=(None, 0))

        def per_sample(batch):
            try:
                return vmapped(params, batch)
            except RuntimeError as err:  # data-dependent control flow (e.g. HF padding masks)
                if "vmap" not in str(err):
                    raise
            rows = [grad_fn(params, tree_map(lambda t, i=i: t[i], batch)) for i in range(_batch_size(batch))]
            grads = {k: torch.stack([r[0][k] for r in rows]) for k in params}
            return grads, torch.stack([r[1] for r in rows])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no vmap rule for CPU flash sdpa
            grads_t, losses_t = per_sample(target_batch)
            grads_g, losses_g = per_sample(general_batch)
        columns = {
            k: torch.cat([grads_t[k].mean(0, keepdim=True), grads_g[k]]).flatten(1).double()
            for k in params
        }
        group_of = {m: g.name for g in self.groups for m in g.modules}
        param_group = {k: group_of[k.rpartition(".")[0]] for k in params}
        grams = {}
        for g in self.groups:
            rows = torch.cat([columns[k] for k in params if param_group[k] == g.name], dim=1)
            grams[g.name] = rows @ rows.T

        grams, coefs = self._solve_all(grams)
        pmap = dict(self.model.named_parameters())
        for k in params:
            set_grad(pmap[k], coefs[param_group[k]] @ columns[k])
        losses = (losses_t.mean().item(), losses_g.mean().item())
        return grams, coefs, losses

    # ------------------------------------------------------------------ ghost
    def _ghost(self, loss_fn, target_batch, general_batch):
        records: dict[str, dict[str, list[Record]]] = {k: {"t": [], "g": []} for k in self.modules}
        anchor = torch.zeros((), requires_grad=True)
        phase = ["t"]
        handles = []
        for name, module in self.modules.items():
            if name in self.tapped:
                pre, post = self._tap_hooks(name, records[name], phase, anchor)
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post))
            else:
                handles.append(module.register_forward_hook(self._hook(records[name], phase, anchor)))
        try:
            losses_t = loss_fn(self.model, target_batch)
            phase[0] = "g"
            losses_g = loss_fn(self.model, general_batch)
        finally:
            for h in handles:
                h.remove()
        _check_losses(losses_t, target_batch, "target")
        _check_losses(losses_g, general_batch, "general")
        total = losses_t.mean() + losses_g.sum()
        torch.autograd.grad(total, [anchor], allow_unused=True)
        n = losses_g.shape[0]
        losses = (losses_t.detach().mean().item(), losses_g.detach().mean().item())
        if self.config.granularity == "layer" and not self.sharded:
            # each layer is its own group: solve and write at once, so a layer's
            # per-sample gradients (if formed) live only while that layer is handled
            grams, coefs = {}, {}
            for g in self.groups:
                (name,) = g.modules
                gram, write = self._module_gram(name, records.pop(name), n, transient=True)
                grams[g.name], coefs[g.name] = gram, self._solve(gram)
                write(coefs[g.name])
            return grams, coefs, losses
        parts = {name: self._module_gram(name, recs, n) for name, recs in records.items()}
        grams = {
            g.name: sum((parts[m][0] for m in g.modules), torch.zeros(n + 1, n + 1, dtype=torch.float64))
            for g in self.groups
        }
        grams, coefs = self._solve_all(grams)
        for g in self.groups:
            for m in g.modules:
                parts[m][1](coefs[g.name])
        return grams, coefs, losses

    def _hook(self, records, phase, anchor):
        def hook(module, args, out):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                raise ConfigError(
                    f"regularizer: module {type(module).__name__} must take and return one tensor "
                    "for the ghost path; use path='materialized'"
                )
            params = None
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                params = {k: p.detach().clone() for k, p in own_params(module).items()}
            record = Record(x=x.detach(), params=params)
            records[phase[0]].append(record)
            return _Capture.apply(out, anchor, record)

        return hook

    def _tap_hooks(self, name, records, phase, anchor):
        """Hooks that swap a tapped module's own parameters for captured stand-ins.

        Such a parameter (Wan's `scale_shift_table`, shape (1, ...)) is added to
        per-sample tensors inside the module's forward; in the general pass it is
        expanded to (n, ...) rows, so the gradient each row receives is that sample's
        gradient of the parameter. Only a leading dimension of 1 allows this.
        """
        module = self.modules[name]
        saved: dict[str, torch.Tensor] = {}

        def pre(mod, args, kwargs):
            lead = next((a.shape[0] for a in (*args, *kwargs.values())
                         if isinstance(a, torch.Tensor) and a.ndim > 0), 1)
            for key, p in own_params(mod).items():
                if p.shape[0] != 1:
                    raise ConfigError(
                        f"regularizer: parameter {name}.{key} {tuple(p.shape)} belongs to a module "
                        "with children; the ghost path handles such parameters only with a "
                        "leading dimension of 1; use path='materialized' or freeze it"
                    )
                record = Record(x=torch.empty(0), key=key)
                records[phase[0]].append(record)
                saved[key] = mod._parameters[key]
                stand_in = p.expand(lead, *p.shape[1:]) if phase[0] == "g" else p
                mod._parameters[key] = _Capture.apply(stand_in, anchor, record)

        def post(mod, args, out):
            mod._parameters.update(saved)
            saved.clear()

        del module
        return pre, post

    def _module_gram(self, name: str, recs: dict[str, list[Record]], n: int, transient=False):
        """(Gram contribution (n+1)x(n+1), writer(coef)) for one module's parameters.

        `transient`: the writer is called right away, so per-sample gradients formed for
        the Gram may be kept inside it (they are used for the update instead of X and G).
        """
        module = self.modules[name]
        if name in self.tapped:
            return tapped_gram(module, recs, n)
        if isinstance(module, nn.Linear):
            return linear_gram(name, module, recs, n, self.config, self.steps, transient)
        if isinstance(module, nn.Embedding):
            return embedding_gram(module, recs, n)
        return generic_gram(module, recs, n)

    # ----------------------------------------------------------------- checks
    def _check_ghost_support(self) -> None:
        for name, module in self.modules.items():
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
                raise ConfigError(f"regularizer: embedding {name} with max_norm/sparse is not supported")
        seen: dict[int, str] = {}
        for name, module in self.modules.items():
            for p in own_params(module).values():
                if id(p) in seen:
                    raise ConfigError(
                        f"regularizer: parameter shared by {seen[id(p)]} and {name} (tied "
                        "weights); untie them or use path='materialized'"
                    )
                seen[id(p)] = name
            for p in own_params(module).values():
                if isinstance(p, DTensor) and (
                    p.device_mesh.ndim != 1 or p.placements[0] != Shard(0)
                ):
                    raise ConfigError(
                        f"regularizer: {name} is sharded as {p.placements} on a "
                        f"{p.device_mesh.ndim}-D mesh; only Shard(0) on a 1-D mesh is supported"
                    )

    def _shard_group(self):
        for m in self.modules.values():
            for p in own_params(m).values():
                if isinstance(p, DTensor):
                    return p.device_mesh.get_group()
        return None


class _LossModule(nn.Module):
    """Lets `torch.func.functional_call` swap parameters under a user's loss function."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in state.items()}


def _parameter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if own_params(m)}


def _build_groups(model: nn.Module, modules: dict[str, nn.Module], granularity: str) -> list[_Group]:
    if granularity == "model":
        return [_Group("model", list(modules))]
    if granularity == "layer":
        return [_Group(name or "root", [name]) for name in modules]
    block_ids = {id(b) for b in find_blocks(model)}
    block_names = [name for name, m in model.named_modules() if id(m) in block_ids]
    groups: dict[str, _Group] = {}
    for name in modules:
        owner = next((b for b in block_names if name == b or name.startswith(b + ".")), name)
        groups.setdefault(owner, _Group(owner or "root")).modules.append(name)
    return list(groups.values())


def _batch_size(batch: Any) -> int:
    sizes = set()
    tree_map(lambda t: sizes.add(t.shape[0]) if isinstance(t, torch.Tensor) else None, batch)
    if len(sizes) != 1:
        raise ConfigError(f"regularizer: batch tensors disagree on the sample dimension: {sizes}")
    return sizes.pop()


def _check_losses(losses: torch.Tensor, batch: Any, which: str) -> None:
    if losses.ndim != 1 or losses.shape[0] != _batch_size(batch):
        raise ConfigError(
            f"regularizer: loss_fn must return one loss per sample, shape ({_batch_size(batch)},) "
            f"for the {which} batch; got {tuple(losses.shape)}"
        )


def _stats(grams, coefs, losses, groups: int) -> RegularizerStats:
    tt = ud = uu = 0.0
    cross = None
    for name, K in grams.items():
        c = coefs[name]
        tt += K[0, 0].item()
        ud += (c @ K[:, 0]).item()
        uu += (c @ K @ c).item()
        cross = K[1:, 0].clone() if cross is None else cross + K[1:, 0]
    cos = ud / math.sqrt(tt * uu) if tt > 0 and uu > 0 else 0.0
    aligned = (cross > 0).double().mean().item() if cross is not None and len(cross) else 0.0
    return RegularizerStats(
        target_loss=losses[0],
        general_loss=losses[1],
        target_grad_norm=math.sqrt(max(tt, 0.0)),
        update_norm=math.sqrt(max(uu, 0.0)),
        cos_update_target=cos,
        aligned_general=aligned,
        groups=groups,
    )
