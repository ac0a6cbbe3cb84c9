"""Ulysses, ring (contiguous and zigzag) and hybrid attention on real gloo processes equal
full attention on one, with padding and grouped K/V; ring attention's memory stays near
Ulysses' (fused blocks, no score matrix).

The reference is plain softmax attention in float64 on the whole sequence, written here.
Each world size runs in one spawn (starting processes is the slow part).
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from common.context_parallel import (
    CPGroups,
    build_cp_groups,
    context_parallel_attention,
    gather_sequence,
    ring_attention,
    split_sequence,
    ulysses_attention,
    usp_attention,
)
from common.distributed import ParallelDims, build_mesh
from tests.multiproc import run_on_ranks

# (batch, query heads, key/value heads, global length, head dim); lengths 7 and 6 leave
# padding on 2 and 4 ranks, in either layout
SHAPES = [(2, 4, 4, 8, 8), (1, 4, 2, 12, 4), (2, 4, 1, 6, 8), (1, 4, 2, 7, 4)]
CASES = [(shape, causal) for shape in SHAPES for causal in (False, True)]
# three query heads: ring attention takes any head count
RING_ONLY = [((1, 3, 3, 7, 4), False), ((1, 3, 1, 5, 4), True), ((2, 3, 3, 9, 4), True)]
TOL = 1e-5


def _inputs(shape, seed):
    b, h, hk, s, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hk, s, d, generator=g)
    v = torch.randn(b, hk, s, d, generator=g)
    w = torch.randn(b, h, s, d, generator=g)  # loss weights: loss = sum(out * w)
    return q, k, v, w


def _reference(shape, seed, causal):
    """Plain softmax attention in float64 on the whole sequence, with q/k/v gradients."""
    q, k, v, w = (t.double() for t in _inputs(shape, seed))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ kr.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ vr
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _assemble(shards: list[torch.Tensor], layout: str, length: int) -> torch.Tensor:
    """The whole sequence (dim 2) from the ranks' shards, written independently of
    `gather_sequence`: zigzag rank r holds chunks r and 2W-1-r."""
    if layout == "contiguous":
        return torch.cat(shards, dim=2)[:, :, :length]
    world = len(shards)
    chunks: list[torch.Tensor | None] = [None] * (2 * world)
    for r, shard in enumerate(shards):
        chunks[r], chunks[2 * world - 1 - r] = shard.chunk(2, dim=2)
    return torch.cat(chunks, dim=2)[:, :, :length]


def _local_run(fn, shape, seed, causal, layout):
    """Run `fn` on this rank's shard; returns local out and grads (padding included)."""
    q, k, v, w = _inputs(shape, seed)
    seq_len = q.shape[2]
    q, k, v, w = (split_sequence(t, 2, None, layout=layout) for t in (q, k, v, w))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal, seq_len)
    (out * w).sum().backward()  # w is zero on padding, so padded queries do not count
    return out.detach(), q.grad, k.grad, v.grad


def _mode_fn(mode: str, layout: str, groups: CPGroups | None):
    if mode == "ulysses":
        return lambda q, k, v, c, n: ulysses_attention(q, k, v, causal=c, seq_len=n, layout=layout)
    if mode == "ring":
        return lambda q, k, v, c, n: ring_attention(q, k, v, causal=c, seq_len=n, layout=layout)
    return lambda q, k, v, c, n: usp_attention(
        q, k, v, groups.ulysses, groups.ring, causal=c, seq_len=n, layout=layout
    )


def _modes(world_size: int) -> list[tuple[str, str]]:
    modes = [(m, lay) for m in ("ulysses", "ring") for lay in ("contiguous", "zigzag")]
    if world_size == 4:
        modes += [("usp", "contiguous"), ("usp", "zigzag")]
    return modes


def _cases(mode: str) -> list:
    return CASES + (RING_ONLY if mode == "ring" else [])


def _attention_worker(rank, world_size):
    """Every (mode, layout, case) of this world size: local outputs and gradients."""
    groups = None
    if world_size == 4:
        groups = build_cp_groups(build_mesh(ParallelDims(cp=world_size)), ulysses=2)
    results = {}
    for mode, layout in _modes(world_size):
        fn = _mode_fn(mode, layout, groups)
        results[mode, layout] = [_local_run(fn, shape, 7, causal, layout) for shape, causal in _cases(mode)]
    return results


def _check(results, world_size):
    for mode, layout in _modes(world_size):
        for index, (shape, causal) in enumerate(_cases(mode)):
            ref = _reference(shape, 7, causal)
            for name, i in (("out", 0), ("dq", 1), ("dk", 2), ("dv", 3)):
                full = _assemble([results[r][mode, layout][index][i] for r in range(world_size)],
                                 layout, shape[3])
                err = (full.double() - ref[i]).abs().max() / ref[i].abs().max()
                assert err < TOL, f"{mode}/{layout} {name} {shape} causal={causal}: relative error {err:.2e}"


def _lse_worker(rank, world_size, causal):
    """context_parallel_attention(return_lse=True): out and lse, with gradients through both."""
    out = {}
    for mode in ("ulysses", "ring"):
        for layout in ("contiguous", "zigzag"):
            q, k, v, w = _inputs((1, 2, 2, 8, 4), 3)
            wl = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(4))
            q, k, v, w, wl = (split_sequence(t, 2, None, layout=layout) for t in (q, k, v, w, wl))
            q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
            groups = CPGroups(cp=dist.group.WORLD, **{mode: dist.group.WORLD})
            o, lse = context_parallel_attention(q, k, v, groups, causal, return_lse=True, layout=layout)
            grads = torch.autograd.grad((o * w).sum() + (lse * wl).sum(), (q, k, v))
            out[mode, layout] = (o.detach(), lse.detach().unsqueeze(-1), *grads)
    return out


def _split_gather_worker(rank, world_size):
    out = {}
    for layout in ("contiguous", "zigzag"):
        x = torch.arange(10.0).reshape(1, 5, 2).requires_grad_()
        local = split_sequence(x, 1, None, layout=layout)  # padded to 6 (contiguous) or 8
        y = gather_sequence(local * (rank + 1.0) / (rank + 1.0), 1, None, seq_len=5, layout=layout)
        (y * torch.arange(10.0).reshape(1, 5, 2)).sum().backward()
        out[layout] = (local.detach(), y.detach(), x.grad)
    return out


def _bad_heads_worker(rank, world_size):
    q = torch.randn(1, 3, 2, 4)
    try:
        ulysses_attention(q, q, q)
    except ValueError as e:
        return str(e)
    return ""


def _peak_worker(rank, world_size, mode: str, local_len: int) -> float:
    """Peak memory (MiB above the baseline) of one attention forward + backward at
    `local_len` tokens a rank, B 1, H 4, D 32, fp32 (ENVIRONMENT.md's VmHWM method)."""
    import gc

    from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory

    g = torch.Generator().manual_seed(rank)
    q, k, v, w = (torch.randn(1, 4, local_len, 32, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = ulysses_attention if mode == "ulysses" else ring_attention
    small = [t[:, :, :64].detach().clone().requires_grad_() for t in (q, k, v)]
    (fn(*small) * w[:, :, :64]).sum().backward()  # warm-up: kernels, pools
    gc.collect()
    dist.barrier()
    reset_peak_memory()
    baseline = current_memory_mb()
    (fn(q, k, v) * w).sum().backward()
    peak = peak_memory_mb() - baseline
    dist.barrier()
    return peak


def _peaks_worker(rank, world_size):
    return {mode: _peak_worker(rank, world_size, mode, 4096) for mode in ("ulysses", "ring")}


def _two_rank_worker(rank, world_size):
    """Every quick two-rank check in one spawn."""
    return {
        "attention": _attention_worker(rank, world_size),
        "lse": [_lse_worker(rank, world_size, causal) for causal in (False, True)],
        "split_gather": _split_gather_worker(rank, world_size),
        "bad_heads": _bad_heads_worker(rank, world_size),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(_two_rank_worker, 2)


def test_two_ranks_match_full_attention(two_ranks):
    # (2, 4, 1, ...): one K/V head, fewer than ranks, so Ulysses must repeat it
    _check([r["attention"] for r in two_ranks], 2)


@pytest.mark.slow
def test_four_ranks_match_full_attention():
    """Ulysses, ring and USP (2 x 2), contiguous and zigzag, on 4 processes."""
    _check(run_on_ranks(_attention_worker, 4), 4)


@pytest.mark.slow
def test_ring_memory_stays_near_ulysses():
    """S_local 4096: ring's fused blocks keep no 4096 x 4096 score matrix (64 MiB a head
    in fp32); ring's peak is at most 2x Ulysses' + 16 MiB on every rank (measured here:
    37 MiB against 19; plain-math blocks peaked at 1,306 MiB)."""
    # glibc reads the malloc setting at process start: set it before the spawn
    with mock.patch.dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"):
        peaks = run_on_ranks(_peaks_worker, 2)
    for rank, result in enumerate(peaks):
        ring, ulysses = result["ring"], result["ulysses"]
        assert ring <= 2 * ulysses + 16, f"rank {rank}: ring {ring:.1f} MiB, Ulysses {ulysses:.1f} MiB"


def test_lse_and_its_gradient(two_ranks):
    for c, causal in enumerate((False, True)):
        results = [r["lse"][c] for r in two_ranks]
        q, k, v, w = (t.double() for t in _inputs((1, 2, 2, 8, 4), 3))
        wl = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(4)).double()
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / 2.0
        if causal:
            scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        o, lse = scores.softmax(-1) @ v, scores.logsumexp(-1)
        ref = (o, lse.unsqueeze(-1), *torch.autograd.grad((o * w).sum() + (lse * wl).sum(), (q, k, v)))
        for key in results[0]:
            for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
                full = _assemble([results[r][key][i] for r in range(2)], key[1], 8).double()
                err = (full - ref[i].detach()).abs().max() / ref[i].abs().max()
                assert err < TOL, f"{key} {name} causal={causal}: relative error {err:.2e}"


def test_split_gather_round_trip_and_gradients(two_ranks):
    x = torch.arange(10.0).reshape(1, 5, 2)
    # contiguous: padded to 6, 3 rows each; zigzag: padded to 8, chunks of 2 rows,
    # rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    padded = torch.cat([x, torch.zeros(1, 3, 2)], 1)
    expected = {
        "contiguous": [padded[:, :3], padded[:, 3:6]],
        "zigzag": [torch.cat([padded[:, 0:2], padded[:, 6:8]], 1), padded[:, 2:6]],
    }
    for layout, shards in expected.items():
        for rank, result in enumerate(two_ranks):
            local, y, grad = result["split_gather"][layout]
            assert torch.equal(local, shards[rank]), f"{layout} rank {rank}"
            assert torch.equal(y, x)
            # every rank holds the whole gradient of the replicated input
            assert torch.equal(grad, x)


def test_ulysses_rejects_heads_not_divisible(two_ranks):
    messages = [r["bad_heads"] for r in two_ranks]
    assert all("heads (3) must be divisible by the Ulysses group size (2)" in m for m in messages)


def _library_collectives_warn(rank, world_size):
    import warnings

    import torch.distributed.nn.functional as dist_fn

    x = torch.arange(4.0, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dist_fn.all_to_all_single(torch.empty(4), x)
        gathered = dist_fn.all_gather(x)
    assert torch.equal(out, x.detach()) and torch.equal(gathered[0], x.detach())
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_the_library_autograd_collectives_are_deprecated():
    """Why `common.context_parallel` keeps its own autograd collectives."""
    from tests.multiproc import run_on_ranks

    [messages] = run_on_ranks(_library_collectives_warn, 1)
    assert any("all_to_all_single is deprecated" in m for m in messages)
    assert any("all_gather is deprecated" in m for m in messages)
