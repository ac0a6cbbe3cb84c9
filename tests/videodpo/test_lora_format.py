"""The original-Wan-layout LoRA writer: diffusers reads it back to the same model as the
diffusers-layout export, and reading then writing again is the identity."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from common.errors import ConfigError
from tests.videodpo.tiny_models import build_tiny_wan_pipeline
from videodpo.models.lora_format import save_original_wan_lora, to_original_wan_layout

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "net.0.proj",
           "net.2", "proj_out", "time_proj", "linear_1"]


def _trained_lora(model_dir, rank: int, alpha: float):
    """The pipeline's transformer with a LoRA whose up matrices are random (as if trained)."""
    pipe = WanPipeline.from_pretrained(model_dir)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                       init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return transformer, get_peft_model_state_dict(transformer)


def _metadata(transformer) -> dict:
    return transformer.peft_config["default"].to_dict()


def _run(pipe: WanPipeline) -> torch.Tensor:
    x, t, text = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2)), \
        torch.tensor([500.0]), torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return pipe.transformer(x, t, text, return_dict=False)[0]


def test_original_layout_loads_like_the_diffusers_export(tmp_path):
    model_dir = build_tiny_wan_pipeline(tmp_path / "wan", "t2v")
    rank, alpha = 4, 8.0  # alpha != rank: the scale must survive both layouts
    trained, lora = _trained_lora(model_dir, rank, alpha)
    want = _run(WanPipeline.from_pretrained(model_dir, transformer=trained))

    original = save_original_wan_lora(tmp_path / "orig" / "lora.safetensors", lora, rank, alpha)
    keys = load_file(original).keys()
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in keys
    assert "diffusion_model.head.head.lora_down.weight" in keys
    assert not any("attn1" in k or "lora_A" in k for k in keys)

    base = _run(WanPipeline.from_pretrained(model_dir))
    from_original = WanPipeline.from_pretrained(model_dir)
    from_original.load_lora_weights(str(original))
    got = _run(from_original)
    assert not torch.allclose(base, want, atol=1e-4)  # the LoRA does change the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    WanPipeline.save_lora_weights(tmp_path / "diff", transformer_lora_layers=lora,
                                  transformer_lora_adapter_metadata=_metadata(trained))
    from_diffusers = WanPipeline.from_pretrained(model_dir)
    from_diffusers.load_lora_weights(str(tmp_path / "diff"))
    torch.testing.assert_close(got, _run(from_diffusers), rtol=1e-5, atol=1e-5)


def test_original_to_diffusers_to_original_is_the_identity(tmp_path):
    model_dir = build_tiny_wan_pipeline(tmp_path / "wan", "i2v")
    rank = 4
    _, lora = _trained_lora(model_dir, rank, alpha=2.0)
    first = load_file(save_original_wan_lora(tmp_path / "a.safetensors", lora, rank, 2.0))
    # diffusers' own reader turns the original layout into its layout ...
    as_diffusers = WanPipeline.lora_state_dict(str(tmp_path / "a.safetensors"))
    as_diffusers = as_diffusers[0] if isinstance(as_diffusers, tuple) else as_diffusers
    assert all(k.startswith("transformer.") for k in as_diffusers)
    # ... (the scale is already in the down matrices, so it reads alpha / rank = 1) ...
    again = to_original_wan_layout(as_diffusers, rank=rank, alpha=rank)
    assert set(again) == set(first)
    for k, v in first.items():
        assert torch.equal(again[k], v), k


def test_a_target_without_an_original_name_is_refused():
    with pytest.raises(ConfigError, match="patch_embedding"):
        to_original_wan_layout({"patch_embedding.lora_A.weight": torch.zeros(2, 3)}, 2, 2)
