"""Context-parallel plan of transformers causal LMs (Qwen-style), applied by `common.cp_plans`.

The plan registers a `context_parallel` attention function with transformers'
`AttentionInterface` and selects it in the model's config; every attention layer then
runs `common.context_parallel.context_parallel_attention` on its sequence shard. The
caller feeds each rank its shard of `input_ids` and `position_ids`
(`shard_causal_lm_inputs`). Shards are zigzag (rank r of W holds chunks r and 2W-1-r of
2W), so that under the causal mask every rank does the same work; padding sits at the
end of the sequence, where causal attention keeps it out of every real token.

    apply_context_parallel(model, groups, CAUSAL_LM_CP_PLAN)
    shard = shard_causal_lm_inputs(input_ids, groups, labels=input_ids)
    logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.context_parallel import CPGroups, context_parallel_attention, split_sequence
from common.cp_plans import ContextParallelPlan

__all__ = ["CAUSAL_LM_CP_PLAN", "shard_causal_lm_inputs"]


def context_parallel_lm_attention(
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
    state = getattr(module, "context_parallel_state", None)
    if state is None:
        raise RuntimeError(
            "attention implementation 'context_parallel' needs "
            "apply_context_parallel(model, groups, CAUSAL_LM_CP_PLAN)"
        )
    if attention_mask is not None:
        raise ValueError(
            "context-parallel LM attention takes no attention mask (pack or right-pad the "
            "sequences; causal attention keeps padding at the end out of real tokens)"
        )
    if sliding_window is not None or dropout:
        raise ValueError("context-parallel LM attention: no sliding window, no attention dropout")
    causal = getattr(module, "is_causal", True)
    out = context_parallel_attention(
        query, key, value, state.groups, causal=causal, scale=scaling, layout=state.layout
    )
    return out.transpose(1, 2).contiguous(), None


def _is_attention_layer(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")


CAUSAL_LM_CP_PLAN = ContextParallelPlan(
    attention_function=context_parallel_lm_attention,
    is_attention_module=_is_attention_layer,
    layout="zigzag",
)


def shard_causal_lm_inputs(
    input_ids: torch.Tensor, groups: CPGroups, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """This rank's shard of `input_ids` (B, S) with its global `position_ids`.

    `labels` (B, S), if given, are shifted globally first (token i predicts token i + 1)
    and returned as `shift_labels` for the local shard, padding and the last token marked
    -100, so that the shard boundaries lose no target.
    """
    layout = CAUSAL_LM_CP_PLAN.layout

    def split(x: torch.Tensor) -> torch.Tensor:
        return x if groups.size == 1 else split_sequence(x, 1, groups.cp, grad="local", layout=layout)

    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    out = {
        "input_ids": split(input_ids),
        "position_ids": split(positions.unsqueeze(0).expand_as(input_ids)),
    }
    if labels is not None:
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        out["shift_labels"] = split(shifted + 100) - 100  # padding becomes -100
    return out
