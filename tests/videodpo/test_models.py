"""One training step per model family, task and loss on tiny models, checked against a
hand-assembled loss and a separate AdamW step; adapters against direct diffusers calls."""

from __future__ import annotations

import copy

import pytest
import torch

from videodpo.config import RunConfig
from videodpo.data.pairs import random_pair_batch
from videodpo.models.tiny import build_pixel_adapter
from videodpo.objective import per_sample_error
from videodpo.step import build_training_step


def _cfg(kind: str, lr: float = 1e-3) -> RunConfig:
    cfg = RunConfig()
    cfg.loss.kind, cfg.loss.beta, cfg.loss.sft_weight = kind, 200.0, 0.7
    cfg.optim.lr, cfg.optim.grad_clip = lr, 0.0
    cfg.train.steps = 10
    return cfg


def _hand_step(adapter, model, reference, batch, cfg, gen_state):
    """The loss of docs/design.md section 2 written out, and its gradient on `model`."""
    g = torch.Generator()
    g.set_state(gen_state)
    obj = adapter.objective
    b = batch.chosen.shape[0]
    t = obj.sample_timesteps(b, g)
    noise = torch.randn(batch.chosen.shape, generator=g)

    def err(m, x):
        pred = adapter.predict(m, obj.add_noise(x, noise, t), t, batch.cond)
        return ((pred - obj.target(x, noise, t)) ** 2).flatten(1).mean(1)

    ew = err(model, batch.chosen)
    if cfg.loss.kind == "sft":
        loss = ew.mean()
    else:
        el = err(model, batch.rejected)
        with torch.no_grad():
            rw, rl = err(reference, batch.chosen), err(reference, batch.rejected)
        d = (ew - rw) - (el - rl)
        dpo = -torch.nn.functional.logsigmoid(-(cfg.loss.beta / 2) * d)
        lam = cfg.loss.sft_weight if cfg.loss.kind == "reg_dpo" else 0.0
        loss = (dpo + lam * ew).mean()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("task", ["t2v", "i2v"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "reg_dpo"])
def test_one_training_step_matches_hand_written_loss_and_update(family, task, kind):
    cfg = _cfg(kind)
    adapter = build_pixel_adapter(family, task, seed=0, height=8, width=8, num_frames=4)
    expect_model = copy.deepcopy(adapter.transformer)
    reference = copy.deepcopy(adapter.transformer)
    batch = random_pair_batch(adapter, batch_size=2, num_frames=4, height=8, width=8, seed=1)
    step_fn, state = build_training_step(cfg, adapter)
    gen_state = state.generator.get_state()
    metrics = step_fn(batch)
    expect_loss = _hand_step(adapter, expect_model, reference, batch, cfg, gen_state)
    assert metrics["loss"] == pytest.approx(expect_loss, rel=1e-5)
    got = dict(state.policy.named_parameters())
    before = dict(reference.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in expect_model.parameters())
    for name, p in expect_model.named_parameters():
        tol = 1e-5 * scale + 1e-7  # batching pair samples together reorders float sums
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=tol)
        # AdamW's first step is -lr * g / (|g| + eps) (bias corrections cancel).
        g = got[name].grad
        want = -cfg.optim.lr * g / (g.abs() + cfg.optim.eps)
        torch.testing.assert_close(
            got[name].detach() - before[name].detach(), want, rtol=1e-3, atol=1e-7
        )
    if kind != "sft":  # the frozen reference copy does not move
        for name, p in state.reference.named_parameters():
            torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=0, atol=0)


def test_wan_predict_is_the_diffusers_forward_with_i2v_channels_concatenated():
    adapter = build_pixel_adapter("wan", "i2v", seed=0)
    clips = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    cond = adapter.image_conditions(clips[:, :, 0], 8)
    mask, first = cond["image_latents"][:, :1], cond["image_latents"][:, 1:]
    assert torch.equal(mask[:, 0, 0], torch.ones(2, 16, 16)) and mask[:, :, 1:].abs().sum() == 0
    assert torch.equal(first[:, :, 0], clips[:, :, 0]) and first[:, :, 1:].abs().sum() == 0
    text = torch.randn(2, 5, 32)
    noisy, t = torch.randn(2, 3, 8, 16, 16), torch.tensor([100.0, 800.0])
    got = adapter.predict(adapter.transformer, noisy, t, {"text": text, **cond})
    want = adapter.transformer(
        torch.cat([noisy, cond["image_latents"]], 1), t, text, return_dict=False
    )[0]
    torch.testing.assert_close(got, want)


def test_cogvideox_predict_permutes_to_frames_first():
    adapter = build_pixel_adapter("cogvideox", "t2v", seed=0)
    text = torch.randn(2, 5, 32)
    noisy, t = torch.randn(2, 3, 8, 16, 16), torch.tensor([100, 800])
    got = adapter.predict(adapter.transformer, noisy, t, {"text": text})
    want = adapter.transformer(noisy.permute(0, 2, 1, 3, 4), text, t, return_dict=False)[0]
    torch.testing.assert_close(got, want.permute(0, 2, 1, 3, 4))
    assert adapter.objective.kind == "v_prediction"


def test_sampling_with_a_perfect_predictor_recovers_the_clean_latent():
    """The sampling loop plus scheduler, fed the exact velocity of a fixed x0, lands on x0."""
    adapter = build_pixel_adapter("wan", "t2v", seed=0)
    x0 = torch.rand(1, 3, 4, 8, 8) * 2 - 1

    class Oracle(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, **kw):
            sigma = (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
            eps = (hidden_states - (1 - sigma) * x0) / sigma.clamp_min(1e-6)
            return (eps - x0,)

    out = adapter.sample(
        {"text": torch.zeros(1, 5, 32)}, x0.shape, num_steps=8, transformer=Oracle()
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_tiny_diffusers_wan_pipeline_loads_and_encodes(tmp_path):
    from tests.videodpo.tiny_models import build_tiny_wan_pipeline
    from videodpo.models import load_adapter

    path = build_tiny_wan_pipeline(tmp_path / "wan", "t2v")
    adapter = load_adapter(path)
    assert adapter.family == "wan" and adapter.task == "t2v" and not adapter.pixel_space
    clips = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = adapter.encode_video(clips)
    assert latents.shape == (1, 16, 2, 4, 4)
    cond = adapter.prepare_conditions(["a red square moving left"])
    t = torch.tensor([500.0])
    pred = adapter.predict(adapter.transformer, torch.randn_like(latents), t, cond)
    assert pred.shape == latents.shape
    assert per_sample_error(pred, latents).shape == (1,)
    assert adapter.decode_latents(latents).shape == clips.shape


@pytest.mark.parametrize("offload", [False, True])
def test_raw_clips_encode_on_the_encoder_device_and_offload_after(tmp_path, offload):
    """`collate_pairs` encodes inside `encoders_on_device`: the text encoder gets the
    encoder device, and with offloading the VAE and text encoder go back to the CPU
    after each use (a second `to`); the GPU half of this is in tests/test_cuda_paths.py."""
    from unittest import mock

    from tests.videodpo.tiny_models import build_tiny_wan_pipeline
    from videodpo.data.pairs import collate_pairs
    from videodpo.models import load_adapter

    adapter = load_adapter(build_tiny_wan_pipeline(tmp_path / "wan", "t2v"))
    adapter.place_encoders(torch.device("cpu"), offload=offload)
    moves: list[str] = []
    for name in ("vae", "text_encoder"):
        module = getattr(adapter.pipeline, name)
        real_to = module.to

        def recording_to(*args, _name=name, _to=real_to, **kwargs):
            moves.append(_name)
            return _to(*args, **kwargs)

        module.to = recording_to
    clip = torch.rand(3, 5, 32, 32) * 2 - 1
    items = [{"chosen": clip, "rejected": clip.flip(-1), "caption": "a red square moving left"}]
    pipe = adapter.pipeline
    with mock.patch.object(pipe, "encode_prompt", wraps=pipe.encode_prompt) as encode_prompt:
        batch = collate_pairs(adapter, items)
    assert encode_prompt.call_args.kwargs["device"] == torch.device("cpu")
    assert batch.chosen.shape == (1, 16, 2, 4, 4) and batch.cond["text"].shape[0] == 1
    assert moves == (["vae", "text_encoder"] * (2 if offload else 1))
