"""Context parallelism: attention over a sequence split across ranks, exact to one process.

Every function here takes the local contiguous sequence shard of q, k, v in layout
`(B, H, S_local, D)` (rank r of the group holds chunk r) and returns the local output
chunk. Three schemes:

- `ulysses_attention`: an all-to-all turns sequence shards into head shards, full
  attention runs locally through `common.attention`, a second all-to-all turns back.
  Heads must divide by the group size.
- `ring_attention`: K/V blocks travel round the ring (batched isend/irecv) while each
  rank attends its queries to the block it holds; partial outputs merge by their
  log-sum-exp. The backward is written by hand: it recomputes each block and sends the
  dK/dV accumulators round the ring until they are home. Only q, k, v, the output and
  the log-sum-exp are kept for backward, so memory is linear in the local length.
- `usp_attention`: both on a 2-D cp layout (Ulysses inside, ring across), see
  `build_cp_groups`.

Uneven lengths are padded to a multiple of the group size (`split_sequence`); passing
the true `seq_len` masks the padded keys, so padding is never attended to.

Gradient convention: after backward, the gradient of every local activation is exact,
and each rank's parameter gradient is the share of its own tokens; the true gradient
is the sum over the cp group (see `common.pair_parallel.reduce_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from common.attention import attention

__all__ = [
    "CPGroups",
    "all_gather_sum_grad",
    "build_cp_groups",
    "context_parallel_attention",
    "gather_sequence",
    "padded_length",
    "ring_attention",
    "split_sequence",
    "ulysses_attention",
    "usp_attention",
]


def _size_rank(group: ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------------------
# Sequence split / gather
# ----------------------------------------------------------------------------------------


def padded_length(seq_len: int, parts: int) -> int:
    """The smallest multiple of `parts` that holds `seq_len`."""
    return -(-seq_len // parts) * parts


def _pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _all_gather_cat(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    size, _ = _size_rank(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _local_chunk(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    size, rank = _size_rank(group)
    length = padded_length(x.shape[dim], size)
    return _pad_to(x, dim, length).chunk(size, dim=dim)[rank]


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, ctx.length = dim, group, x.shape[dim]
        return _local_chunk(x, dim, group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = _all_gather_cat(grad, ctx.dim, ctx.group)
        return full.narrow(ctx.dim, 0, ctx.length), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, seq_len):
        ctx.dim, ctx.group = dim, group
        full = _all_gather_cat(x, dim, group)
        return full if seq_len is None else full.narrow(dim, 0, seq_len).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _local_chunk(grad, ctx.dim, ctx.group).contiguous(), None, None, None


def split_sequence(
    x: torch.Tensor, dim: int, group: ProcessGroup | None = None, grad: str = "gather"
) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`, zero-padded to a multiple of the
    group size first (pass the true length as `seq_len` to the attention functions).

    `grad="gather"`: the backward all-gathers the chunks' gradients, so every rank gets the
    full gradient of `x` (for an `x` every rank holds alike and whose gradient every rank
    must hold in full). `grad="local"`: the backward is the plain adjoint of slicing
    (zeros outside the chunk); use it inside a model under the sum-over-cp gradient
    convention, where each rank's gradient is a share.
    """
    size, _ = _size_rank(group)
    if grad not in ("gather", "local"):
        raise ValueError(f"split_sequence: grad must be 'gather' or 'local', got {grad!r}")
    if size == 1:
        return x
    if grad == "local":
        return _local_chunk(x, dim, group)
    return _Split.apply(x, dim, group)


def gather_sequence(
    x: torch.Tensor, dim: int, group: ProcessGroup | None = None, seq_len: int | None = None
) -> torch.Tensor:
    """Concatenate the chunks of all ranks along `dim`, dropping padding past `seq_len`.

    The backward keeps this rank's chunk of the gradient (the loss that follows is
    computed alike on every rank, so each rank holds the full gradient).
    """
    size, _ = _size_rank(group)
    if size == 1:
        return x if seq_len is None else x.narrow(dim, 0, seq_len)
    return _Gather.apply(x, dim, group, seq_len)


class _GatherSum(torch.autograd.Function):
    """All-gather whose backward sums the gradients of all ranks (reduce-scatter): for a
    result used by a computation every rank repeats with its own share of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather_cat(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        size, rank = _size_rank(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


def all_gather_sum_grad(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather along `dim` under the sum-over-ranks gradient convention."""
    if _size_rank(group)[0] == 1:
        return x
    return _GatherSum.apply(x, dim, group)


# ----------------------------------------------------------------------------------------
# Ulysses
# ----------------------------------------------------------------------------------------


def _seq_to_heads(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """(B, H, S_local, D) sequence shard -> (B, H / P, P * S_local, D) head shard."""
    size, _ = _size_rank(group)
    b, h, s, d = x.shape
    send = x.reshape(b, size, h // size, s, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] is the sequence chunk of rank i for this rank's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * s, d)


def _heads_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """(B, H / P, P * S_local, D) head shard -> (B, H, S_local, D) sequence shard."""
    size, _ = _size_rank(group)
    b, hl, sp, d = x.shape
    send = x.reshape(b, hl, size, sp // size, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] is this rank's sequence chunk for the heads of rank i
    return recv.transpose(0, 1).reshape(b, hl * size, sp // size, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group), None


def _key_mask(
    q_len: int, k_len: int, causal: bool, q_start: int, k_start: int, seq_len: int | None, device
) -> torch.Tensor | None:
    """Boolean (q_len, k_len) mask of the pairs that must NOT attend, or None."""
    k_pos = torch.arange(k_len, device=device) + k_start
    mask = None
    if causal:
        q_pos = torch.arange(q_len, device=device) + q_start
        mask = k_pos[None, :] > q_pos[:, None]
    if seq_len is not None and k_start + k_len > seq_len:
        pad = (k_pos >= seq_len)[None, :].expand(q_len, k_len)
        mask = pad if mask is None else mask | pad
    return mask


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    if x.shape[1] == heads:
        return x
    if heads % x.shape[1]:
        raise ValueError(
            f"query heads ({heads}) must be a multiple of key/value heads ({x.shape[1]})"
        )
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _local_attention(q, k, v, causal: bool, seq_len: int | None, scale: float | None, lse: bool):
    """Full attention on one rank with padded keys masked; optionally with the LSE."""
    mask = _key_mask(q.shape[2], k.shape[2], causal, 0, 0, seq_len, q.device)
    if not lse and mask is None:
        return attention(q, k, v, causal=causal, scale=scale), None
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if not lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, scale=scale), None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out_lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v), out_lse


def _ulysses_kv(k: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """K/V heads must split evenly too; grouped K/V with too few heads are repeated."""
    if k.shape[1] % size == 0:
        return k
    return _repeat_kv(k, heads)


def _ulysses(q, k, v, group, causal, seq_len, scale, inner, return_lse):
    size, _ = _size_rank(group)
    heads = q.shape[1]
    if heads % size:
        raise ValueError(
            f"ulysses attention: the number of query heads ({heads}) must be divisible by "
            f"the Ulysses group size ({size}); use ring attention or a smaller Ulysses degree"
        )
    k, v = _ulysses_kv(k, heads, size), _ulysses_kv(v, heads, size)
    qh, kh, vh = (_SeqToHeads.apply(t.contiguous(), group) for t in (q, k, v))
    if inner is None:
        out, lse = _local_attention(qh, kh, vh, causal, seq_len, scale, return_lse)
    else:
        out, lse = inner(qh, kh, vh)
        lse = lse if return_lse else None
    out = _HeadsToSeq.apply(out.contiguous(), group)
    if lse is not None:
        lse = _HeadsToSeq.apply(lse.unsqueeze(-1).contiguous(), group).squeeze(-1)
    return out, lse


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup | None = None,
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Ulysses (all-to-all) attention over the sequence shards of `group`.

    q `(B, H, S_local, D)`, k/v `(B, H_kv, S_local, D)` with H divisible by the group size.
    `seq_len`: the true global length when the shards carry padding at the end.
    """
    if _size_rank(group)[0] == 1:
        return _local_attention(q, k, v, causal, seq_len, scale, False)[0]
    return _ulysses(q, k, v, group, causal, seq_len, scale, None, False)[0]


# ----------------------------------------------------------------------------------------
# Ring
# ----------------------------------------------------------------------------------------


def _ring_shift(tensors: list[torch.Tensor], group: ProcessGroup | None) -> list:
    """Start sending each tensor to the next rank and receiving from the previous one."""
    size, rank = _size_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size) if group is not None else (rank + 1) % size
    prv = dist.get_global_rank(group, (rank - 1) % size) if group is not None else (rank - 1) % size
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t, nxt, group))
        ops.append(dist.P2POp(dist.irecv, r, prv, group))
    return [dist.batch_isend_irecv(ops), received]


def _wait(pending) -> list[torch.Tensor]:
    works, received = pending
    for w in works:
        w.wait()
    return received


def _block_scores(q, k, scale, causal_block, q_start, k_start, seq_len):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = _key_mask(q.shape[2], k.shape[2], causal_block, q_start, k_start, seq_len, q.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def _block_visible(causal: bool, block: int, rank: int) -> bool:
    return not causal or block <= rank


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, seq_len, scale):
        size, rank = _size_rank(group)
        b, h, s, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 or better
        qf = q.to(acc)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(size):
            block = (rank - step) % size
            pending = _ring_shift([kv], group) if step < size - 1 else None
            if _block_visible(causal, block, rank):
                kb = _repeat_kv(kv[0].to(acc), h)
                vb = _repeat_kv(kv[1].to(acc), h)
                scores = _block_scores(
                    qf, kb, scale, causal and block == rank, rank * s, block * s, seq_len
                )
                block_lse = torch.logsumexp(scores, dim=-1)
                new_lse = torch.logaddexp(lse, block_lse)
                safe = torch.where(torch.isfinite(new_lse), new_lse, torch.zeros_like(new_lse))
                probs = torch.exp(scores - safe.unsqueeze(-1))
                out = out * torch.exp(lse - safe).unsqueeze(-1) + torch.matmul(probs, vb)
                lse = new_lse
            if pending is not None:
                (kv,) = _wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.seq_len, ctx.scale = group, causal, seq_len, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, seq_len, scale = ctx.group, ctx.causal, ctx.seq_len, ctx.scale
        size, rank = _size_rank(group)
        b, h, s, d = q.shape
        hk = k.shape[1]
        acc = lse.dtype
        qf, dout = q.to(acc), grad_out.to(acc)
        # d lse / d scores = probs, so a gradient on lse shifts the softmax-backward term
        delta = (dout * out.to(acc)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        for step in range(size):
            block = (rank - step) % size
            if _block_visible(causal, block, rank):
                kb = _repeat_kv(kv[0].to(acc), h)
                vb = _repeat_kv(kv[1].to(acc), h)
                scores = _block_scores(
                    qf, kb, scale, causal and block == rank, rank * s, block * s, seq_len
                )
                probs = torch.exp(scores - safe_lse)
                dv = torch.matmul(probs.transpose(-1, -2), dout)
                dscores = probs * (torch.matmul(dout, vb.transpose(-1, -2)) - delta.unsqueeze(-1))
                dq += torch.matmul(dscores, kb) * scale
                dk = torch.matmul(dscores.transpose(-1, -2), qf) * scale
                if hk != h:  # grouped K/V: sum the gradients of the query heads sharing one
                    dk = dk.reshape(b, hk, h // hk, s, d).sum(2)
                    dv = dv.reshape(b, hk, h // hk, s, d).sum(2)
                dkv[0] += dk
                dkv[1] += dv
            if size > 1:
                # the accumulators follow their K/V block; after `size` shifts they are home
                tensors = [dkv] if step == size - 1 else [kv, dkv]
                received = _wait(_ring_shift(tensors, group))
                if step == size - 1:
                    (dkv,) = received
                else:
                    kv, dkv = received
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None)


def _ring(q, k, v, group, causal, seq_len, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, group, causal, seq_len, scale)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup | None = None,
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Ring attention over the sequence shards of `group`; any head count, GQA K/V.

    q `(B, H, S_local, D)`, k/v `(B, H_kv, S_local, D)`; every rank holds the same S_local.
    `seq_len`: the true global length when the shards carry padding at the end.
    """
    return _ring(q, k, v, group, causal, seq_len, scale)[0]


# ----------------------------------------------------------------------------------------
# Hybrid (USP) and dispatch
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPGroups:
    """The process groups of one context-parallel layout.

    `ulysses` and `ring` are the two axes of the cp group (None where the axis has size 1):
    cp rank = ring_index * ulysses_size + ulysses_index, so that the shards a Ulysses group
    joins are neighbours and form one contiguous ring block. `cp` is the whole cp group,
    used to split and gather sequences.
    """

    cp: ProcessGroup | None
    ulysses: ProcessGroup | None = None
    ring: ProcessGroup | None = None

    @property
    def size(self) -> int:
        return 1 if self.cp is None else _size_rank(self.cp)[0]

    @property
    def rank(self) -> int:
        return 0 if self.cp is None else _size_rank(self.cp)[1]


def build_cp_groups(
    mesh: DeviceMesh | None, ulysses: int | None = None, dim: str = "cp"
) -> CPGroups:
    """Split the `dim` axis of `mesh` into Ulysses (inner) x ring (outer) groups.

    `ulysses=None` (or equal to the cp size) is pure Ulysses; `ulysses=1` is pure ring.
    Must be called on every rank of the world (it creates process groups). Without a
    mesh (one process) there is no cp group.
    """
    if mesh is None:
        return CPGroups(cp=None)
    cp_mesh = mesh[dim]
    cp_size = cp_mesh.size()
    ulysses = cp_size if ulysses is None else ulysses
    if ulysses < 1 or cp_size % ulysses:
        raise ValueError(f"ulysses degree {ulysses} must divide the cp size {cp_size}")
    cp_group = cp_mesh.get_group() if cp_size > 1 else None
    if ulysses in (1, cp_size):
        return CPGroups(
            cp=cp_group,
            ulysses=cp_group if ulysses == cp_size else None,
            ring=cp_group if ulysses == 1 else None,
        )
    ring_size = cp_size // ulysses
    names = list(mesh.mesh_dim_names)
    axis = names.index(dim)
    # every cp group of the world as rows of global ranks, the same order on every rank
    rows = mesh.mesh.movedim(axis, -1).reshape(-1, cp_size).tolist()
    me = dist.get_rank()
    uly_group = ring_group = None
    for row in rows:
        grid = [row[i * ulysses : (i + 1) * ulysses] for i in range(ring_size)]
        for ranks in grid:
            g = dist.new_group(ranks)
            if me in ranks:
                uly_group = g
        for j in range(ulysses):
            ranks = [grid[i][j] for i in range(ring_size)]
            g = dist.new_group(ranks)
            if me in ranks:
                ring_group = g
    return CPGroups(cp=cp_group, ulysses=uly_group, ring=ring_group)


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ulysses_group: ProcessGroup | None,
    ring_group: ProcessGroup | None,
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Hybrid attention: Ulysses all-to-all inside `ulysses_group`, ring across `ring_group`."""
    groups = CPGroups(cp=None, ulysses=ulysses_group, ring=ring_group)
    return context_parallel_attention(q, k, v, groups, causal, seq_len, scale)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: CPGroups | None,
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over sequence shards with the layout of `groups` (Ulysses, ring or both).

    Returns the local output chunk, or `(out, lse)` with `return_lse=True` (lse `(B, H,
    S_local)`, at least float32, differentiable), which joint text+video attention needs to merge
    with attention over replicated keys.
    """
    # here None means "no such axis", not torch's default world group
    uly = groups.ulysses if groups is not None else None
    ring = groups.ring if groups is not None else None
    uly = uly if uly is not None and _size_rank(uly)[0] > 1 else None
    ring = ring if ring is not None and _size_rank(ring)[0] > 1 else None

    def ring_inner(qh, kh, vh):
        return _ring(qh, kh, vh, ring, causal, seq_len, scale)

    if uly is not None:
        out, lse = _ulysses(
            q, k, v, uly, causal, seq_len, scale, ring_inner if ring is not None else None,
            return_lse,
        )
    elif ring is not None:
        out, lse = ring_inner(q, k, v)
    else:
        out, lse = _local_attention(q, k, v, causal, seq_len, scale, return_lse)
    return (out, lse) if return_lse else out
