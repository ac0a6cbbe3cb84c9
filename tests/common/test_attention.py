import logging
import math

import pytest
import torch

from common import attention as attn


def reference(q, k, v, causal):
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("backend", attn.available_backends())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_backends_match_float64_reference(backend, causal, kv_heads):
    device = "cuda" if backend != "sdpa" else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 4, 9, 16, device=device, dtype=dtype)
    k = torch.randn(2, kv_heads, 9, 16, device=device, dtype=dtype)
    v = torch.randn(2, kv_heads, 9, 16, device=device, dtype=dtype)
    out = attn.attention(q, k, v, causal=causal, backend=backend)
    ref, _ = reference(q, k, v, causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == q.shape
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_lse_and_its_gradients_match_reference(kernel, dtype, causal):
    """Output, lse and q/k/v gradients of a loss on both (GQA: 4 query, 2 K/V heads)."""
    g = torch.Generator().manual_seed(0)
    q, w = (torch.randn(2, 4, 7, 8, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, 2, 7, 8, generator=g, dtype=dtype) for _ in range(2))
    wl = torch.randn(2, 4, 7, generator=g, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attn.attention_with_lse(q, k, v, causal=causal, kernel=kernel)
    grads = torch.autograd.grad((out * w).sum() + (lse * wl).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(qd, kd, vd, causal)
    ref_grads = torch.autograd.grad((ref * w.double()).sum() + (ref_lse * wl.double()).sum(), (qd, kd, vd))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (ref, ref_lse, *ref_grads)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < tol, f"{name}: relative error {err:.1e}"


def test_lse_backward_from_merged_result_gives_each_block_its_share():
    """Ring attention's backward: two key blocks, each recomputed from the merged out and
    lse, add up to the gradient of attention over all keys."""
    g = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    scale = 8**-0.5
    parts = [attn.lse_forward(q, k[:, :, s], v[:, :, s], False, scale, "cpu_flash")
             for s in (slice(0, 4), slice(4, 10))]
    out, lse = attn.merge_by_lse(parts)
    full_out, full_lse = attn.lse_forward(q, k, v, False, scale, "cpu_flash")
    torch.testing.assert_close(out, full_out)
    torch.testing.assert_close(lse, full_lse)
    full = attn.lse_backward(dout, q, k, v, full_out, full_lse, False, scale, "cpu_flash")
    dq = torch.zeros_like(q)
    dk, dv = [], []
    for s in (slice(0, 4), slice(4, 10)):
        dq_b, dk_b, dv_b = attn.lse_backward(dout, q, k[:, :, s], v[:, :, s], out, lse, False, scale, "cpu_flash")
        dq += dq_b
        dk.append(dk_b)
        dv.append(dv_b)
    torch.testing.assert_close(dq, full[0])
    torch.testing.assert_close(torch.cat(dk, 2), full[1])
    torch.testing.assert_close(torch.cat(dv, 2), full[2])


def test_no_keys_gives_zeros_and_minus_inf():
    q = torch.randn(1, 2, 3, 4)
    out, lse = attn.attention_with_lse(q, q[:, :, :0], q[:, :, :0])
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all()


def test_lse_kernel_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_announced_lse", set())
    with caplog.at_level(logging.INFO, logger="common.attention"):
        for dtype in (torch.float32, torch.float64, torch.float32):
            assert attn.lse_kernel("cpu", dtype) == "cpu_flash"
    assert [r.getMessage() for r in caplog.records] == ["attention-with-LSE kernel: cpu_flash"]
    with pytest.raises(ValueError, match="unknown attention-with-LSE kernel"):
        attn.lse_forward(*torch.randn(3, 1, 1, 4, 8).unbind(0), False, 1.0, "magic")


def test_missing_backend_names_what_is_installed():
    missing = next(b for b in attn.BACKENDS if b not in attn.available_backends("cpu"))
    with pytest.raises(RuntimeError, match=r"not available.*installed here: \['sdpa'"):
        attn.attention(*torch.randn(3, 1, 1, 4, 8).unbind(0), backend=missing)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.resolve_backend("magic", "cpu")


def test_auto_logs_the_backend_once(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_announced", set())
    with caplog.at_level(logging.INFO, logger="common.attention"):
        for _ in range(3):
            assert attn.resolve_backend("auto", "cpu") == "sdpa"
    assert [r.getMessage() for r in caplog.records] == ["attention backend: sdpa"]


def test_gqa_heads_must_divide():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attn.attention(torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
