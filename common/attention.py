"""One attention entry point over several kernels.

`attention(q, k, v, causal, backend)` takes `(B, H, S, D)` tensors and dispatches to
PyTorch SDPA (always there), flash-attn or xformers (CUDA only, optional extras). The
GPU kernels are imported lazily so that nothing here needs them installed.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "xformers")
_announced: set[str] = set()


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Back-ends that can run on `device` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    found = ["sdpa"]
    if on_cuda and _has_module("flash_attn"):
        found.append("flash")
    if on_cuda and _has_module("xformers"):
        found.append("xformers")
    return found


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn `auto` into a concrete back-end; reject one that cannot run here."""
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown attention backend {backend!r}; choose from {('auto', *BACKENDS)}")
    found = available_backends(device)
    if backend == "auto":
        backend = "flash" if "flash" in found else "sdpa"
    elif backend not in found:
        raise RuntimeError(
            f"attention backend {backend!r} is not available on {torch.device(device).type}; "
            f"installed here: {found}"
        )
    if backend not in _announced:
        _announced.add(backend)
        logger.info("attention backend: %s", backend)
    return backend


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat K/V heads to match the query heads."""
    if x.shape[1] == heads:
        return x
    if heads % x.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({x.shape[1]})")
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over `(B, H, S, D)`; K/V may have fewer heads (GQA)."""
    backend = resolve_backend(backend, q.device)
    k = _repeat_kv(k, q.shape[1])
    v = _repeat_kv(v, q.shape[1])
    if backend == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
        )
        return out.transpose(1, 2)
    if backend == "xformers":
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-math attention that also returns the log-sum-exp per query, `(B, H, S)`.

    Ring attention merges partial results by their log-sum-exp, which SDPA does not
    return on the CPU. `q_offset` / `k_offset` are the global positions of the first
    query and key, so that a causal mask is right for blocks of a longer sequence.
    """
    k = _repeat_kv(k, q.shape[1])
    v = _repeat_kv(v, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        qi = torch.arange(q.shape[-2], device=q.device) + q_offset
        ki = torch.arange(k.shape[-2], device=q.device) + k_offset
        scores = scores.masked_fill(ki[None, :] > qi[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))
    return torch.matmul(probs, v), lse
