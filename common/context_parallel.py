"""Context parallelism: attention over a sequence split across ranks, exact to one process.

Every function here takes the local sequence shard of q, k, v in layout `(B, H, S_local,
D)` and returns the local output shard. How the sequence was split is the `layout`:
`contiguous` (rank r holds chunk r of W) or `zigzag` (2W chunks, rank r holds chunks r
and 2W-1-r, so that causal attention costs every rank the same). Three schemes:

- `ulysses_attention`: an all-to-all turns sequence shards into head shards, full
  attention runs locally through `common.attention`, a second all-to-all turns back.
  Heads must divide by the group size.
- `ring_attention`: K/V blocks travel round the ring (batched isend/irecv) while each
  rank attends its queries to the block it holds, on a kernel that returns the
  log-sum-exp and never materialises the score matrix (`common.attention.lse_kernel`:
  aten's CPU flash op on the CPU; flash-attn or torch's fused ops on CUDA); partial
  outputs merge by their log-sum-exp. The backward recomputes each block with the
  kernel's backward from the merged output and log-sum-exp (as ring-flash-attn does)
  and sends the dK/dV accumulators round the ring until they are home. Only q, k, v,
  the output and the log-sum-exp are kept for backward.
- `usp_attention`: both on a 2-D cp layout (Ulysses inside, ring across), see
  `build_cp_groups`.

Uneven lengths are padded at the end (`split_sequence`); passing the true `seq_len`
leaves the padded keys (and queries) out, so padding is never attended to.

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

from common.attention import (
    attention,
    attention_with_lse,
    lse_backward,
    lse_forward,
    lse_kernel,
    repeat_kv,
    sum_kv_groups,
)

__all__ = [
    "LAYOUTS",
    "CPGroups",
    "all_gather_sum_grad",
    "build_cp_groups",
    "context_parallel_attention",
    "gather_sequence",
    "padded_length",
    "ring_attention",
    "shard_positions",
    "split_sequence",
    "ulysses_attention",
    "usp_attention",
    "valid_length",
]

LAYOUTS = ("contiguous", "zigzag")


def _size_rank(group: ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------------------
# Sequence layouts, split / gather
# ----------------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"sequence layout must be one of {LAYOUTS}, got {layout!r}")


def _num_chunks(size: int, layout: str) -> int:
    return 2 * size if layout == "zigzag" else size


def _chunks_of(rank: int, size: int, layout: str) -> list[int]:
    """The global chunks rank `rank` holds, in the order it holds them."""
    return [rank, 2 * size - 1 - rank] if layout == "zigzag" else [rank]


def shard_positions(rank: int, size: int, local_len: int, layout: str) -> list[tuple[int, int]]:
    """`(start, length)` of each run of global positions in rank `rank`'s shard."""
    chunks = _chunks_of(rank, size, layout)
    length = local_len // len(chunks)
    return [(chunk * length, length) for chunk in chunks]


def valid_length(rank: int, size: int, local_len: int, layout: str, seq_len: int | None) -> int:
    """How many leading tokens of rank `rank`'s shard are not padding. Padding is the end
    of the global sequence and a shard's positions increase, so it is always a prefix."""
    if seq_len is None:
        return local_len
    runs = shard_positions(rank, size, local_len, layout)
    return sum(max(0, min(length, seq_len - start)) for start, length in runs)


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


def _natural_order(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """The shards of all ranks (rank order) put back into global sequence order."""
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    halves = [p.chunk(2, dim=dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


def _all_gather_cat(
    x: torch.Tensor, dim: int, group: ProcessGroup | None, layout: str = "contiguous"
) -> torch.Tensor:
    size, _ = _size_rank(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return _natural_order(parts, dim, layout)


def _local_chunk(x: torch.Tensor, dim: int, group: ProcessGroup | None, layout: str) -> torch.Tensor:
    size, rank = _size_rank(group)
    parts = _num_chunks(size, layout)
    chunks = _pad_to(x, dim, padded_length(x.shape[dim], parts)).chunk(parts, dim=dim)
    mine = [chunks[i] for i in _chunks_of(rank, size, layout)]
    return mine[0] if len(mine) == 1 else torch.cat(mine, dim=dim)


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, layout):
        ctx.dim, ctx.group, ctx.length, ctx.layout = dim, group, x.shape[dim], layout
        return _local_chunk(x, dim, group, layout).contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = _all_gather_cat(grad, ctx.dim, ctx.group, ctx.layout)
        return full.narrow(ctx.dim, 0, ctx.length), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, seq_len, layout):
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        full = _all_gather_cat(x, dim, group, layout)
        return full if seq_len is None else full.narrow(dim, 0, seq_len).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _local_chunk(grad, ctx.dim, ctx.group, ctx.layout).contiguous(), None, None, None, None


def split_sequence(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup | None = None,
    grad: str = "gather",
    layout: str = "contiguous",
) -> torch.Tensor:
    """This rank's shard of `x` along `dim`, zero-padded first to a multiple of the group
    size (contiguous) or of twice the group size (zigzag); pass the true length as
    `seq_len` to the attention functions.

    `layout="contiguous"`: rank r holds chunk r of W. `layout="zigzag"`: the sequence is
    cut into 2W chunks and rank r holds chunks r and 2W-1-r, so that under a causal mask
    every rank attends to the same number of keys (load-balanced ring attention).

    `grad="gather"`: the backward all-gathers the chunks' gradients, so every rank gets the
    full gradient of `x` (for an `x` every rank holds alike and whose gradient every rank
    must hold in full). `grad="local"`: the backward is the plain adjoint of slicing
    (zeros outside the shard); use it inside a model under the sum-over-cp gradient
    convention, where each rank's gradient is a share.
    """
    size, _ = _size_rank(group)
    _check_layout(layout)
    if grad not in ("gather", "local"):
        raise ValueError(f"split_sequence: grad must be 'gather' or 'local', got {grad!r}")
    if size == 1:
        return x
    if grad == "local":
        return _local_chunk(x, dim, group, layout)
    return _Split.apply(x, dim, group, layout)


def gather_sequence(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup | None = None,
    seq_len: int | None = None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """The whole sequence from every rank's shard (in `layout`), dropping padding past
    `seq_len`.

    The backward keeps this rank's shard of the gradient (the loss that follows is
    computed alike on every rank, so each rank holds the full gradient).
    """
    size, _ = _size_rank(group)
    _check_layout(layout)
    if size == 1:
        return x if seq_len is None else x.narrow(dim, 0, seq_len)
    return _Gather.apply(x, dim, group, seq_len, layout)


# The autograd collectives below (`_Split`, `_GatherSum`, `_SeqToHeads`, `_HeadsToSeq`) stay
# our own: `torch.distributed.nn.functional`'s all_gather / all_to_all_single are deprecated
# in torch 2.13 (a FutureWarning on every call, pointing at the private
# `_functional_collectives`), and their all_gather backward emulates reduce-scatter on gloo
# with an all-to-all and a sum (`tests/common/test_context_parallel.py` shows the warning).
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
    """All-gather along `dim` (rank order) under the sum-over-ranks gradient convention."""
    if _size_rank(group)[0] == 1:
        return x
    return _GatherSum.apply(x, dim, group)


# ----------------------------------------------------------------------------------------
# Local attention with padded keys left out
# ----------------------------------------------------------------------------------------


def _local_attention(q, k, v, causal, seq_len, scale, return_lse, backend):
    """Full attention on one rank over a sequence in global order; the queries and keys
    past `seq_len` (padding) are left out, padded queries get zeros (and lse -inf)."""
    length = q.shape[2]
    valid = length if seq_len is None else min(seq_len, length)
    if valid < length:
        q, k, v = q[:, :, :valid], k[:, :, :valid], v[:, :, :valid]
    if return_lse:
        out, lse = attention_with_lse(q, k, v, causal=causal, scale=scale, backend=backend)
    else:
        out, lse = attention(q, k, v, causal=causal, backend=backend, scale=scale), None
    if valid < length:
        out = F.pad(out, (0, 0, 0, length - valid))
        if lse is not None:
            lse = F.pad(lse, (0, length - valid), value=float("-inf"))
    return out, lse


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


def _zigzag_order(size: int, local_len: int, device) -> torch.Tensor:
    """Index that turns the Ulysses-gathered shards of a zigzag layout (rank order, each
    [first half, second half]) into order: first halves by rank, then second halves in
    reverse rank order. For pure Ulysses that is global order; inside USP it is the
    zigzag shard of the ring (see `usp_attention`)."""
    half = local_len // 2
    starts = [r * local_len for r in range(size)] + [r * local_len + half for r in reversed(range(size))]
    return torch.cat([torch.arange(s, s + half, device=device) for s in starts])


def _ulysses_kv(k: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """K/V heads must split evenly too; grouped K/V with too few heads are repeated."""
    if k.shape[1] % size == 0:
        return k
    return repeat_kv(k, heads)


def _ulysses(q, k, v, group, causal, seq_len, scale, inner, return_lse, layout, backend):
    size, _ = _size_rank(group)
    heads = q.shape[1]
    if heads % size:
        raise ValueError(
            f"ulysses attention: the number of query heads ({heads}) must be divisible by "
            f"the Ulysses group size ({size}); use ring attention or a smaller Ulysses degree"
        )
    k, v = _ulysses_kv(k, heads, size), _ulysses_kv(v, heads, size)
    qh, kh, vh = (_SeqToHeads.apply(t.contiguous(), group) for t in (q, k, v))
    order = None
    if layout == "zigzag":
        order = _zigzag_order(size, q.shape[2], q.device)
        qh, kh, vh = (t.index_select(2, order) for t in (qh, kh, vh))
    if inner is None:
        out, lse = _local_attention(qh, kh, vh, causal, seq_len, scale, return_lse, backend)
    else:
        out, lse = inner(qh, kh, vh)
        lse = lse if return_lse else None
    if order is not None:
        back = torch.argsort(order)
        out = out.index_select(2, back)
        lse = None if lse is None else lse.index_select(2, back)
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
    layout: str = "contiguous",
    backend: str = "auto",
) -> torch.Tensor:
    """Ulysses (all-to-all) attention over the sequence shards of `group`.

    q `(B, H, S_local, D)`, k/v `(B, H_kv, S_local, D)` with H divisible by the group size.
    `seq_len`: the true global length when the shards carry padding at the end.
    `layout`: how the sequence was split (`split_sequence`).
    """
    _check_layout(layout)
    if _size_rank(group)[0] == 1:
        return _local_attention(q, k, v, causal, seq_len, scale, False, backend)[0]
    return _ulysses(q, k, v, group, causal, seq_len, scale, None, False, layout, backend)[0]


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


def _ring_blocks(rank: int, source: int, size: int, s: int, layout: str, causal: bool):
    """The (query slice, key slice, causal) pieces of the attention of rank `rank`'s
    queries to the K/V shard of rank `source`. Only square diagonal pieces are causal."""
    if not causal:
        return [(0, s, 0, s, False)]
    if source == rank:
        return [(0, s, 0, s, True)]
    if layout == "contiguous":
        return [(0, s, 0, s, False)] if source < rank else []
    half = s // 2  # zigzag: chunks (rank, 2W-1-rank) against (source, 2W-1-source)
    if source < rank:  # every query sees the source's early chunk, none its late one
        return [(0, s, 0, half, False)]
    return [(half, s, 0, s, False)]  # only the late query chunk sees the source, all of it


def _ring_pieces(rank, source, size, s, layout, causal, seq_len):
    """`_ring_blocks` cut to the valid (non-padding) queries and keys; empty ones dropped."""
    q_valid = valid_length(rank, size, s, layout, seq_len)
    k_valid = valid_length(source, size, s, layout, seq_len)
    pieces = []
    for q0, q1, k0, k1, piece_causal in _ring_blocks(rank, source, size, s, layout, causal):
        q1, k1 = min(q1, q_valid), min(k1, k_valid)
        if q0 < q1 and k0 < k1:
            pieces.append((slice(q0, q1), slice(k0, k1), piece_causal))
    return pieces


def _merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """In place: fold one block's (out, lse) into the running (out, lse)."""
    new_lse = torch.logaddexp(lse, block_lse.to(lse.dtype))
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out.to(out.dtype) * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, seq_len, scale, layout, kernel):
        size, rank = _size_rank(group)
        b, h, s, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # merge in fp32 or better
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(size):
            source = (rank - step) % size
            pending = _ring_shift([kv], group) if step < size - 1 else None
            for qs, ks, piece_causal in _ring_pieces(rank, source, size, s, layout, causal, seq_len):
                block_out, block_lse = lse_forward(
                    q[:, :, qs].contiguous(),
                    repeat_kv(kv[0][:, :, ks], h).contiguous(),
                    repeat_kv(kv[1][:, :, ks], h).contiguous(),
                    piece_causal, scale, kernel,
                )
                _merge_into(out[:, :, qs], lse[:, :, qs], block_out, block_lse)
            if pending is not None:
                (kv,) = _wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.seq_len, ctx.scale = group, causal, seq_len, scale
        ctx.layout, ctx.kernel = layout, kernel
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        size, rank = _size_rank(ctx.group)
        h, hk, s = q.shape[1], k.shape[1], q.shape[2]
        acc = lse.dtype
        dout = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype).contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        for step in range(size):
            source = (rank - step) % size
            pieces = _ring_pieces(rank, source, size, s, ctx.layout, ctx.causal, ctx.seq_len)
            for qs, ks, piece_causal in pieces:
                # recomputed from the merged out and lse: this block's exact share
                dq_b, dk_b, dv_b = lse_backward(
                    dout[:, :, qs].contiguous(),
                    q[:, :, qs].contiguous(),
                    repeat_kv(kv[0][:, :, ks], h).contiguous(),
                    repeat_kv(kv[1][:, :, ks], h).contiguous(),
                    out[:, :, qs].contiguous(),
                    lse[:, :, qs].contiguous(),
                    piece_causal, ctx.scale, ctx.kernel,
                    None if grad_lse is None else grad_lse[:, :, qs].contiguous(),
                )
                dq[:, :, qs] += dq_b
                dkv[0][:, :, ks] += sum_kv_groups(dk_b, hk)
                dkv[1][:, :, ks] += sum_kv_groups(dv_b, hk)
            if size > 1:
                # the accumulators follow their K/V block; after `size` shifts they are home
                tensors = [dkv] if step == size - 1 else [kv, dkv]
                received = _wait(_ring_shift(tensors, ctx.group))
                if step == size - 1:
                    (dkv,) = received
                else:
                    kv, dkv = received
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), *([None] * 6)


def _ring(q, k, v, group, causal, seq_len, scale, layout="contiguous", backend="auto"):
    _check_layout(layout)
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"zigzag ring attention: the local length ({q.shape[2]}) must be even")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel = lse_kernel(q.device, q.dtype, backend)
    return _RingAttention.apply(q, k, v, group, causal, seq_len, scale, layout, kernel)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup | None = None,
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
    layout: str = "contiguous",
    backend: str = "auto",
) -> torch.Tensor:
    """Ring attention over the sequence shards of `group`; any head count, GQA K/V.

    q `(B, H, S_local, D)`, k/v `(B, H_kv, S_local, D)`; every rank holds the same S_local.
    `seq_len`: the true global length when the shards carry padding at the end.
    `layout`: how the sequence was split (`split_sequence`); with a causal mask, `zigzag`
    gives every rank the same work. Blocks run on `common.attention.lse_kernel`'s kernel.
    """
    return _ring(q, k, v, group, causal, seq_len, scale, layout, backend)[0]


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
    layout: str = "contiguous",
    backend: str = "auto",
) -> torch.Tensor:
    """Hybrid attention: Ulysses all-to-all inside `ulysses_group`, ring across `ring_group`.

    With the zigzag layout over the whole cp group, the Ulysses gather of ring index i,
    reordered (first halves, then second halves reversed), is exactly chunks i and
    2R-1-i of a zigzag split over the R ring ranks, so the ring runs zigzag too.
    """
    groups = CPGroups(cp=None, ulysses=ulysses_group, ring=ring_group)
    return context_parallel_attention(q, k, v, groups, causal, seq_len, scale, layout=layout,
                                      backend=backend)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: CPGroups | None,
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    layout: str = "contiguous",
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over sequence shards with the groups of `groups` (Ulysses, ring or both),
    split in `layout` (`split_sequence`).

    Returns the local output shard, or `(out, lse)` with `return_lse=True` (lse `(B, H,
    S_local)`, at least float32, differentiable; -inf on padded queries), which joint
    text+video attention needs to merge with attention over replicated keys.
    """
    _check_layout(layout)
    # here None means "no such axis", not torch's default world group
    uly = groups.ulysses if groups is not None else None
    ring = groups.ring if groups is not None else None
    uly = uly if uly is not None and _size_rank(uly)[0] > 1 else None
    ring = ring if ring is not None and _size_rank(ring)[0] > 1 else None

    def ring_inner(qh, kh, vh):
        return _ring(qh, kh, vh, ring, causal, seq_len, scale, layout, backend)

    if uly is not None:
        out, lse = _ulysses(
            q, k, v, uly, causal, seq_len, scale, ring_inner if ring is not None else None,
            return_lse, layout, backend,
        )
    elif ring is not None:
        out, lse = ring_inner(q, k, v)
    else:
        out, lse = _local_attention(q, k, v, causal, seq_len, scale, return_lse, backend)
    return (out, lse) if return_lse else out
