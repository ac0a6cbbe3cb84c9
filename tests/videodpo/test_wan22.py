"""Wan2.2 TI2V-5B on tiny pipelines built from configs and saved: as text-to-video (the
48-channel VAE, `expand_timesteps`) and as image-to-video (the image's latent as the first
frame at t = 0, left out of the error) it trains, predicts and samples as the pipelines
do. The two-expert A14B is in `test_wan22_experts.py`."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from common.errors import ConfigError
from tests.videodpo.tiny_models import build_tiny_wan22_pipeline
from videodpo.config import RunConfig
from videodpo.models import load_adapter
from videodpo.trainer import train

PROMPT = "a red square moving left"


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return build_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22") / "ti2v", "ti2v_5b")


def test_ti2v_5b_loads_with_its_48_channel_vae(ti2v_dir):
    adapter = load_adapter(ti2v_dir)
    assert adapter.family == "wan" and adapter.task == "t2v"
    assert adapter.pipeline.config.expand_timesteps
    assert (adapter.temporal_compression, adapter.pipeline.vae_scale_factor_spatial) == (4, 16)
    clips = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    latents = adapter.encode_video(clips)
    assert latents.shape == (1, 48, 2, 4, 4)
    vae = adapter.vae
    with torch.no_grad():  # normalized with the 48 per-channel statistics
        raw = vae.encode(clips).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    assert adapter.decode_latents(latents).shape == clips.shape


def test_ti2v_5b_predict_is_the_pipelines_per_token_timestep_forward(ti2v_dir):
    adapter = load_adapter(ti2v_dir)
    cond = adapter.prepare_conditions([PROMPT])
    noisy = torch.randn(2, 48, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 120.0])
    got = adapter.predict(adapter.transformer, noisy, t, dict(cond, text=cond["text"].expand(2, -1, -1)))
    # WanPipeline with expand_timesteps: a timestep per token, (mask[:, ::2, ::2] * t).flatten()
    mask = torch.ones(1, 1, 2, 4, 4)
    per_token = torch.stack([(mask[0][0][:, ::2, ::2] * ti).flatten() for ti in t])
    with torch.no_grad():
        want = adapter.transformer(hidden_states=noisy, timestep=per_token,
                                   encoder_hidden_states=cond["text"].expand(2, -1, -1), return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ti2v_5b_sampling_matches_the_pipeline(ti2v_dir):
    adapter = load_adapter(ti2v_dir)
    cond = adapter.prepare_conditions([PROMPT])
    got = adapter.sample(cond, (1, 48, 2, 4, 4), num_steps=2, generator=torch.Generator().manual_seed(3))
    pipe = WanPipeline.from_pretrained(ti2v_dir)
    want = pipe(PROMPT, num_frames=5, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=cond["text"].shape[1], generator=torch.Generator().manual_seed(3),
                output_type="latent").frames
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # validation / `videodpo sample`: decoded clips equal the pipeline's video
    from videodpo.validation import generate

    clips = generate(adapter, adapter.transformer, [PROMPT], 5, 64, 64, num_steps=2, seed=3)
    video = pipe(PROMPT, num_frames=5, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                 max_sequence_length=cond["text"].shape[1], generator=torch.Generator().manual_seed(3),
                 output_type="pt").frames  # (1, F, 3, H, W) in [0, 1]
    torch.testing.assert_close(clips, video.permute(0, 2, 1, 3, 4) * 2 - 1, rtol=1e-4, atol=1e-4)


def test_ti2v_5b_reg_dpo_step_trains_the_transformer(ti2v_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(2):
        chosen = torch.rand(3, 5, 64, 64, generator=g) * 2 - 1
        pairs.append({"chosen": chosen, "rejected": chosen.flip(-1), "caption": f"a square moving {i}"})
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.model.path = str(ti2v_dir)
    cfg.loss.kind, cfg.loss.beta = "reg_dpo", 100.0
    cfg.optim.lr, cfg.train.steps, cfg.train.batch_size = 1e-3, 1, 2
    adapter = load_adapter(ti2v_dir)
    before = {k: v.clone() for k, v in adapter.transformer.state_dict().items()}
    result = train(cfg, dataset=pairs, adapter=adapter)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    moved = WanPipeline.from_pretrained(result.export_dir).transformer.state_dict()  # the export
    assert any(not torch.equal(before[k], moved[k]) for k in before)


def test_ti2v_5b_image_to_video_predicts_and_samples_as_the_pipeline(tmp_path):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    model_dir = build_tiny_wan22_pipeline(tmp_path / "ti2v_i2v", "ti2v_5b_i2v")
    adapter = load_adapter(model_dir)
    assert adapter.task == "i2v" and adapter.image_first_frame
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(5)
    image = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    first = pipe.video_processor.preprocess(image, height=64, width=64)
    cond = adapter.prepare_conditions([PROMPT], first, 5)
    assert cond["image_latents"].shape == (1, 48, 1, 4, 4)  # the image's own latent, no mask channels
    # predict: the first latent frame is the image's, its tokens at t = 0 (the pipeline's forward)
    noisy = torch.randn(1, 48, 2, 4, 4, generator=g)
    t = torch.tensor([700.0])
    got = adapter.predict(adapter.transformer, noisy, t, cond)
    mask = torch.ones(1, 1, 2, 4, 4)
    mask[:, :, 0] = 0
    with torch.no_grad():
        want = adapter.transformer(hidden_states=(1 - mask) * cond["image_latents"] + mask * noisy,
                                   timestep=(mask[0][0][:, ::2, ::2] * t).flatten()[None],
                                   encoder_hidden_states=cond["text"], return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sampled = adapter.sample(cond, (1, 48, 2, 4, 4), num_steps=2, generator=torch.Generator().manual_seed(3))
    expected = pipe(image=image, prompt=PROMPT, num_frames=5, height=64, width=64, num_inference_steps=2,
                    guidance_scale=1.0, max_sequence_length=cond["text"].shape[1],
                    generator=torch.Generator().manual_seed(3), output_type="latent").frames
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)
    # the error leaves the image's frame out: what x0 holds there does not count
    x0 = torch.randn(2, 48, 2, 4, 4, generator=g)
    noise, tt = torch.randn(2, 48, 2, 4, 4, generator=g), torch.tensor([700.0, 300.0])
    two = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    with torch.no_grad():
        e = adapter.training_error(adapter.transformer, x0, noise, tt, two)
        other = x0.clone()
        other[:, :, 0] += 5
        torch.testing.assert_close(adapter.training_error(adapter.transformer, other, noise, tt, two), e)
        other[:, :, 1] += 5
        assert (adapter.training_error(adapter.transformer, other, noise, tt, two) - e).abs().min() > 1


def test_ti2v_5b_image_to_video_reg_dpo_step_from_a_t2v_folder(ti2v_dir, tmp_path):
    """`model.task: i2v` trains the TI2V-5B folder (saved as WanPipeline) on first frames;
    a Wan2.1 text-to-video folder refuses it (its transformer has no image input)."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(2):
        chosen = torch.rand(3, 5, 64, 64, generator=g) * 2 - 1
        pairs.append({"chosen": chosen, "rejected": chosen.roll(8, dims=-1), "caption": f"a square moving {i}"})
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.model.path, cfg.model.task = str(ti2v_dir), "i2v"
    cfg.loss.kind, cfg.loss.beta = "reg_dpo", 100.0
    cfg.optim.lr, cfg.train.steps, cfg.train.batch_size, cfg.data.num_workers = 1e-3, 1, 2, 0
    start = WanPipeline.from_pretrained(ti2v_dir).transformer.state_dict()
    result = train(cfg, dataset=pairs)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    moved = WanPipeline.from_pretrained(result.export_dir).transformer.state_dict()
    assert sum(not torch.equal(start[k], moved[k]) for k in start) > len(start) // 2
    from tests.videodpo.tiny_models import build_tiny_wan_pipeline

    wan21 = build_tiny_wan_pipeline(tmp_path / "wan21", "t2v")
    with pytest.raises(ConfigError, match="model.task=i2v"):
        load_adapter(wan21, task="i2v")


def test_memory_estimator_rows_for_wan22(ti2v_dir):
    from tools.memory_estimator import (
        WAN22_T2V_A14B_EXPERT,
        WAN22_TI2V_5B,
        ModelDims,
        latent_size,
        param_count,
    )

    transformer = WanPipeline.from_pretrained(ti2v_dir).transformer  # 48 channels in and out
    assert param_count(ModelDims.from_wan_config(dict(transformer.config))) == sum(
        p.numel() for p in transformer.parameters())
    assert abs(param_count(WAN22_TI2V_5B) / 5.0e9 - 1) < 0.01  # the published sizes
    assert abs(param_count(WAN22_T2V_A14B_EXPERT) / 14.3e9 - 1) < 0.01
    assert latent_size((704, 1280), WAN22_TI2V_5B.vae_spatial) == (44, 80)  # 16x VAE


def test_shipped_wan22_config_loads():
    from pathlib import Path

    from common.config import load_config
    from videodpo.state import validate_config

    path = Path(__file__).parents[2] / "configs" / "video" / "wan2.2_ti2v_5b_regdpo.yaml"
    cfg = load_config(RunConfig, path)
    validate_config(cfg)
    assert cfg.loss.kind == "reg_dpo" and cfg.parallel.pair == 2 and cfg.lora.export_format == "both"
    assert cfg.data.height % 32 == 0 and cfg.data.width % 32 == 0 and (cfg.data.num_frames - 1) % 4 == 0


@pytest.mark.parametrize("kind", ["ti2v_5b", "a14b"])
def test_build_pairs_generates_through_the_wan22_pipeline(kind, ti2v_dir, tmp_path):
    """GT-Pairs from a Wan2.2 pipeline: the rejected clip is the pipeline's own output (the
    A14B pipeline routes its steps to both experts itself)."""
    from tests.videodpo.synthetic_clips import write_dataset
    from tests.videodpo.test_build_pairs import TOL, _cfg, _direct
    from videodpo.build_pairs import build_gt_pairs
    from videodpo.data.manifest import read_manifest
    from videodpo.data.synthetic import WorldConfig
    from videodpo.data.video_io import load_clip

    model = ti2v_dir if kind == "ti2v_5b" else build_tiny_wan22_pipeline(tmp_path / "a14b", "a14b")
    world = WorldConfig(height=64, width=64, num_frames=5, shape_size=16)
    clips = write_dataset(tmp_path / "clips", world, num_clips=2, seed=0)
    summary = build_gt_pairs(_cfg(clips, model, tmp_path / "out"))
    assert (summary.done, summary.failed) == (2, 0)
    pairs, sources = read_manifest(tmp_path / "out" / "pairs.jsonl"), read_manifest(clips)
    ref = _direct(model, sources[1]["caption"], 12, (5, 64, 64))
    assert (load_clip(pairs[1]["rejected"]) - ref).abs().max() <= TOL


def test_build_pairs_image_to_video_from_the_ti2v_text_to_video_folder(ti2v_dir, tmp_path):
    """Wan2.2-TI2V-5B ships as a `WanPipeline` folder; `task: i2v` generates the rejected
    clip from the row's first frame through `WanImageToVideoPipeline` on the same weights."""
    from tests.videodpo.synthetic_clips import write_dataset
    from tests.videodpo.test_build_pairs import TOL, _cfg, _direct
    from videodpo.build_pairs import build_gt_pairs, load_pipeline
    from videodpo.data.manifest import read_manifest
    from videodpo.data.synthetic import WorldConfig
    from videodpo.data.video_io import load_clip, to_pil_image

    world = WorldConfig(height=64, width=64, num_frames=5, shape_size=16)
    clips = write_dataset(tmp_path / "clips", world, num_clips=2, seed=0)
    summary = build_gt_pairs(_cfg(clips, ti2v_dir, tmp_path / "out", task="i2v"))
    assert (summary.done, summary.failed) == (2, 0)
    pairs, sources = read_manifest(tmp_path / "out" / "pairs.jsonl"), read_manifest(clips)
    pipe, task = load_pipeline(ti2v_dir, torch.float32, "i2v")
    assert (type(pipe).__name__, task) == ("WanImageToVideoPipeline", "i2v")
    first = load_clip(sources[1]["video"])[:, 0]
    out = pipe(image=to_pil_image(first), prompt=sources[1]["caption"], height=64, width=64, num_frames=5,
               num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(12),
               output_type="np", max_sequence_length=16).frames[0]
    want = torch.as_tensor(out).float().permute(3, 0, 1, 2) * 2 - 1
    got = load_clip(pairs[1]["rejected"])
    assert (got - want).abs().max() <= TOL
    text_only = _direct(ti2v_dir, sources[1]["caption"], 12, (5, 64, 64))
    assert (got - text_only).abs().max() > 10 * TOL  # the image changed the generation
    with pytest.raises(ConfigError, match="holds a t2v pipeline"):
        load_pipeline(build_tiny_wan22_pipeline(tmp_path / "a14b", "a14b"), torch.float32, "i2v")
    # the other way: a TI2V folder saved as WanImageToVideoPipeline serves text-to-video
    saved_i2v = build_tiny_wan22_pipeline(tmp_path / "ti2v_i2v", "ti2v_5b_i2v")
    pipe, task = load_pipeline(saved_i2v, torch.float32, "t2v")
    assert (type(pipe).__name__, task, pipe.config.expand_timesteps) == ("WanPipeline", "t2v", True)
