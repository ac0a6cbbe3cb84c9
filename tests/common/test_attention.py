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


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_lse_matches_reference(causal):
    q, k, v = torch.randn(3, 1, 2, 7, 8).unbind(0)
    out, lse = attn.attention_with_lse(q, k, v, causal=causal)
    ref, ref_lse = reference(q, k, v, causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


def test_causal_offsets_mask_by_global_position():
    q, k, v = torch.randn(3, 1, 1, 8, 4).unbind(0)
    full, _ = attn.attention_with_lse(q, k, v, causal=True)
    # the second half of the queries against all keys, positioned at offset 4
    half, _ = attn.attention_with_lse(q[:, :, 4:], k, v, causal=True, q_offset=4)
    torch.testing.assert_close(half, full[:, :, 4:])


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
