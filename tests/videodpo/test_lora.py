"""LoRA Reg-DPO on a tiny diffusers Wan pipeline: the exported weights load with
`pipe.load_lora_weights`, change the pipeline's output, and reproduce the trained model."""

from __future__ import annotations

import math

import torch
from diffusers import WanPipeline

from tests.videodpo.tiny_models import build_tiny_wan_pipeline
from videodpo.config import RunConfig
from videodpo.trainer import train


def _pairs(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        chosen = torch.rand(3, 5, 32, 32, generator=g) * 2 - 1
        out.append({"chosen": chosen, "rejected": chosen.flip(-1), "caption": f"a red square moving {'left' if i % 2 else 'right'}"})
    return out


def _run(pipe: WanPipeline) -> torch.Tensor:
    return pipe("a red square moving left", num_frames=5, height=32, width=32, num_inference_steps=2,
                guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames


def test_lora_export_loads_into_pipeline_and_changes_output(tmp_path):
    model_dir = build_tiny_wan_pipeline(tmp_path / "wan", "t2v")
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.model.path = str(model_dir)
    cfg.loss.kind, cfg.loss.beta = "reg_dpo", 100.0
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = True, 4, 4
    cfg.optim.lr, cfg.train.steps, cfg.train.batch_size = 5e-2, 3, 2
    from videodpo.models import load_adapter

    adapter = load_adapter(model_dir)
    result = train(cfg, dataset=_pairs(), adapter=adapter)
    # step 1: LoRA B starts at zero, so policy == reference (adapters disabled): d = 0
    assert math.isclose(result.history[0]["dpo"], math.log(2), rel_tol=1e-5)
    assert result.history[-1]["margin"] != 0.0
    export = result.export_dir
    assert (export / "pytorch_lora_weights.safetensors").is_file()

    pipe = WanPipeline.from_pretrained(model_dir)
    before = _run(pipe)
    pipe.load_lora_weights(export)
    after = _run(pipe)
    assert not torch.allclose(before, after, atol=1e-4)

    # the loaded LoRA is the trained one: the pipeline matches the trained transformer
    trained = WanPipeline.from_pretrained(model_dir, transformer=adapter.transformer)
    torch.testing.assert_close(_run(trained), after, rtol=1e-5, atol=1e-6)

    # `videodpo sample` finds the run's LoRA export and applies it to model.path
    from videodpo.sample import load_for_sampling

    cfg.sample.checkpoint = ""
    sampled = load_for_sampling(cfg)
    x, t, text = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(sampled.transformer(x, t, text, return_dict=False)[0],
                                   adapter.transformer(x, t, text, return_dict=False)[0])
