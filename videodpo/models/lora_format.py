"""LoRA weights of a Wan transformer in the original Wan key layout, the one ComfyUI and
the Wan repository load.

diffusers writes a trained LoRA as `transformer.blocks.0.attn1.to_q.lora_A.weight`; the
original layout names the same matrices after the original model's modules:
`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `...lora_up.weight` and a scalar
`...alpha` per module. diffusers reads that layout back (`pipe.load_lora_weights` and
`WanPipeline.lora_state_dict` convert it on load) but has no writer, so this module holds
the inverse of its reading rule, module by module.

Scaling: peft applies `lora_alpha / r` in the forward pass; the original layout applies
`alpha / rank` from its `.alpha` key (absent: 1). We bake the peft scale into the down
matrix and write `alpha = rank` for the blocks' modules (diffusers' reader refuses an
`.alpha` on the embedding and head modules, so none is written there), so every reader
applies a factor of 1 and no reader's rounding of the
scale matters; reading a file written here and writing it again gives the same keys and
tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from common.errors import ConfigError

ORIGINAL_PREFIX = "diffusion_model."

# diffusers module path (relative to a block) -> original Wan module path
_BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# diffusers module path outside the blocks -> original Wan module path
_TOP_MODULES = {
    "proj_out": "head.head",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
}


def _original_module(module: str) -> str:
    if module.startswith("blocks."):
        _, index, rest = module.split(".", 2)
        if rest in _BLOCK_MODULES:
            return f"blocks.{index}.{_BLOCK_MODULES[rest]}"
    elif module in _TOP_MODULES:
        return _TOP_MODULES[module]
    raise ConfigError(
        f"lora.export_format: the LoRA target {module!r} has no name in the original Wan layout "
        "(use lora.export_format: diffusers, or target attention / FFN / embedding Linears)"
    )


def check_original_wan_modules(modules: list[str]) -> None:
    """ConfigError unless every LoRA target module (transformer-relative, e.g.
    `blocks.0.attn1.to_q`) has a name in the original Wan layout."""
    for module in modules:
        _original_module(module)


def to_original_wan_layout(
    lora_state_dict: dict[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """peft/diffusers LoRA tensors of a `WanTransformer3DModel` in the original Wan layout.

    Keys may carry diffusers' `transformer.` prefix or none (peft's
    `get_peft_model_state_dict`). `rank` and `alpha` are the LoRA config's `r` and
    `lora_alpha`; their ratio is baked into the down matrices and `alpha = rank` is written.
    """
    scale = float(alpha) / float(rank)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora_state_dict.items():
        name = key.removeprefix("transformer.")
        for part, role in ((".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up")):
            if name.endswith(part):
                module = _original_module(name[: -len(part)])
                value = tensor.detach().to("cpu").contiguous()
                if role == "lora_down":
                    value = value * scale if scale != 1.0 else value.clone()
                    if module.startswith("blocks."):  # diffusers' reader takes no alpha elsewhere
                        out[f"{ORIGINAL_PREFIX}{module}.alpha"] = torch.tensor(
                            float(value.shape[0]), dtype=value.dtype
                        )
                out[f"{ORIGINAL_PREFIX}{module}.{role}.weight"] = value
                break
        else:
            raise ConfigError(
                f"lora.export_format: cannot write {key!r} in the original Wan layout "
                "(only lora_A / lora_B weights are supported, no LoRA biases or DoRA)"
            )
    return out


def save_original_wan_lora(
    out_file: str | Path, lora_state_dict: dict[str, torch.Tensor], rank: int, alpha: float
) -> Path:
    """Write the original-layout file (safetensors); returns its path."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_original_wan_layout(lora_state_dict, rank, alpha), str(out_file),
              metadata={"format": "pt"})
    return out_file
