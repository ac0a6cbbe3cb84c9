"""The end of a run: the trained model in the formats users load.

LoRA weights in diffusers' layout (`pipe.load_lora_weights`), the original Wan layout
(ComfyUI, the Wan repository) or both (`lora.export_format`); a full fine-tune as a
`save_pretrained` pipeline folder. Under FSDP every rank gathers, rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from common.fsdp import full_state_dict
from videodpo.models.experts import EXPORT_DIRS, TimestepExperts, iter_expert_state, trained_experts
from videodpo.state import TrainingState


def export_model(state: TrainingState, out_dir: Path) -> Path:
    """LoRA weights (`lora.export_format`), or a full `save_pretrained` directory. A
    two-expert model's LoRAs go one folder per trained expert (`high_noise/`,
    `low_noise/`), each loadable with `pipe.load_lora_weights` (the low-noise one with
    `load_into_transformer_2=True`); its full export holds both transformers."""
    full = full_state_dict(state.policy, rank0_only=True) if state.layout.world_size > 1 else None
    if not state.layout.is_main:
        return out_dir
    if state.lora:
        two = isinstance(state.policy, TimestepExperts)
        for name, expert in trained_experts(state.policy).items():
            part = None if full is None else dict(iter_expert_state(full, name)) if two else full
            sd = get_peft_model_state_dict(expert, state_dict=part)
            metadata = expert.peft_config["default"].to_dict()  # lora_alpha: the loaded scale
            state.adapter.save_lora(out_dir / EXPORT_DIRS[name] if two else out_dir, sd, metadata,
                                    state.cfg.lora.export_format)
        return out_dir
    model = state.policy
    if full is not None:
        model = _unsharded_copy(type(state.adapter).transformer_class, state.policy, full)
    return state.adapter.save_pretrained(out_dir, transformer=model)


def _unsharded_copy(cls: type[nn.Module], model: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """A plain `cls` (FSDP2 changes the wrapped model's class) holding the tensors `full`;
    for two experts, one `cls` each."""
    if isinstance(model, TimestepExperts):
        parts = {n: cls.from_config(e.config) for n, e in model.experts.items()}
        copy = TimestepExperts(parts, model.boundary, model.num_train_timesteps)
    else:
        copy = cls.from_config(model.config)
    copy.load_state_dict(full)
    return copy
