"""Token log-probs and entropy at the scored positions only, without full-vocabulary logits.

At Qwen3's 151,936-token vocabulary the fp32 logits of 16k tokens take 10 GB, and a plain
log-softmax keeps two or three such tensors alive through backward. Here the model body
runs once to its final hidden states; only the positions whose next token is scored (the
response tokens of DAPO, the label tokens of SFT) are kept; and the LM head, log-softmax,
gather and entropy run over `chunk_size` of those positions at a time. Each chunk is
recomputed in backward (non-reentrant `torch.utils.checkpoint`) and its log-softmax has a
hand-written backward that turns the recomputed logits into their gradient in place, so
one chunk's logits (plus a row block of scratch) is the largest thing alive, forward or
backward. The result equals the full computation (tests/llmpost/test_logprobs.py).

FSDP2: the LM head is called as a module, never through its weight. `common.fsdp` shards
the root (embeddings, final norm, a tied head) with `reshard_after_forward=True`, so after
the model's forward the root is unsharded again (`FSDPModule.unshard`, a collective every
rank runs in the same order) and FSDP's own backward hooks reduce-scatter the head's
gradient and reshard it. A head sharded on its own (`fully_shard(head)`) would gather
itself once per chunk call, and ranks with different token counts run different numbers of
chunks: keep the head in the root group, as `common.fsdp.apply_fsdp` does.

Context parallelism is not used by llmpost; under a sequence split, position t of the
local shard scores token t+1 of the same shard, so a shard's last position has nothing to
score and the caller's mask must say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024  # scored tokens per chunk: 622 MB of fp32 logits at V = 151,936
# Rows of a chunk handled at once. CPU: their scratch stays in cache. GPU: few, large
# kernels (a row at a time would launch thousands); the scratch stays well below a chunk.
ROW_BLOCK_BYTES = {"cpu": 1 << 20}
ROW_BLOCK_BYTES_ACCELERATOR = 128 << 20


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    targets: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of the next token at each scored position, and optionally the entropy there.

    `response_mask` `(B, S-1)`: nonzero where position t's next token is scored (the layout
    of `llmpost.rollout.pack_right_padded`). `targets` `(B, S-1)`: the scored tokens,
    `input_ids[:, 1:]` by default (SFT passes its labels). Logits are divided by
    `temperature` before the softmax. Returns `(logp, entropy)`, both `(B, S-1)` and zero
    at unscored positions; `logp` is differentiable, `entropy` is detached (a metric) and
    None unless `with_entropy`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    batch, seq = input_ids.shape
    if response_mask.shape != (batch, seq - 1):
        raise ValueError(f"response_mask must have shape {(batch, seq - 1)} for input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(response_mask.shape)}")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
    mask = response_mask.to(hidden.device) != 0
    if targets is None:
        targets = input_ids[:, 1:]
    scored_targets = targets.to(hidden.device)[mask]
    scored_hidden = hidden[:, :-1][mask]  # (N, D): the only positions that reach the head
    logp, entropy = chunked_logprobs(head, scored_hidden, scored_targets, temperature,
                                     chunk_size, with_entropy)
    if isinstance(model, FSDPModule) and not logp.requires_grad:
        model.reshard()  # no backward will come to reshard the root
    dense_logp = logp.new_zeros(batch, seq - 1).masked_scatter(mask, logp)
    dense_entropy = None
    if entropy is not None:
        dense_entropy = entropy.new_zeros(batch, seq - 1).masked_scatter(mask, entropy)
    return dense_logp, dense_entropy


def final_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(B, S, D)`: the hidden states the LM head reads (after the final norm).

    Runs the whole model, not its base, so FSDP's root hooks gather and reduce the root's
    parameters; `logits_to_keep=1` lets the head see one position per row only.
    """
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False, **kwargs)
    if isinstance(model, FSDPModule):
        model.unshard()  # the head is called after the root's forward resharded it
    return out.hidden_states[-1]


def chunked_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(N,)` log-probs of `targets` under `head(hidden) / temperature`, `chunk_size` rows at a
    time, and the `(N,)` entropy (detached) if asked. `hidden` is `(N, D)`."""
    n = hidden.shape[0]
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    if needs_grad and not hidden.requires_grad:
        # a frozen body under a trained head: a leaf input so the chunk's backward runs
        hidden = hidden.detach().requires_grad_()
    logps: list[torch.Tensor] = []
    dtype = _compute_dtype(hidden.dtype)
    entropy = torch.empty(n, dtype=dtype, device=hidden.device) if with_entropy else None
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        out = entropy[start : start + chunk_size] if entropy is not None else None
        if needs_grad:
            logps.append(checkpoint(_ChunkLogProbs(head, temperature, out), h, t,
                                    use_reentrant=False))
        else:
            logps.append(_ChunkLogProbs(head, temperature, out)(h, t))
    if not logps:
        logps.append(hidden.new_zeros(0, dtype=dtype))
    return torch.cat(logps), entropy


class _ChunkLogProbs:
    """One chunk: logits = head(h), then log-prob of the target (and entropy, once).

    The entropy is a detached metric: it is written on the first call only, so the
    checkpoint's recomputation in backward does not pay for it again.
    """

    def __init__(self, head: nn.Module, temperature: float, entropy_out: torch.Tensor | None):
        self.head, self.temperature, self.entropy_out = head, temperature, entropy_out

    def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        entropy_out, self.entropy_out = self.entropy_out, None
        return _LogSoftmaxGather.apply(self.head(h), targets, self.temperature, entropy_out)


class _LogSoftmaxGather(torch.autograd.Function):
    """log_softmax(logits / T)[target] per row, computed a block of rows at a time.

    Backward overwrites the saved logits with their gradient, (onehot - softmax) * g / T,
    instead of allocating a second chunk-sized tensor. That is safe because the logits are
    this chunk's own: nothing else reads them (the head's backward needs its input and
    weight, not its output) and the checkpoint recomputes them for every backward.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, entropy_out):
        dtype = _compute_dtype(logits.dtype)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        logp = torch.empty_like(lse)
        for rows in _row_blocks(logits):
            z = _scaled(logits[rows].to(dtype), temperature)  # a view when nothing changes
            if entropy_out is None:
                lse[rows] = torch.logsumexp(z, dim=-1)
            else:
                # H = lse - sum(softmax * z), from one exp pass: e = exp(z - max)
                top = z.amax(dim=-1, keepdim=True)
                e = (z - top).exp_()
                total = e.sum(dim=-1)
                lse[rows] = top.squeeze(-1) + total.log()
                dot = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
                entropy_out[rows] = (lse[rows] - dot / total).to(entropy_out.dtype)
            logp[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        scale = grad_logp.to(lse.dtype) / ctx.temperature
        in_place = logits.dtype == lse.dtype
        for rows in _row_blocks(logits):
            block = logits[rows]
            if in_place:
                z = block.div_(ctx.temperature) if ctx.temperature != 1.0 else block
            else:
                z = torch.div(block.to(lse.dtype), ctx.temperature)
            grad = z.sub_(lse[rows, None]).exp_().mul_(-scale[rows, None])  # -softmax * g / T
            grad.scatter_add_(-1, targets[rows, None], scale[rows, None])
            if not in_place:
                block.copy_(grad)
        return logits.detach(), None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else torch.div(logits, temperature)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision logits; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    n, vocab = logits.shape
    budget = ROW_BLOCK_BYTES.get(logits.device.type, ROW_BLOCK_BYTES_ACCELERATOR)
    step = max(1, budget // (vocab * logits.element_size()))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def sampled_logprobs(
    step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, temperature: float = 1.0,
) -> torch.Tensor:
    """`(B, T)` log-probs of the sampled `tokens` from `generate`'s per-step logits (each
    `(B, V)`), one step at a time instead of stacking a `(B, T, V)` tensor."""
    if not step_logits:
        return torch.zeros(tokens.shape[0], 0, device=tokens.device)
    steps = []
    for logits, tok in zip(step_logits, tokens.unbind(1)):
        z = torch.div(logits.to(_compute_dtype(logits.dtype)), temperature)
        steps.append(z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(steps, dim=1)
