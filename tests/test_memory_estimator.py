"""The memory estimator's formulas and the benchmark's capacity search.

Activation counts are checked against what autograd really keeps for backward (every
tensor passed to `saved_tensors_hooks`, each storage once, parameters left out) on tiny
diffusers Wan models; parameter counts against the models themselves; the capacity
search against a brute-force scan of synthetic peak curves.
"""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import WanTransformer3DModel

from common.fsdp import apply_activation_checkpointing
from tools.memory_bench import Capacity, find_capacity, repeatability
from tools.memory_estimator import (
    WAN21_I2V_14B,
    WAN21_T2V_1_3B,
    Layout,
    ModelDims,
    Precision,
    block_params,
    block_saved_bytes_per_token,
    context_saved_bytes,
    estimate_peak,
    latent_size,
    max_frames_estimate,
    outer_saved_bytes_per_token,
    param_count,
    tokens_per_frame,
    with_layers,
)

T2V = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
           text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True)
I2V = dict(T2V, in_channels=36, image_dim=24, added_kv_proj_dim=64)


def saved_bytes(model: torch.nn.Module, frames: int, hw: tuple[int, int], text_len: int,
                image_len: int = 0) -> int:
    """Bytes autograd keeps for backward after one forward (each storage once, no params)."""
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, frames, *hw)
    text = torch.randn(1, text_len, cfg.text_dim)
    image = torch.randn(1, image_len, cfg.image_dim) if image_len else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.tensor([500.0]), text, encoder_hidden_states_image=image, return_dict=False)
    return sum(kept.values())


def per_token_saved(model: torch.nn.Module, hw: tuple[int, int], text_len: int, image_len: int = 0) -> float:
    """Saved bytes per extra video token: the difference between 4 and 2 latent frames."""
    tokens = 2 * (hw[0] // 2) * (hw[1] // 2)
    return (saved_bytes(model, 4, hw, text_len, image_len) - saved_bytes(model, 2, hw, text_len, image_len)) / tokens


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 3, "ffn_dim": 160}, {"attention_head_dim": 8,
                                                                                "num_attention_heads": 8}])
def test_saved_activations_per_token_match_autograd_t2v(overrides):
    config = dict(T2V, **overrides)
    model = WanTransformer3DModel(**config)
    dims = ModelDims.from_wan_config(config, text_len=8)
    fp32 = Precision()
    expected = dims.num_layers * block_saved_bytes_per_token(dims, fp32) + outer_saved_bytes_per_token(dims, fp32)
    assert per_token_saved(model, (8, 12), text_len=8) == pytest.approx(expected, rel=1e-9)


def test_saved_activations_per_token_match_autograd_i2v():
    # diffusers' Wan I2V processor takes the last 512 context tokens as text
    model = WanTransformer3DModel(**I2V)
    dims = ModelDims.from_wan_config(I2V, text_len=512, image_len=4)
    fp32 = Precision()
    expected = dims.num_layers * block_saved_bytes_per_token(dims, fp32) + outer_saved_bytes_per_token(dims, fp32)
    assert per_token_saved(model, (8, 8), text_len=512, image_len=4) == pytest.approx(expected, rel=1e-9)


def test_checkpointed_blocks_keep_only_their_inputs():
    model = WanTransformer3DModel(**T2V)
    apply_activation_checkpointing(model)
    dims = ModelDims.from_wan_config(T2V, text_len=8)
    fp32 = Precision()
    # Block inputs plus what lives outside the blocks; the rotary tables are held by
    # the checkpoint's arguments rather than saved through autograd, so the hooks miss
    # them while the estimate (memory, not hook calls) counts them.
    rotary = 2 * dims.head_dim * 4
    expected = dims.num_layers * dims.hidden * 4 + outer_saved_bytes_per_token(dims, fp32) - rotary
    assert per_token_saved(model, (8, 12), text_len=8) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("config", [T2V, I2V])
def test_parameter_counts_match_diffusers(config):
    model = WanTransformer3DModel(**config)
    dims = ModelDims.from_wan_config(config)
    assert param_count(dims) == sum(p.numel() for p in model.parameters())
    assert block_params(dims) == sum(p.numel() for p in model.blocks[0].parameters())


def test_real_model_parameter_counts_match_meta_models():
    for dims, config in (
        (WAN21_T2V_1_3B, dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16)),
        (WAN21_I2V_14B, dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
                             image_dim=1280, added_kv_proj_dim=5120)),
    ):
        with torch.device("meta"):
            model = WanTransformer3DModel(patch_size=(1, 2, 2), attention_head_dim=128, out_channels=16,
                                          text_dim=4096, freq_dim=256, cross_attn_norm=True, **config)
        assert param_count(dims) == sum(p.numel() for p in model.parameters())
    assert 1.3e9 < param_count(WAN21_T2V_1_3B) < 1.5e9


def test_estimate_parts_follow_the_layout():
    dims = ModelDims.from_wan_config(T2V, text_len=8)
    hw = (16, 16)
    base = estimate_peak(dims, Layout("fsdp"), 8, hw, world_size=2)
    # resident: fp32 params + two AdamW moments + fp32 reference, sharded on 2; the
    # gradient shards are held by the optimizer phase, not on top of the activations
    assert base.model_state == pytest.approx(param_count(dims) * 16 / 2)
    assert base.phases["optimizer"] == pytest.approx(param_count(dims) * 4 / 2)
    assert base.peak == pytest.approx(base.model_state + base.fsdp_buffers + max(base.phases.values()))
    pair = estimate_peak(dims, Layout("pair", pair=2), 8, hw, world_size=2)
    cp = estimate_peak(dims, Layout("cp", cp=2), 8, hw, world_size=2)
    half = estimate_peak(dims, Layout("fsdp"), 4, hw, world_size=2)
    # one video per rank keeps what half the frames keep; half of each video's tokens
    # keeps a little more (whole-video latents on every rank, one more vector per block)
    # (and the text context of one video instead of two)
    one_context = context_saved_bytes(dims, Precision())
    assert pair.activations == pytest.approx(half.activations - one_context, rel=1e-9)
    assert half.activations < cp.activations < 0.6 * base.activations
    # ring attention on fused blocks keeps what Ulysses keeps
    ring = estimate_peak(dims, Layout("ring", cp=2, cp_mode="ring"), 8, hw, world_size=2)
    assert ring.peak == pytest.approx(cp.peak)
    ac = estimate_peak(dims, Layout("ac", ac=True), 8, hw, world_size=2)
    tokens = 2 * 8 * tokens_per_frame(dims, *hw)
    assert ac.activations < base.activations / 3
    assert ac.transient == pytest.approx(tokens * block_saved_bytes_per_token(dims, Precision()))
    assert estimate_peak(dims, Layout("fsdp"), 9, hw, 2).peak > base.peak


def test_max_frames_estimate_is_the_last_frame_count_under_budget():
    dims = ModelDims.from_wan_config(T2V, text_len=8)
    layout = Layout("fsdp")
    budget = estimate_peak(dims, layout, 11, (16, 16), 2).peak + 1.0
    assert max_frames_estimate(dims, layout, (16, 16), 2, budget) == 11
    assert max_frames_estimate(dims, layout, (16, 16), 2, 1.0) == 0


def test_real_models_fit_fewer_frames_at_720p_and_more_with_checkpointing():
    budget = 80 * 2.0**30
    bf16 = Precision("bf16", "bf16")
    for dims in (WAN21_T2V_1_3B, WAN21_I2V_14B):
        n480 = max_frames_estimate(dims, Layout("ac", ac=True), latent_size("480p"), 8, budget, bf16)
        n720 = max_frames_estimate(dims, Layout("ac", ac=True), latent_size("720p"), 8, budget, bf16)
        n480_plain = max_frames_estimate(dims, Layout("fsdp"), latent_size("480p"), 8, budget, bf16)
        assert n720 < n480
        assert n480_plain < n480
    assert latent_size("480p") == (60, 104)
    assert tokens_per_frame(WAN21_T2V_1_3B, *latent_size("480p")) == 1560


def brute_force_capacity(peaks: dict[int, float], budget: float, max_frames: int) -> int:
    return max([f for f in range(1, max_frames + 1) if peaks[f] <= budget], default=0)


@pytest.mark.parametrize("seed", range(40))
def test_find_capacity_agrees_with_a_full_scan(seed):
    rng = random.Random(seed)
    max_frames = rng.randint(1, 80)
    fixed, slope = rng.uniform(0, 50), rng.uniform(0.5, 20)
    # a monotone, slightly curved peak with plateaus, like measured ones
    peaks = {f: fixed + slope * f + 0.01 * f * f + (f // 7) for f in range(1, max_frames + 1)}
    budget = rng.uniform(0, fixed + slope * max_frames * 1.2)
    calls: list[int] = []

    def peak_at(f: int) -> float:
        assert 1 <= f <= max_frames
        calls.append(f)
        return peaks[f]

    guess = rng.randint(-5, max_frames + 10)
    cap = find_capacity(peak_at, budget, guess, max_frames)
    expected = brute_force_capacity(peaks, budget, max_frames)
    assert cap.max_frames == expected
    assert cap.capped == (expected == max_frames)
    assert len(calls) == len(set(calls)), "a frame count was measured twice"
    assert cap.probes == {f: peaks[f] for f in calls}


def test_find_capacity_with_a_good_guess_measures_twice():
    peaks = {f: 10.0 * f for f in range(1, 65)}
    cap = find_capacity(peaks.__getitem__, budget=125.0, guess=12, max_frames=64)
    assert cap == Capacity(12, False, {12: 120.0, 13: 130.0})


def test_repeatability_compares_the_same_points():
    previous = [{"layout": "fsdp", "frames": 4, "latent_h": 16, "latent_w": 16, "peak_mb": 100.0},
                {"layout": "fsdp", "frames": 5, "latent_h": 16, "latent_w": 16, "peak_mb": 120.0}]

    class M:
        def __init__(self, frames, peak):
            self.layout, self.frames, self.latent_h, self.latent_w, self.peak_mb = "fsdp", frames, 16, 16, peak

    rep = repeatability([M(4, 103.0), M(6, 150.0)], previous)
    assert rep["compared"] == 1
    assert rep["max_rel_diff"] == pytest.approx(0.03)
    assert rep["within_5_percent"]


def test_saved_activations_at_real_width_match_autograd():
    """One Wan2.1-T2V-1.3B block at full width (1536, 12 heads x 128, FFN 8960) and its
    real text context (512 tokens x 4096): saved bytes per video token and in total."""
    dims = with_layers(WAN21_T2V_1_3B, 1)
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=1, cross_attn_norm=True)
    fp32 = Precision()
    per_token = block_saved_bytes_per_token(dims, fp32) + outer_saved_bytes_per_token(dims, fp32)
    assert per_token_saved(model, (8, 12), text_len=512) == pytest.approx(per_token, rel=1e-9)
    tokens = 2 * 4 * 6
    whole = saved_bytes(model, 2, (8, 12), text_len=512)
    # within the timestep embedding's per-sample tensors (about 80 kB), which the estimate leaves out
    assert abs(whole - tokens * per_token - context_saved_bytes(dims, fp32)) < 100_000
