"""Attention entry points over several kernels.

`attention(q, k, v, causal, backend)` takes `(B, H, S, D)` tensors and dispatches to
PyTorch SDPA (always there), flash-attn or xformers (CUDA only, optional extras).
`attention_with_lse` also returns the log-sum-exp, on kernels that never materialise
the score matrix (`lse_kernel`); `lse_forward` / `lse_backward` are its per-block
pieces, which ring attention calls directly. The GPU kernels are imported lazily so
that nothing here needs them installed.
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
    k = repeat_kv(k, q.shape[1])
    v = repeat_kv(v, q.shape[1])
    if backend == "flash":
        from flash_attn import flash_attn_func  # lazy: optional GPU extra

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
        )
        return out.transpose(1, 2)
    if backend == "xformers":
        import xformers.ops as xops  # lazy: optional GPU extra

        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


# ----------------------------------------------------------------------------------------
# Attention with the log-sum-exp (ring attention's blocks, joint-attention merges)
# ----------------------------------------------------------------------------------------

LSE_KERNELS = ("cpu_flash", "flash_attn", "torch_flash", "torch_efficient", "math")
_announced_lse: set[str] = set()


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat K/V heads `(B, H_kv, S, D)` to match the query heads."""
    if x.shape[1] == heads:
        return x
    if heads % x.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({x.shape[1]})")
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def sum_kv_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The adjoint of `repeat_kv`: sum the gradients of the query heads sharing a K/V head."""
    b, h, s, d = grad.shape
    if h == kv_heads:
        return grad
    return grad.reshape(b, kv_heads, h // kv_heads, s, d).sum(2)


def lse_kernel(device: torch.device | str, dtype: torch.dtype, backend: str = "auto") -> str:
    """The kernel that computes attention blocks with their log-sum-exp here (logged once).

    CPU: `cpu_flash`, aten's flash op for the CPU (any float dtype, float64 included).
    CUDA: `flash_attn` where the flash back-end is chosen and the dtype is half precision,
    else torch's own flash op (half precision) or memory-efficient op (float32); float64
    runs the plain-math kernel (no fused CUDA op takes it). `math` is also the float64
    test reference: it materialises the score matrix and is never picked on the CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        kernel = "cpu_flash"
    elif dtype == torch.float64:
        kernel = "math"
    else:
        half = dtype in (torch.float16, torch.bfloat16)
        if half and resolve_backend(backend, device) == "flash":
            kernel = "flash_attn"
        else:
            kernel = "torch_flash" if half else "torch_efficient"
    if kernel not in _announced_lse:
        _announced_lse.add(kernel)
        logger.info("attention-with-LSE kernel: %s", kernel)
    return kernel


def _math_forward(q, k, v, causal, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:  # top-left aligned, as the fused kernels are for equal lengths
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    delta = (dout * out).sum(-1, keepdim=True)
    dscores = probs * (torch.matmul(dout, v.transpose(-1, -2)) - delta)
    return torch.matmul(dscores, k) * scale, torch.matmul(dscores.transpose(-1, -2), q) * scale, \
        torch.matmul(probs.transpose(-1, -2), dout)


def lse_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention block, no autograd: `(out, lse)`, out in q's dtype, lse `(B, H, S_q)` fp32
    or better. q/k/v have equal head counts; `causal` needs equal q and k lengths."""
    if kernel == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    if kernel == "flash_attn":
        from flash_attn.flash_attn_interface import _flash_attn_forward  # lazy: optional GPU extra

        out, lse, _, _ = _flash_attn_forward(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, return_softmax=False,
        )
        return out.transpose(1, 2), lse
    if kernel == "torch_flash":
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return result[0], result[1]
    if kernel == "torch_efficient":
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        return out, lse[:, :, : q.shape[2]]  # the kernel pads the lse's length to a multiple of 32
    if kernel == "math":
        return _math_forward(q, k, v, causal, scale)
    raise ValueError(f"unknown attention-with-LSE kernel {kernel!r}; choose from {LSE_KERNELS}")


def _kernel_backward(dout, q, k, v, out, lse, causal, scale, kernel):
    if kernel == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    if kernel == "flash_attn":
        from flash_attn.flash_attn_interface import _flash_attn_backward  # lazy: optional GPU extra

        qt, kt, vt, ot, dot = (t.transpose(1, 2).contiguous() for t in (q, k, v, out, dout))
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        _flash_attn_backward(
            dot, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv, dropout_p=0.0, softmax_scale=scale,
            causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
            deterministic=False, rng_state=None,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if kernel == "torch_flash":
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), empty, empty, q.shape[2], k.shape[2], 0.0, causal,
            seed, seed, scale=scale,
        )
    if kernel == "torch_efficient":
        padded = -(-q.shape[2] // 32) * 32
        lse = F.pad(lse, (0, padded - q.shape[2])).contiguous()
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv
    if kernel == "math":
        return _math_backward(dout, q, k, v, out, lse.to(q.dtype), causal, scale)
    raise ValueError(f"unknown attention-with-LSE kernel {kernel!r}; choose from {LSE_KERNELS}")


def lse_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    kernel: str,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block, recomputed by the kernel from the final `out` and `lse`.

    `out` and `lse` may be those of attention over more keys than this block (ring
    attention passes the merged result): the block's probabilities are then
    exp(scores - lse), and its gradients are exactly its share.

    `grad_lse` (the gradient on the log-sum-exp) adds `probs * grad_lse` to the score
    gradient. The kernels compute `dscores = probs * (dout @ v^T - rowsum(dout * out))`,
    so one extra value column of ones with `grad_lse` as its output gradient (and 0 as its
    claimed output) adds exactly that term; q and k get a zero column to keep the head
    dims equal, as the fused kernels require. It is padded to 8 columns for CUDA kernels.
    """
    if grad_lse is None:
        return _kernel_backward(dout, q, k, v, out, lse, causal, scale, kernel)
    extra = 8
    d = q.shape[-1]

    def widen(x: torch.Tensor, first: torch.Tensor | float) -> torch.Tensor:
        pad = x.new_zeros(*x.shape[:-1], extra)
        pad[..., 0] = first
        return torch.cat([x, pad], dim=-1)

    dq, dk, dv = _kernel_backward(
        widen(dout, grad_lse.to(dout.dtype)), widen(q, 0.0), widen(k, 0.0), widen(v, 1.0),
        widen(out, 0.0), lse, causal, scale, kernel,
    )
    return dq[..., :d], dk[..., :d], dv[..., :d]


class _AttentionWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel):
        out, lse = lse_forward(q, k, v, causal, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel = causal, scale, kernel
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = lse_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale,
                                  ctx.kernel, grad_lse)
        return dq, dk, dv, None, None, None


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over `(B, H, S, D)` that also returns the log-sum-exp per query, `(B, H, S_q)`.

    Differentiable in q, k, v through both results. Runs on the kernel `lse_kernel` picks
    (or `kernel`), never materialising the score matrix except on the `math` kernel.
    K/V may have fewer heads (GQA). A causal mask is top-left aligned (query i sees keys
    0..i). With no keys at all the result is zeros (with a zero gradient) and a log-sum-exp of -inf.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[2] == 0:  # kept in q's graph: a collective after this must run on every rank
        out = q[..., :1].expand(*q.shape[:-1], v.shape[-1]) * 0.0
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device,
                         dtype=torch.promote_types(q.dtype, torch.float32))
        return out, lse
    kernel = kernel or lse_kernel(q.device, q.dtype, backend)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # autograd sums the groups
    return _AttentionWithLSE.apply(q, k, v, causal, scale, kernel)


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from each set's `(out, lse)`.

    Differentiable; parts with a log-sum-exp of -inf (no keys) weigh nothing.
    """
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = sum(o * torch.exp(part_lse - safe).unsqueeze(-1) for o, part_lse in parts)
    return out, lse
