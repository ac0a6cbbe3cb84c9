"""Ulysses, ring and hybrid attention on real gloo processes equal full attention on one."""

from __future__ import annotations

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

# (batch, query heads, key/value heads, global length, head dim)
SHAPES = [(2, 4, 4, 8, 8), (1, 4, 2, 12, 4), (2, 4, 1, 6, 8), (1, 2, 2, 7, 4)]


def _inputs(shape, seed):
    b, h, hk, s, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hk, s, d, generator=g)
    v = torch.randn(b, hk, s, d, generator=g)
    w = torch.randn(b, h, s, d, generator=g)  # loss weights: loss = sum(out * w)
    return q, k, v, w


def _reference(shape, seed, causal):
    """Plain softmax attention on the whole sequence, with its q/k/v gradients."""
    q, k, v, w = _inputs(shape, seed)
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


def _local_run(fn, shape, seed, causal, group):
    """Run `fn` on this rank's shard; returns local out and grads (padding included)."""
    q, k, v, w = _inputs(shape, seed)
    seq_len = q.shape[2]
    q, k, v, w = (split_sequence(t, 2, group) for t in (q, k, v, w))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal, seq_len)
    (out * w).sum().backward()  # w is zero on padding, so padded queries do not count
    return out.detach(), q.grad, k.grad, v.grad


def _cases_worker(rank, world_size, mode, cases):
    groups = None
    if mode == "usp":
        groups = build_cp_groups(build_mesh(ParallelDims(cp=world_size)), ulysses=2)
    results = []
    for shape, causal in cases:
        if mode == "ulysses":
            def fn(q, k, v, c, n):
                return ulysses_attention(q, k, v, causal=c, seq_len=n)
        elif mode == "ring":
            def fn(q, k, v, c, n):
                return ring_attention(q, k, v, causal=c, seq_len=n)
        else:
            def fn(q, k, v, c, n):
                return usp_attention(q, k, v, groups.ulysses, groups.ring, causal=c, seq_len=n)
        results.append(_local_run(fn, shape, 7, causal, None))
    return results


def _check(results, cases, world_size):
    for case_index, (shape, causal) in enumerate(cases):
        ref = _reference(shape, 7, causal)
        for name, i in (("out", 0), ("dq", 1), ("dk", 2), ("dv", 3)):
            full = torch.cat([results[r][case_index][i] for r in range(world_size)], dim=2)
            full = full[:, :, : shape[3]]
            err = (full - ref[i]).abs().max() / ref[i].abs().max()
            assert err < 1e-5, f"{name} {shape} causal={causal}: relative error {err:.2e}"


CASES = [(shape, causal) for shape in SHAPES for causal in (False, True)]


# three query heads: ring attention takes any head count
RING_ONLY = [((1, 3, 3, 7, 4), False), ((1, 3, 1, 5, 4), True)]


def _two_rank_worker(rank, world_size):
    """Every two-rank check in one spawn (starting processes is the slow part here)."""
    return {
        "ulysses": _cases_worker(rank, world_size, "ulysses", CASES),
        "ring": _cases_worker(rank, world_size, "ring", CASES + RING_ONLY),
        "lse": [_lse_worker(rank, world_size, causal) for causal in (False, True)],
        "split_gather": _split_gather_worker(rank, world_size),
        "bad_heads": _bad_heads_worker(rank, world_size),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(_two_rank_worker, 2)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_two_ranks_match_full_attention(two_ranks, mode):
    # (2, 4, 1, ...): one K/V head, fewer than ranks, so Ulysses must repeat it
    _check([r[mode] for r in two_ranks], CASES + (RING_ONLY if mode == "ring" else []), 2)


@pytest.mark.slow
def test_ring_three_ranks_odd_heads_and_padding():
    cases = [((1, 3, 3, 7, 4), False), ((1, 3, 1, 7, 4), True), ((2, 3, 3, 9, 4), True)]
    results = run_on_ranks(_cases_worker, 3, "ring", cases)
    _check(results, cases, 3)


@pytest.mark.slow
def test_usp_four_ranks_matches_full_attention():
    cases = [((1, 4, 4, 16, 4), False), ((1, 4, 2, 16, 4), True), ((2, 4, 2, 13, 4), True)]
    results = run_on_ranks(_cases_worker, 4, "usp", cases)
    _check(results, cases, 4)


def _lse_worker(rank, world_size, causal):
    """context_parallel_attention(return_lse=True): out and lse, with gradients through both."""
    q, k, v, w = _inputs((1, 2, 2, 6, 4), 3)
    wl = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(4))
    q, k, v, w, wl = (split_sequence(t, 2, None) for t in (q, k, v, w, wl))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = {}
    for mode in ("ulysses", "ring"):
        groups = CPGroups(cp=dist.group.WORLD, **{mode: dist.group.WORLD})
        o, lse = context_parallel_attention(q, k, v, groups, causal, return_lse=True)
        grads = torch.autograd.grad((o * w).sum() + (lse * wl).sum(), (q, k, v))
        out[mode] = (o.detach(), lse.detach(), *grads)
    return out


def test_lse_and_its_gradient(two_ranks):
    for c, causal in enumerate((False, True)):
        results = [r["lse"][c] for r in two_ranks]
        q, k, v, w = _inputs((1, 2, 2, 6, 4), 3)
        wl = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(4))
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / 2.0
        if causal:
            scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        o, lse = scores.softmax(-1) @ v, scores.logsumexp(-1)
        ref = (o, lse, *torch.autograd.grad((o * w).sum() + (lse * wl).sum(), (q, k, v)))
        for mode in ("ulysses", "ring"):
            for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
                full = torch.cat([results[r][mode][i] for r in range(2)], dim=2)
                err = (full - ref[i].detach()).abs().max() / ref[i].abs().max()
                assert err < 1e-5, f"{mode} {name} causal={causal}: relative error {err:.2e}"


def _split_gather_worker(rank, world_size):
    x = torch.arange(10.0).reshape(1, 5, 2).requires_grad_()
    local = split_sequence(x, 1, None)  # padded to 6, 3 rows each
    y = gather_sequence(local * (rank + 1.0) / (rank + 1.0), 1, None, seq_len=5)
    (y * torch.arange(10.0).reshape(1, 5, 2)).sum().backward()
    return local.detach(), y.detach(), x.grad


def test_split_gather_round_trip_and_gradients(two_ranks):
    results = [r["split_gather"] for r in two_ranks]
    x = torch.arange(10.0).reshape(1, 5, 2)
    assert torch.equal(results[0][0], x[:, :3])
    assert torch.equal(results[1][0], torch.cat([x[:, 3:], torch.zeros(1, 1, 2)], 1))
    for _local, y, grad in results:
        assert torch.equal(y, x)
        # every rank holds the whole gradient of the replicated input
        assert torch.equal(grad, x)


def _bad_heads_worker(rank, world_size):
    q = torch.randn(1, 3, 2, 4)
    try:
        ulysses_attention(q, q, q)
    except ValueError as e:
        return str(e)
    return ""


def test_ulysses_rejects_heads_not_divisible(two_ranks):
    messages = [r["bad_heads"] for r in two_ranks]
    assert all("heads (3) must be divisible by the Ulysses group size (2)" in m for m in messages)
