"""Context parallelism applied to diffusers and transformers models from outside.

`apply_context_parallel(model, groups)` leaves the model's code alone and adds, by
hooks and attention processors (diffusers) or the attention interface (transformers):

- `WanTransformer3DModel` (T2V and I2V): the video tokens are split after patch
  embedding (a pre-hook on the first block), the rotary table is sliced per rank (a hook
  on `rope`), self-attention runs through `context_parallel_attention`, cross-attention
  keeps the replicated text (and image) context, and `proj_out`'s output is gathered.
- `CogVideoXTransformer3DModel`: the same split and gather; its joint attention mixes
  replicated text tokens with split video tokens, so the processor attends video queries
  to the video keys of all ranks (CP attention, with log-sum-exp) and to the text keys
  (local), and text queries to their local text keys plus every rank's video keys
  (partial results gathered and merged by log-sum-exp).
- transformers causal LMs (Qwen-style): a `context_parallel` attention function is
  registered with `AttentionInterface` and selected through the config; the caller feeds
  each rank its chunk of `input_ids` and `position_ids` (`shard_causal_lm_inputs`).

Sequences whose length does not divide by the cp size are zero-padded and the padded
keys masked. Gradients follow `common.context_parallel`'s convention: each rank's
parameter gradient is its tokens' share, summed over the cp group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.context_parallel import (
    CPGroups,
    all_gather_sum_grad,
    context_parallel_attention,
    gather_sequence,
    split_sequence,
)

__all__ = [
    "CPHandle",
    "apply_context_parallel",
    "shard_causal_lm_inputs",
]

CP_ATTENTION_NAME = "context_parallel"


@dataclass
class _CPState:
    """Shared by the hooks and processors of one model: the groups and, during a
    forward, the true (unpadded) number of split tokens."""

    groups: CPGroups
    seq_len: int | None = None


@dataclass
class CPHandle:
    """What `apply_context_parallel` changed; `remove()` puts the model back."""

    hooks: list = field(default_factory=list)
    processors: list[tuple[nn.Module, Any]] = field(default_factory=list)
    attn_implementation: tuple[nn.Module, str | None] | None = None

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module, processor in self.processors:
            module.set_processor(processor)
        if self.attn_implementation is not None:
            model, name = self.attn_implementation
            _set_attn_implementation(model, name)
        self.hooks, self.processors, self.attn_implementation = [], [], None


def apply_context_parallel(model: nn.Module, groups: CPGroups) -> CPHandle:
    """Make `model` run on the sequence shards of `groups` (see the module docstring)."""
    name = type(model).__name__
    if name == "WanTransformer3DModel":
        return _apply_wan(model, groups)
    if name == "CogVideoXTransformer3DModel":
        return _apply_cogvideox(model, groups)
    if hasattr(model, "config") and hasattr(model.config, "_attn_implementation"):
        return _apply_causal_lm(model, groups)
    raise TypeError(
        f"apply_context_parallel: no plan for {name}; supported: WanTransformer3DModel, "
        "CogVideoXTransformer3DModel, transformers causal LMs"
    )


# ----------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------


def _split_local(x: torch.Tensor, dim: int, state: _CPState) -> torch.Tensor:
    # plain slicing: its backward leaves zeros outside the chunk, so the layers before
    # the split also get only this rank's share (summed over cp like every other grad)
    if state.groups.size == 1:  # (a None group would mean the whole world to torch)
        return x
    return split_sequence(x, dim, state.groups.cp, grad="local")


def _gather_output_hook(state: _CPState):
    def hook(module, args, output):
        if state.groups.size == 1:
            return output
        return gather_sequence(output, 1, state.groups.cp, seq_len=state.seq_len)

    return hook


def _attention_lse(q, k, v, key_valid: torch.Tensor | None = None):
    """Plain attention with its log-sum-exp; `key_valid` (S_k,) masks padded keys."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.matmul(torch.exp(scores - safe.unsqueeze(-1)), v), lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets from their outputs and log-sum-exps."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return sum(o * torch.exp(part_lse - safe).unsqueeze(-1) for o, part_lse in parts)


# ----------------------------------------------------------------------------------------
# Wan
# ----------------------------------------------------------------------------------------


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on (B, S, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanContextParallelProcessor:
    """Self-attention of a Wan block over the sequence shards of the cp group."""

    def __init__(self, state: _CPState):
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanContextParallelProcessor is for unmasked self-attention only")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        out = context_parallel_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.state.groups,
            seq_len=self.state.seq_len,
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _apply_wan(model: nn.Module, groups: CPGroups) -> CPHandle:
    state = _CPState(groups)
    handle = CPHandle()

    def check_timestep(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None and timestep.ndim == 2:
            raise NotImplementedError("context parallelism: per-token timesteps (Wan 2.2 TI2V)")

    def split_rope(module, args, output):
        cos, sin = output
        state.seq_len = cos.shape[1]
        return _split_local(cos, 1, state), _split_local(sin, 1, state)

    def split_tokens(module, args):
        return (_split_local(args[0], 1, state), *args[1:])

    handle.hooks.append(model.register_forward_pre_hook(check_timestep, with_kwargs=True))
    handle.hooks.append(model.rope.register_forward_hook(split_rope))
    handle.hooks.append(model.blocks[0].register_forward_pre_hook(split_tokens))
    handle.hooks.append(model.proj_out.register_forward_hook(_gather_output_hook(state)))
    for block in model.blocks:
        handle.processors.append((block.attn1, block.attn1.processor))
        block.attn1.set_processor(WanContextParallelProcessor(state))
    return handle


# ----------------------------------------------------------------------------------------
# CogVideoX
# ----------------------------------------------------------------------------------------


class CogVideoXContextParallelProcessor:
    """CogVideoX joint attention with replicated text tokens and split video tokens."""

    def __init__(self, state: _CPState):
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("CogVideoXContextParallelProcessor does not take an attention mask")
        groups, seq_len = self.state.groups, self.state.seq_len
        text_len = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = joint.shape[0]
        query, key, value = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        q_text, q_video = query[:, :, :text_len], query[:, :, text_len:]
        k_text, k_video = key[:, :, :text_len], key[:, :, text_len:]
        v_text, v_video = value[:, :, :text_len], value[:, :, text_len:]
        if image_rotary_emb is not None:
            q_video = apply_rotary_emb(q_video, image_rotary_emb)
            k_video = apply_rotary_emb(k_video, image_rotary_emb)

        # video queries: every rank's video keys (CP attention) and the text keys (local)
        video_part = context_parallel_attention(
            q_video, k_video, v_video, groups, seq_len=seq_len, return_lse=True
        )
        out_video = _merge([video_part, _attention_lse(q_video, k_text, v_text)])

        # text queries: the text keys (local) and every rank's video keys (partial
        # results of each rank, gathered; every rank repeats the merge, and the gather's
        # backward sums the ranks' gradient shares)
        local_len = k_video.shape[2]
        positions = torch.arange(local_len, device=joint.device) + groups.rank * local_len
        valid = positions < seq_len if seq_len is not None else None
        out_tv, lse_tv = _attention_lse(q_text, k_video, v_video, valid)
        out_tv, lse_tv = out_tv.unsqueeze(0), lse_tv.unsqueeze(0)
        if groups.size > 1:
            out_tv = all_gather_sum_grad(out_tv, 0, groups.cp)
            lse_tv = all_gather_sum_grad(lse_tv, 0, groups.cp)
        parts = [_attention_lse(q_text, k_text, v_text)]
        parts += [(out_tv[r], lse_tv[r]) for r in range(out_tv.shape[0])]
        out_text = _merge(parts)

        out = torch.cat([out_text, out_video], dim=2).type_as(query)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


def _apply_cogvideox(model: nn.Module, groups: CPGroups) -> CPHandle:
    state = _CPState(groups)
    handle = CPHandle()

    def split_rope(module, args, kwargs):
        rope = kwargs.get("image_rotary_emb")
        if rope is None and len(args) > 5:
            raise ValueError("context parallelism: pass image_rotary_emb to CogVideoX by name")
        if rope is not None:
            kwargs["image_rotary_emb"] = tuple(_split_local(t, 0, state) for t in rope)
        return args, kwargs

    def split_tokens(module, args, kwargs):
        key = "hidden_states"
        if key in kwargs:
            state.seq_len = kwargs[key].shape[1]
            kwargs[key] = _split_local(kwargs[key], 1, state)
        else:
            state.seq_len = args[0].shape[1]
            args = (_split_local(args[0], 1, state), *args[1:])
        return args, kwargs

    handle.hooks.append(model.register_forward_pre_hook(split_rope, with_kwargs=True))
    handle.hooks.append(
        model.transformer_blocks[0].register_forward_pre_hook(split_tokens, with_kwargs=True)
    )
    handle.hooks.append(model.proj_out.register_forward_hook(_gather_output_hook(state)))
    for block in model.transformer_blocks:
        handle.processors.append((block.attn1, block.attn1.processor))
        block.attn1.set_processor(CogVideoXContextParallelProcessor(state))
    return handle


# ----------------------------------------------------------------------------------------
# transformers causal LMs
# ----------------------------------------------------------------------------------------


def _context_parallel_lm_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, S_local, D) in, (B, S_local, H, D) out."""
    state: _CPState | None = getattr(module, "_context_parallel", None)
    if state is None:
        raise RuntimeError(
            "attention implementation 'context_parallel' needs apply_context_parallel(model, ...)"
        )
    if attention_mask is not None:
        raise ValueError(
            "context-parallel LM attention takes no attention mask (pack or right-pad the "
            "sequences; causal attention keeps padding at the end out of real tokens)"
        )
    if sliding_window is not None or dropout:
        raise ValueError("context-parallel LM attention: no sliding window, no attention dropout")
    causal = getattr(module, "is_causal", True)
    out = context_parallel_attention(query, key, value, state.groups, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _set_attn_implementation(model: nn.Module, name: str | None) -> None:
    if hasattr(model, "set_attn_implementation") and name is not None:
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _apply_causal_lm(model: nn.Module, groups: CPGroups) -> CPHandle:
    from transformers import AttentionInterface

    AttentionInterface.register(CP_ATTENTION_NAME, _context_parallel_lm_attention)
    state = _CPState(groups)
    found = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            module._context_parallel = state
            found += 1
    if not found:
        raise TypeError(f"apply_context_parallel: no attention layers found in {type(model).__name__}")
    handle = CPHandle(attn_implementation=(model, model.config._attn_implementation))
    _set_attn_implementation(model, CP_ATTENTION_NAME)
    return handle


def shard_causal_lm_inputs(
    input_ids: torch.Tensor, groups: CPGroups, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """This rank's chunk of `input_ids` (B, S) with its global `position_ids`.

    `labels` (B, S), if given, are shifted globally first (token i predicts token i + 1)
    and returned as `shift_labels` for the local chunk, padding and the last token marked
    -100, so that the chunk boundaries lose no target.
    """

    def split(x: torch.Tensor) -> torch.Tensor:
        return x if groups.size == 1 else split_sequence(x, 1, groups.cp, grad="local")

    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    out = {
        "input_ids": split(input_ids),
        "position_ids": split(positions.unsqueeze(0).expand_as(input_ids)),
    }
    if labels is not None:
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        out["shift_labels"] = split(shifted + 100) - 100  # padding becomes -100
    return out
