"""The real-shape benchmark (`tools/scale_bench.py`) and the one-GPU script's dry run.

The FLOP formulas are checked against `torch.utils.flop_counter` on tiny models of each
family (math SDPA, whose matmuls the counter sees); the bare Reg-DPO loop that the
overhead ratio compares against must compute what the trainer computes; the bench's
machinery runs end to end at tiny width; and one real-width block (slow) is checked
against the memory estimator.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tools import gpu_video_bench
from tools.scale_bench import (
    COGVIDEOX_5B,
    LAYOUTS,
    REAL_MODELS,
    WAN21_I2V_14B,
    WAN21_T2V_1_3B,
    Case,
    Plan,
    bare_reg_dpo_step,
    forward_flops,
    measure_case,
    run_bench,
    run_config,
    step_flops,
)

SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)
TINY_WAN = replace(WAN21_T2V_1_3B, name="tiny-wan", config=dict(WAN21_T2V_1_3B.config, ffn_dim=48, text_dim=24,
                                                                  freq_dim=16, **SMALL),
                   text_len=8, latents={"480p": (8, 12)})
TINY_I2V = replace(WAN21_I2V_14B, name="tiny-wan-i2v", config=dict(WAN21_I2V_14B.config, ffn_dim=48, text_dim=24,
                                                                     freq_dim=16, image_dim=20, added_kv_proj_dim=32,
                                                                     **SMALL),
                   image_len=6)
TINY_COG = replace(COGVIDEOX_5B, name="tiny-cog", config=dict(COGVIDEOX_5B.config, text_embed_dim=24, time_embed_dim=8,
                                                               max_text_seq_length=8, sample_width=12, sample_height=8,
                                                               **SMALL),
                   text_len=8)


def counted_flops(model, frames, hw, backward=False, freeze=False):
    torch.manual_seed(0)
    adapter = model.adapter(model.build())
    if freeze:  # LoRA-like: weights get no gradient, the input still does
        adapter.transformer.requires_grad_(False)
    batch = model.batch(frames, hw)
    x = batch.chosen.requires_grad_(freeze)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = adapter.predict(adapter.transformer, x, torch.tensor([500.0]), batch.cond)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", [TINY_WAN, TINY_I2V, TINY_COG], ids=lambda m: m.name)
def test_forward_flops_equal_the_flop_counter(model):
    fwd = forward_flops(model, 3, (8, 12))
    assert fwd["linear"] + fwd["attention"] == counted_flops(model, 3, (8, 12))


def test_step_flops_count_backward_as_twice_the_forward():
    fwd = forward_flops(TINY_WAN, 2, (8, 12))
    one = fwd["linear"] + fwd["attention"]
    cfg, d, tokens = TINY_WAN.config, TINY_WAN.hidden, 2 * 4 * 6
    # The counter sees every backward matmul except the input gradients of the layers
    # that read data: patch embedding (when the latent needs no gradient), the text
    # embedder's and the time embedder's first linear.
    patch = 2 * tokens * cfg["in_channels"] * 4 * d
    data_inputs = 2 * TINY_WAN.text_len * cfg["text_dim"] * d + 2 * cfg["freq_dim"] * d
    full = counted_flops(TINY_WAN, 2, (8, 12), backward=True)
    assert full == 3 * one - patch - data_inputs
    assert step_flops(TINY_WAN, 2, (8, 12)) == pytest.approx(8 * one)
    assert fwd["patch"] == patch
    # Frozen weights (LoRA's base): input gradients on the video path only; here the
    # latent needs a gradient (a stand-in for LoRA's trainable weights), so the patch
    # embedding's input gradient is counted too, which a LoRA step does not compute.
    frozen = counted_flops(TINY_WAN, 2, (8, 12), backward=True, freeze=True)
    video_backward = fwd["video_linear"] + 2 * fwd["self_attention"] + fwd["cross_attention"]
    assert frozen == one + video_backward + patch
    assert step_flops(TINY_WAN, 2, (8, 12), lora=True) == pytest.approx(2 * (one + video_backward + one))


def test_real_configs_build_the_released_sizes():
    expected = {"Wan2.1-T2V-1.3B": (1.3e9, 1.5e9), "Wan2.1-I2V-14B": (16e9, 17e9), "CogVideoX-5B": (5.4e9, 5.8e9)}
    for name, model in REAL_MODELS.items():
        transformer = model.build(device="meta")
        params = sum(p.numel() for p in transformer.parameters())
        low, high = expected[name]
        assert low < params < high, (name, params)
    assert WAN21_T2V_1_3B.tokens_per_frame(WAN21_T2V_1_3B.latents["480p"]) == 1560
    assert WAN21_T2V_1_3B.tokens_per_frame(WAN21_T2V_1_3B.latents["720p"]) == 3600
    assert COGVIDEOX_5B.hidden == 3072 and COGVIDEOX_5B.num_layers == 42


def test_bare_loop_computes_what_the_trainer_computes():
    from videodpo.step import build_training_step

    torch.manual_seed(0)
    transformer = TINY_WAN.build()
    policy = TINY_WAN.build()
    policy.load_state_dict(transformer.state_dict())
    reference = TINY_WAN.build().requires_grad_(False)
    reference.load_state_dict(transformer.state_dict())
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = run_config(LAYOUTS["plain"])
    cfg.optim.lr = 1e-3
    step_fn, state = build_training_step(cfg, TINY_WAN.adapter(transformer))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr)
    generator = torch.Generator().manual_seed(cfg.train.seed)  # the trainer's on one rank
    batch = TINY_WAN.batch(2, (8, 12))
    for _ in range(2):
        trainer_loss = step_fn(batch)["loss"]
        bare_loss = bare_reg_dpo_step(policy, reference, optimizer, batch, generator, cfg.loss.beta,
                                      cfg.loss.sft_weight, cfg.optim.grad_clip)
        assert bare_loss == pytest.approx(trainer_loss, rel=1e-5)
    trained = state.policy.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bench_machinery_at_tiny_width(tmp_path, monkeypatch):
    import tools.scale_bench as scale_bench

    monkeypatch.setattr(scale_bench, "setup_model", lambda layers: replace(TINY_WAN, config=dict(
        TINY_WAN.config, num_layers=layers)))
    plan = Plan(cases=[("tiny-wan", 1, "480p", 2, "plain"), ("tiny-wan", 2, "480p", 2, "cp2")],
                overhead=("tiny-wan", 1, (8, 12), 1), setup_layers=2, models={"tiny-wan": TINY_WAN})
    results = run_bench(plan, tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    rows = saved["rows"]
    assert [(r["layout"], r["blocks_run"], r["ranks"]) for r in rows] == [("plain", 1, 1), ("cp2", 2, 2)]
    for r in rows:
        for key in ("model", "width", "blocks_run", "tokens", "layout", "step_s", "peak_mb", "estimate_mb", "flops"):
            assert r[key] is not None, key
        assert r["width"] == 32 and r["tokens"] == 2 * 4 * 6
        assert r["step_s"] > 0 and r["step_cpu_s"] > 0 and r["peak_mb"] > 0 and r["saved_mb"] > 0
        assert r["flops"] == step_flops(TINY_WAN.at_depth(r["blocks_run"]), 2, (8, 12))
        assert r["error"] == pytest.approx((r["estimate_mb"] - r["peak_mb"]) / r["peak_mb"])
    assert saved["estimator_error_real_width"] == pytest.approx(max(abs(r["error"]) for r in rows))
    assert saved["overhead_ratio"] > 0
    setup = saved["setup"]
    assert setup["setup_rss_ratio"] == pytest.approx(max(setup["two_rank_peak_mb"]) / setup["one_process_peak_mb"])
    extrapolated = saved["extrapolated_full_depth_81_frames"]
    # to the model's full depth (2 blocks here) and 81 frames (21 latent frames)
    assert [x["layers"] for x in extrapolated] == [2, 2] and extrapolated[0]["tokens"] == 21 * 4 * 6
    assert extrapolated[0]["step_tflops"] == pytest.approx(step_flops(TINY_WAN, 21, (8, 12)) / 1e12)


@pytest.mark.slow
def test_estimator_within_ten_percent_on_a_real_width_block():
    """One Wan2.1-T2V-1.3B block at full width, a quarter 480p frame (390 tokens a video):
    measured per-rank peak of the trainer's step against `tools/memory_estimator.py`."""
    model = WAN21_T2V_1_3B.at_depth(1)
    row = measure_case(Case(model, LAYOUTS["plain"], "480p", 1, (30, 52)))
    assert row.width == 1536 and row.tokens == 390
    assert abs(row.error) <= 0.10, row


def test_gpu_script_dry_run(tmp_path):
    result = gpu_video_bench.run(tmp_path, peak_tflops=1.0, steps=1, dry_run=True)
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    assert [r["lora"] for r in saved["reports"]] == [True, False]
    model = gpu_video_bench.dry_run_model()
    for r in result["reports"]:
        assert r["layout"] == "ac" and r["tokens"] == 3 * 4 * 6 and r["step_s"] > 0
        flops = step_flops(model, 3, (8, 12), lora=r["lora"])
        assert r["step_tflops"] == pytest.approx(flops / 1e12)
        assert r["mfu"] == pytest.approx(flops / r["step_s"] / 1e12)
