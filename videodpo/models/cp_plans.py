"""Context-parallel plans of the video model families, applied by `common.cp_plans`.

- Wan2.1 (`WanTransformer3DModel`, T2V and I2V): the video tokens are split after patch
  embedding (before the first block), the rotary table is split alike (the output of
  `rope`), self-attention runs through `context_parallel_attention`, cross-attention
  keeps the replicated text (and image) context, and `proj_out`'s output is gathered.
- CogVideoX (`CogVideoXTransformer3DModel`): the same split and gather; its joint
  attention mixes replicated text tokens with split video tokens, so the processor
  attends video queries to the video keys of all ranks (CP attention, with log-sum-exp)
  and to the text keys (local), and text queries to their local text keys plus every
  rank's video keys (partial results gathered and merged by log-sum-exp).

Both are non-causal and split contiguously. `cp_plan_for(transformer)` finds the plan
of a transformer through the adapters' `cp_plan`.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from common.attention import attention_with_lse, merge_by_lse
from common.context_parallel import all_gather_sum_grad, context_parallel_attention, valid_length
from common.cp_plans import ContextParallelPlan, CPState, GatherOutput, SplitInput, SplitOutput
from videodpo.models.base import VideoModelAdapter

__all__ = ["COGVIDEOX_CP_PLAN", "WAN_CP_PLAN", "cp_plan_for"]


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

    def __init__(self, state: CPState):
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
            layout=self.state.layout,
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _check_wan_inputs(args: tuple, kwargs: dict) -> None:
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is not None and timestep.ndim == 2:
        raise NotImplementedError("context parallelism: per-token timesteps (Wan 2.2 TI2V)")


WAN_CP_PLAN = ContextParallelPlan(
    hooks={
        "rope": (SplitOutput(dim=1, records_length=True),),  # (cos, sin), each (1, S, 1, D)
        "blocks.0": (SplitInput("hidden_states", dim=1, index=0),),
        "proj_out": (GatherOutput(dim=1),),
    },
    processors={"blocks.*.attn1": WanContextParallelProcessor},
    check_inputs=_check_wan_inputs,
)


# ----------------------------------------------------------------------------------------
# CogVideoX
# ----------------------------------------------------------------------------------------


class CogVideoXContextParallelProcessor:
    """CogVideoX joint attention with replicated text tokens and split video tokens."""

    def __init__(self, state: CPState):
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("CogVideoXContextParallelProcessor does not take an attention mask")
        groups, seq_len, layout = self.state.groups, self.state.seq_len, self.state.layout
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
            q_video, k_video, v_video, groups, seq_len=seq_len, return_lse=True, layout=layout
        )
        out_video, _ = merge_by_lse([video_part, attention_with_lse(q_video, k_text, v_text)])

        # text queries: the text keys (local) and every rank's video keys (partial
        # results of each rank, gathered; every rank repeats the merge, and the gather's
        # backward sums the ranks' gradient shares); padded video keys are left out
        local_len = k_video.shape[2]
        valid = valid_length(groups.rank, groups.size, local_len, layout, seq_len)
        out_tv, lse_tv = attention_with_lse(q_text, k_video[:, :, :valid], v_video[:, :, :valid])
        out_tv, lse_tv = out_tv.unsqueeze(0), lse_tv.unsqueeze(0)
        if groups.size > 1:
            out_tv = all_gather_sum_grad(out_tv, 0, groups.cp)
            lse_tv = all_gather_sum_grad(lse_tv, 0, groups.cp)
        parts = [attention_with_lse(q_text, k_text, v_text)]
        parts += [(out_tv[r], lse_tv[r]) for r in range(out_tv.shape[0])]
        out_text, _ = merge_by_lse(parts)

        out = torch.cat([out_text, out_video], dim=2).type_as(query)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


COGVIDEOX_CP_PLAN = ContextParallelPlan(
    hooks={
        # the rotary table (cos, sin), each (S, D), comes in with the model's inputs
        "": (SplitInput("image_rotary_emb", dim=0, index=5),),
        "transformer_blocks.0": (SplitInput("hidden_states", dim=1, index=0, records_length=True),),
        "proj_out": (GatherOutput(dim=1),),
    },
    processors={"transformer_blocks.*.attn1": CogVideoXContextParallelProcessor},
)


def cp_plan_for(transformer: nn.Module) -> ContextParallelPlan:
    """The context-parallel plan of the adapter whose transformer class `transformer` is
    (each adapter declares its `cp_plan`)."""
    adapters = [cls for cls in VideoModelAdapter.__subclasses__() if getattr(cls, "cp_plan", None) is not None]
    for adapter in adapters:
        if isinstance(transformer, adapter.transformer_class):
            return adapter.cp_plan
    names = [a.transformer_class.__name__ for a in adapters]
    raise TypeError(f"context parallelism: no plan for {type(transformer).__name__}; plans exist for {names}")
