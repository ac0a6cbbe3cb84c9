"""The ghost path's per-module algebra: from what a module's forward saw (its inputs X and
output gradients G, one `Record` per call), the Gram block of [g_T, g_1..g_n] over the
module's own parameters and a writer that sets their `.grad` to coef @ [g_T, g_1..g_n].

`common.regularizer` hooks the modules, runs the two passes, solves each group and calls
the writers; the formulas are in its docstring and in docs/design.md section 5. Under
FSDP2 each function works on the parameter rows this rank owns (`local_rows`).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from common.errors import ConfigError


@dataclass
class Record:
    """What one call of a module left behind: its input and its output gradient."""

    x: torch.Tensor
    params: dict[str, torch.Tensor] | None = None
    grad_out: torch.Tensor | None = None
    key: str = ""  # a tapped parameter's name


Records = dict[str, list[Record]]  # "t": the target pass's calls, "g": the general pass's
GramAndWriter = tuple[torch.Tensor, Callable[[torch.Tensor], None]]


def tapped_gram(module: nn.Module, recs: Records, n: int) -> GramAndWriter:
    """Gram terms and writer of a tapped module's own parameters: each record's output
    gradient is the gradient of its stand-in, one row per sample (`common.regularizer`
    swaps the parameter for its expansion to n rows during the general pass)."""
    params = own_params(module)

    def columns_of(rec_list, count):
        cols = {k: torch.zeros(count, *params[k].shape[1:]) for k in params}
        for r in rec_list:
            if r.grad_out is not None:
                if r.grad_out.shape[0] != count:
                    raise ConfigError(
                        f"regularizer: tapped parameter {r.key} saw a batch of "
                        f"{r.grad_out.shape[0]} rows, expected {count}")
                cols[r.key] += r.grad_out.float()
        return torch.cat(
            [local_slice(cols[k][:, None], params[k]).reshape(count, -1) for k in params], 1)

    columns = torch.cat([columns_of(recs["t"], 1), columns_of(recs["g"], n)]).double()
    return gram_and_writer(columns, params)


def linear_gram(name: str, module: nn.Linear, recs: Records, n: int, cfg: Any, step: int,
                transient: bool = False) -> GramAndWriter:
    """A Linear's Gram block from its token inputs and output gradients (ghost products,
    sketches, or, where cheaper and `transient`, its n per-sample gradients); `cfg` is the
    `RegularizerConfig`, `step` seeds the sketches."""
    rows = local_rows(module.weight)
    has_bias = module.bias is not None

    def tokens(rec_list, batched):
        xs, gs = [], []
        for r in rec_list:
            if r.grad_out is None:
                continue
            x, g = r.x.float(), r.grad_out[..., rows].float()
            if has_bias:  # the bias is a weight column on a constant-1 input
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            lead = x.shape[0] if batched else 1
            xs.append(x.reshape(lead, -1, x.shape[-1]))
            gs.append(g.reshape(lead, -1, g.shape[-1]))
        if not xs:
            return None, None
        if len(xs) == 1:
            return xs[0], gs[0]
        return torch.cat(xs, dim=1), torch.cat(gs, dim=1)

    width = module.in_features + int(has_bias)
    out_rows = rows.stop - rows.start
    xt, gt = tokens(recs["t"], batched=False)
    xg, gg = tokens(recs["g"], batched=True)
    if xt is None:  # the target loss did not reach this layer
        xt, gt = torch.zeros(1, 0, width), torch.zeros(1, 0, out_rows)
    if xg is None:
        xg, gg = torch.zeros(n, 0, width), torch.zeros(n, 0, out_rows)
    if cfg.path == "sketch" and out_rows * width >= cfg.sketch_min_numel:
        g_target = gt[0].T @ xt[0]
        gram = linear_sketch_gram(name, g_target, xg, gg, cfg.sketch_dim, cfg.seed, step)
        return gram, _token_writer(module, xt, gt, xg, gg)
    if _per_sample_route(xt, xg, gg, transient, cfg):
        return _linear_per_sample(module, xt, gt, xg, gg)
    gram = ghost_gram(xt[0], gt[0], xg, gg, cfg.ghost_chunk)
    return gram, _token_writer(module, xt, gt, xg, gg)


def _per_sample_route(xt, xg, gg, transient: bool, cfg: Any) -> bool:
    """Whether to form this layer's n per-sample gradients instead of T x T products.

    Only in `transient` mode (the layer is solved and written right away, so they are
    freed before the next layer), only under `ghost_pairs="auto"`, when they fit in
    `max_layer_numel` and are cheaper. Costs: ghost products 2 N^2 (in + out) for N
    tokens in all; per-sample gradients n in out (2T + 128), the constant standing for
    writing n out x in blocks from a T-deep product (memory bound, measured on CPUs).
    """
    if not transient or cfg.ghost_pairs != "auto":
        return False
    n, T, width = xg.shape
    out = gg.shape[-1]
    if n * width * out > cfg.max_layer_numel:
        return False
    tokens = xt.shape[1] + n * T
    ghost_cost = 2 * tokens * tokens * (width + out)
    per_sample_cost = n * width * out * (2 * T + 128 + 2 * n)
    return per_sample_cost < ghost_cost


def _linear_per_sample(module, xt, gt, xg, gg):
    """[g_T, g_1..g_n] of one layer in one buffer: one Gram product, one mixing product."""
    n, _, width = xg.shape
    columns = torch.empty(n + 1, gg.shape[-1], width)
    torch.mm(gt[0].T, xt[0], out=columns[0])
    torch.bmm(gg.transpose(1, 2), xg, out=columns[1:])
    flat = columns.view(n + 1, -1)
    gram = _row_gram(flat)

    def write(coef):
        mixed = coef.to(flat.dtype) @ flat
        _set_linear_grad(module, mixed.view_as(columns[0]))

    return gram, write


def _token_writer(module, xt, gt, xg, gg):
    """Update b * g_T + sum_i a_i G_i^T X_i as one GEMM over the tokens that count."""

    def write(coef):
        b, a = coef[0].item(), coef[1:].to(gg.dtype)
        keep = a != 0
        xs, gs = [xg[keep].reshape(-1, xg.shape[-1])], [(gg[keep] * a[keep, None, None])]
        gs[0] = gs[0].reshape(-1, gg.shape[-1])
        if b != 0:
            xs.append(xt[0])
            gs.append(gt[0] * b)
        _set_linear_grad(module, torch.cat(gs).T @ torch.cat(xs))

    return write


def linear_sketch_gram(name: str, g_target: torch.Tensor, xg: torch.Tensor, gg: torch.Tensor,
                       k: int, seed: int, step: int) -> torch.Tensor:
    """Gram of Kronecker sketches Po^T g Pi of [g_T, g_1..g_n] (unbiased estimate)."""
    crc = zlib.crc32(f"{seed}/{step}/{name}".encode())
    gen = torch.Generator().manual_seed(crc)
    p_out = _sketch_matrix(gg.shape[-1], k, gen)
    p_in = _sketch_matrix(xg.shape[-1], k, gen)
    sk_target = (p_out.T @ g_target @ p_in).reshape(1, -1)
    sk_general = torch.einsum("nto,nti->noi", gg @ p_out, xg @ p_in).reshape(len(xg), -1)
    columns = torch.cat([sk_target, sk_general]).double()
    return columns @ columns.T


def embedding_gram(module: nn.Embedding, recs: Records, n: int) -> GramAndWriter:
    """An embedding's Gram block from the rows its tokens touched (never the whole table)."""
    rows = local_rows(module.weight)
    dim = module.embedding_dim

    def tokens(rec_list):
        ids, gs, owner = [], [], []
        for r in rec_list:
            if r.grad_out is None:
                continue
            i = r.x.reshape(r.x.shape[0] if r.x.ndim > 1 else 1, -1)
            g = r.grad_out.float().reshape(*i.shape, dim)
            ids.append(i)
            gs.append(g)
        if not ids:
            return None
        i, g = torch.cat(ids, 1), torch.cat(gs, 1)
        sample = torch.arange(i.shape[0])[:, None].expand_as(i)
        keep = (i >= rows.start) & (i < rows.stop)
        if module.padding_idx is not None:
            keep &= i != module.padding_idx
        owner.append(sample[keep])
        return i[keep] - rows.start, g[keep], owner[0]

    local = rows.stop - rows.start
    target = tokens(recs["t"])
    general = tokens(recs["g"])
    g_target = torch.zeros(local, dim)
    if target is not None:
        g_target.index_add_(0, target[0], target[1])
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    gram[0, 0] = _sq_norm(g_target)
    compact = None
    if general is not None:
        ids, g, owner = general
        touched, slot = torch.unique(ids, return_inverse=True)
        compact = torch.zeros(n, len(touched), dim)
        compact.index_put_((owner, slot), g, accumulate=True)
        flat = compact.reshape(n, -1).double()
        gram[1:, 1:] = flat @ flat.T
        gram[0, 1:] = gram[1:, 0] = flat @ g_target[touched].reshape(-1).double()

    def write(coef):
        update = coef[0].item() * g_target
        if compact is not None:
            mixed = torch.einsum("n,nud->ud", coef[1:].float(), compact)
            update.index_add_(0, touched, mixed)
        set_grad(module.weight, update)

    return gram, write


def generic_gram(module: nn.Module, recs: Records, n: int) -> GramAndWriter:
    """Per-sample gradients of a small module's own parameters (norms and the like)."""

    def per_sample(rec_list, batched):
        out = []
        for r in rec_list:
            if r.grad_out is None:
                continue
            x, g = (r.x, r.grad_out) if batched else (r.x[None], r.grad_out[None])
            if batched and x.shape[0] != n and x.shape[0] % n == 0:
                # rows b-major per sample (CogVideoX's patch conv sees B * F frames)
                x = x.reshape(n, -1, *x.shape[1:])
                g = g.reshape(n, -1, *g.shape[1:])
                rows_per_sample = True
            else:  # the target batch is one block of rows
                rows_per_sample = not batched

            def vjp_one(params, xi, gi, many=rows_per_sample):
                xi, gi = (xi, gi) if many else (xi[None], gi[None])
                fn = lambda p: torch.func.functional_call(module, p, (xi,))  # noqa: E731
                return torch.func.vjp(fn, params)[1](gi.to(xi.dtype))[0]

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                grads = torch.func.vmap(vjp_one, in_dims=(None, 0, 0))(r.params, x, g)
            out.append(grads)
        if not out:
            return None
        return {k: sum(o[k] for o in out) for k in out[0]}

    params = own_params(module)
    tgt = per_sample(recs["t"], batched=False)
    gen = per_sample(recs["g"], batched=True)

    def flat(grads, count):
        if grads is None:
            return torch.zeros(count, sum(local_shard(p).numel() for p in params.values()))
        return torch.cat(
            [local_slice(grads[k], params[k]).reshape(count, -1).float() for k in params], 1
        )

    columns = torch.cat([flat(tgt, 1), flat(gen, n)]).double()
    return gram_and_writer(columns, params)


def own_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


def local_shard(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def local_rows(p: torch.Tensor) -> slice:
    """The rows (dim 0) of `p` this rank holds: all of them unless FSDP-sharded."""
    if not isinstance(p, DTensor):
        return slice(0, p.shape[0])
    world = p.device_mesh.size()
    rank = p.device_mesh.get_local_rank()
    chunk = math.ceil(p.shape[0] / world)
    start = min(rank * chunk, p.shape[0])
    stop = min(start + chunk, p.shape[0])
    if stop - start != p.to_local().shape[0]:
        raise RuntimeError(f"unexpected FSDP shard of shape {tuple(p.to_local().shape)} on rank {rank}")
    return slice(start, stop)


def local_slice(per_sample: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients (count, *p.shape) restricted to this rank's rows."""
    rows = local_rows(p)
    return per_sample[:, rows] if per_sample.ndim > 1 else per_sample


def set_grad(p: torch.Tensor, update: torch.Tensor) -> None:
    if isinstance(p, DTensor):
        local = update.to(p.dtype).reshape(p.to_local().shape).contiguous()
        p.grad = DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    else:
        p.grad = update.to(p.dtype).reshape(p.shape).contiguous()


def gram_and_writer(columns: torch.Tensor, params: dict[str, nn.Parameter]):
    """Gram matrix of the rows [g_T, g_1..g_n] of `columns` (one column block per parameter,
    in `params` order), and a writer that sets each parameter's grad to `coef @ columns`."""

    def write(coef):
        update = coef @ columns
        offset = 0
        for p in params.values():
            size = local_shard(p).numel()
            set_grad(p, update[offset : offset + size].view(local_shard(p).shape))
            offset += size

    return columns @ columns.T, write


def ghost_gram(
    xt: torch.Tensor, gt: torch.Tensor, xg: torch.Tensor, gg: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Gram of [g_T, g_1..g_n] for a Linear from token inputs and output gradients.

    With every token's input x and output gradient g stacked (target tokens first, then
    each general sample's T tokens), the per-sample gradient of a block of tokens is
    sum g x^T, so <block_a, block_b> = sum_{s in a, t in b} (x_s . x_t)(g_s . g_t): the
    block sums of (X X^T) * (G G^T), built a band of rows at a time and only on and above
    the diagonal (the lower part is the transpose).
    """
    n, T, _ = xg.shape
    x = torch.cat([xt, xg.reshape(-1, xg.shape[-1])])
    g = torch.cat([gt, gg.reshape(-1, gg.shape[-1])])
    block = torch.cat([torch.zeros(len(xt), dtype=torch.long), torch.arange(1, n + 1).repeat_interleave(T)])
    member = F.one_hot(block, n + 1).to(x.dtype)  # (N, n+1) token -> column
    upper = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    diagonal = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    band = max(1, min(chunk, math.ceil(len(x) / 4)))
    for start in range(0, len(x), band):
        stop = start + band
        products = (x[start:stop] @ x[start:].T) * (g[start:stop] @ g[start:].T)
        part = member[start:stop].T @ products[:, : stop - start] @ member[start:stop]
        diagonal += part.double()
        if stop < len(x):
            upper += (member[start:stop].T @ products[:, stop - start :] @ member[stop:]).double()
    return diagonal + upper + upper.T


def _set_linear_grad(module: nn.Linear, update: torch.Tensor) -> None:
    set_grad(module.weight, update[:, : module.in_features])
    if module.bias is not None:
        set_grad(module.bias, update[:, -1])


def _row_gram(rows: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """rows @ rows.T for a few very long rows, in column chunks (about twice as fast on
    CPUs as one skinny GEMM, which is memory bound)."""
    gram = torch.zeros(rows.shape[0], rows.shape[0], dtype=rows.dtype)
    for start in range(0, rows.shape[1], chunk):
        part = rows[:, start : start + chunk]
        gram.addmm_(part, part.T)
    return gram.double()


def _sq_norm(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    return torch.dot(flat, flat).item()


def _sketch_matrix(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(m, k) Gaussian with N(0, 1/k) entries, or the identity when m <= k (exact side)."""
    if m <= k:
        return torch.eye(m)
    return torch.randn(m, k, generator=gen) / math.sqrt(k)
