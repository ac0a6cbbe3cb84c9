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


def test_trainer_exports_both_layouts_that_reproduce_the_trained_model(tmp_path):
    """A LoRA trained with alpha != rank, `lora.export_format: both`: diffusers' file (with
    its adapter metadata) and the original-layout file each load into the pipeline and
    reproduce the trained transformer; `sample` reads an original-only export."""
    from videodpo.config import RunConfig
    from videodpo.models import load_adapter
    from videodpo.models.wan import ORIGINAL_LORA_FILE
    from videodpo.sample import load_for_sampling
    from videodpo.trainer import train

    model_dir = build_tiny_wan_pipeline(tmp_path / "wan", "t2v")
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(2):
        chosen = torch.rand(3, 5, 32, 32, generator=g) * 2 - 1
        pairs.append({"chosen": chosen, "rejected": chosen.flip(-1), "caption": f"a square {i}"})
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.model.path = str(model_dir)
    cfg.loss.kind, cfg.loss.beta = "reg_dpo", 100.0
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = True, 4, 8
    cfg.lora.target_modules = ["to_q", "to_v", "net.2"]
    cfg.lora.export_format = "both"
    cfg.optim.lr, cfg.train.steps, cfg.train.batch_size = 5e-2, 2, 2
    adapter = load_adapter(model_dir)
    export = train(cfg, dataset=pairs, adapter=adapter).export_dir
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    assert (export / ORIGINAL_LORA_FILE).is_file()

    want = _run(WanPipeline.from_pretrained(model_dir, transformer=adapter.transformer))
    assert not torch.allclose(_run(WanPipeline.from_pretrained(model_dir)), want, atol=1e-4)
    from_diffusers = WanPipeline.from_pretrained(model_dir)
    from_diffusers.load_lora_weights(str(export))  # picks diffusers' file of the two
    torch.testing.assert_close(_run(from_diffusers), want, rtol=1e-5, atol=1e-5)
    from_original = WanPipeline.from_pretrained(model_dir)
    from_original.load_lora_weights(str(export / ORIGINAL_LORA_FILE))
    torch.testing.assert_close(_run(from_original), want, rtol=1e-5, atol=1e-5)

    # an original-only export is what `videodpo sample` then finds and applies
    (export / "pytorch_lora_weights.safetensors").unlink()
    cfg.sample.checkpoint = ""
    sampled = load_for_sampling(cfg)
    torch.testing.assert_close(_run(WanPipeline.from_pretrained(model_dir, transformer=sampled.transformer)),
                               want, rtol=1e-5, atol=1e-5)


def test_export_format_is_checked_before_training(tmp_path):
    from videodpo.config import RunConfig
    from videodpo.models import load_adapter
    from videodpo.state import build_training_state

    model_dir = build_tiny_wan_pipeline(tmp_path / "wan", "t2v")
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = True, 2, 2
    cfg.lora.export_format = "comfy"
    with pytest.raises(ConfigError, match="lora.export_format"):
        build_training_state(cfg, load_adapter(model_dir))
    cfg.lora.export_format, cfg.lora.target_modules = "original", ["to_q", "patch_embedding"]
    with pytest.raises(ConfigError, match="patch_embedding"):
        build_training_state(cfg, load_adapter(model_dir))
