"""Wan2.2 A14B's two experts on tiny pipelines built from configs: routing by timestep,
`train.experts` both / high / low, per-expert LoRA and export, sampling as the pipeline
does, pair parallelism and FSDP lockstep on two gloo ranks, and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from common.errors import ConfigError
from tests.killing import killed_after
from tests.videodpo.tiny_models import build_tiny_wan22_pipeline
from videodpo.config import RunConfig
from videodpo.models import load_adapter
from videodpo.models.experts import TimestepExperts
from videodpo.state import build_training_state
from videodpo.trainer import train

PROMPT = "a red square moving left"
BOUNDARY = 875.0  # boundary_ratio 0.875 of 1000 train timesteps


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory):
    return build_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22") / "a14b", "a14b")


def _pairs(n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        chosen = torch.rand(3, 5, 16, 16, generator=g) * 2 - 1
        pairs.append({"chosen": chosen, "rejected": chosen.flip(-1), "caption": f"a square moving {i}"})
    return pairs


def _cfg(out_dir: Path, model_dir: Path, experts: str = "both", lora: bool = False, steps: int = 1) -> RunConfig:
    cfg = RunConfig(out_dir=str(out_dir))
    cfg.model.path, cfg.model.flow_shift = str(model_dir), 5.0  # the pipelines' shift: 42% of t >= boundary
    cfg.loss.kind, cfg.loss.beta = "reg_dpo", 100.0
    cfg.optim.lr, cfg.optim.eps = 1e-3, 1e-4
    cfg.train.steps, cfg.train.batch_size, cfg.train.experts, cfg.train.log_every = steps, 2, experts, 1
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = lora, 4, 8
    cfg.data.num_workers = 0
    return cfg


def _expert_states(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    experts = load_adapter(model_dir, encoders=False).transformer.experts
    return {n: {k: v.clone() for k, v in e.state_dict().items()} for n, e in experts.items()}


def test_a14b_loads_as_two_experts_split_at_the_boundary(a14b_dir):
    adapter = load_adapter(a14b_dir, encoders=False)
    model = adapter.transformer
    assert isinstance(model, TimestepExperts) and set(model.experts) == {"transformer", "transformer_2"}
    assert model.boundary == BOUNDARY
    assert model.route(torch.tensor([999.0, 875.0, 874.9, 10.0])).tolist() == [True, True, False, False]
    files = WanPipeline.from_pretrained(a14b_dir)
    for name in ("transformer", "transformer_2"):
        want = getattr(files, name).state_dict()
        got = model.experts[name].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_routing_sends_each_sample_to_its_expert_and_the_other_gets_no_gradient(a14b_dir):
    adapter = load_adapter(a14b_dir)
    model = adapter.transformer
    cond = adapter.prepare_conditions([PROMPT, PROMPT])
    noisy = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([950.0, 300.0])
    out = adapter.predict(model, noisy, t, cond)
    with torch.no_grad():
        for i, name in enumerate(["transformer", "transformer_2"]):  # high noise, then low noise
            want = adapter.predict(model.experts[name], noisy[i:i + 1], t[i:i + 1],
                                   {k: v[i:i + 1] for k, v in cond.items()})
            torch.testing.assert_close(out[i:i + 1], want, rtol=1e-5, atol=1e-6)
    for t_all, busy, idle in [(960.0, "transformer", "transformer_2"), (100.0, "transformer_2", "transformer")]:
        model.zero_grad(set_to_none=True)
        adapter.predict(model, noisy, torch.full((2,), t_all), cond).square().mean().backward()
        assert all(p.grad is None for p in model.experts[idle].parameters())
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.experts[busy].parameters())
    # lockstep (set under FSDP): the idle expert runs, adds exactly zero, and gets zero gradients
    model.zero_grad(set_to_none=True)
    model.lockstep = True
    locked = adapter.predict(model, noisy, torch.full((2,), 960.0), cond)
    model.lockstep = False
    torch.testing.assert_close(locked, adapter.predict(model, noisy, torch.full((2,), 960.0), cond), rtol=0, atol=0)
    locked.square().mean().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.experts["transformer_2"].parameters())


@pytest.mark.parametrize("experts", ["both", "high", "low"])
def test_reg_dpo_step_trains_only_the_chosen_experts(a14b_dir, tmp_path, experts):
    start = _expert_states(a14b_dir)
    cfg = _cfg(tmp_path / "run", a14b_dir, experts, steps=3)
    state = build_training_state(cfg)
    low, high = state.timestep_range
    assert (low, high) == {"both": (0.0, 1000.0), "high": (BOUNDARY, 1000.0), "low": (0.0, BOUNDARY)}[experts]
    drawn = state.adapter.objective.sample_timesteps(2000, torch.Generator().manual_seed(0), low, high)
    assert drawn.min() >= low and drawn.max() < high
    result = train(cfg, dataset=_pairs())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    exported = WanPipeline.from_pretrained(result.export_dir)  # both transformers in the export
    trained = {"both": {"transformer", "transformer_2"}, "high": {"transformer"}, "low": {"transformer_2"}}[experts]
    for name in ("transformer", "transformer_2"):
        now = getattr(exported, name).state_dict()
        moved = [k for k in now if not torch.equal(now[k], start[name][k])]
        if name in trained:
            assert len(moved) > len(now) // 2, (name, len(moved))
        else:
            assert moved == [], name


def test_lora_per_expert_exports_what_diffusers_loads_into_both_transformers(a14b_dir, tmp_path):
    cfg = _cfg(tmp_path / "run", a14b_dir, "both", lora=True, steps=2)
    cfg.lora.export_format = "both"
    cfg.validation.every, cfg.validation.prompts = 2, [PROMPT]  # validation samples with both experts
    cfg.sample.prompts = cfg.validation.prompts
    for section in (cfg.validation, cfg.sample):
        section.num_frames, section.height, section.width, section.num_steps = 5, 16, 16, 4
    adapter = load_adapter(a14b_dir)
    result = train(cfg, dataset=_pairs(), adapter=adapter)
    assert (tmp_path / "run" / "validation" / "step_0000002" / "contact_sheet.png").is_file()
    policy = adapter.transformer
    for name in ("transformer", "transformer_2"):
        lora_b = [p for n, p in policy.experts[name].named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() > 0 for p in lora_b), name
    out = result.export_dir
    assert (out / "high_noise" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "low_noise" / "wan_lora_original.safetensors").is_file()
    pipe = WanPipeline.from_pretrained(a14b_dir)
    pipe.load_lora_weights(out / "high_noise")
    pipe.load_lora_weights(out / "low_noise", load_into_transformer_2=True)
    cond = adapter.prepare_conditions([PROMPT])
    noisy = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, t in [("transformer", 950.0), ("transformer_2", 200.0)]:
            want = adapter.predict(policy, noisy, torch.tensor([t]), cond)
            got = adapter.predict(getattr(pipe, name), noisy, torch.tensor([t]), cond)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    # `videodpo sample` applies each expert's LoRA and samples with both, as the pipeline does
    from videodpo.sample import load_for_sampling
    from videodpo.validation import generate

    cfg.sample.checkpoint = str(out)
    sampler = load_for_sampling(cfg)
    clips = generate(sampler, sampler.transformer, [PROMPT], 5, 16, 16, num_steps=4, seed=3)
    video = pipe(PROMPT, num_frames=5, height=16, width=16, num_inference_steps=4, guidance_scale=1.0,
                 max_sequence_length=cond["text"].shape[1], generator=torch.Generator().manual_seed(3),
                 output_type="pt").frames
    torch.testing.assert_close(clips, video.permute(0, 2, 1, 3, 4) * 2 - 1, rtol=1e-4, atol=1e-4)
    from videodpo.cli import main

    assert main(["sample", "--config", str(tmp_path / "run" / "config.yaml")]) == 0  # the run's export
    assert (tmp_path / "run" / "samples" / "sample_000.mp4").is_file()


def test_sampling_routes_steps_to_both_experts_as_the_pipeline(a14b_dir):
    adapter = load_adapter(a14b_dir)
    cond = adapter.prepare_conditions([PROMPT])
    calls = {"transformer": 0, "transformer_2": 0}
    for name, expert in adapter.transformer.experts.items():
        expert.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    got = adapter.sample(cond, (1, 16, 2, 2, 2), num_steps=6, generator=torch.Generator().manual_seed(3))
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0
    pipe = WanPipeline.from_pretrained(a14b_dir)
    want = pipe(PROMPT, num_frames=5, height=16, width=16, num_inference_steps=6, guidance_scale=1.0,
                max_sequence_length=cond["text"].shape[1], generator=torch.Generator().manual_seed(3),
                output_type="latent").frames
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a14b_image_to_video_trains_and_samples_as_the_pipeline(tmp_path):
    model_dir = build_tiny_wan22_pipeline(tmp_path / "a14b_i2v", "a14b_i2v")
    adapter = load_adapter(model_dir)
    assert adapter.task == "i2v" and adapter.transformer.boundary == 900.0
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir)
    image = _image()
    first = pipe.video_processor.preprocess(image, height=16, width=16)
    cond = adapter.prepare_conditions([PROMPT], first, 5)
    got = adapter.sample(cond, (1, 16, 2, 2, 2), num_steps=4, generator=torch.Generator().manual_seed(2))
    want = pipe(image=image, prompt=PROMPT, num_frames=5, height=16, width=16, num_inference_steps=4,
                guidance_scale=1.0, max_sequence_length=cond["text"].shape[1],
                generator=torch.Generator().manual_seed(2), output_type="latent").frames
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    start = {k: v.clone() for k, v in adapter.transformer.state_dict().items()}
    result = train(_cfg(tmp_path / "run", model_dir, steps=1), dataset=_pairs(), adapter=adapter)
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
    now = adapter.transformer.state_dict()
    assert sum(not torch.equal(now[k], start[k]) for k in start) > len(start) // 2


def _image():
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())


def test_one_transformer_models_refuse_an_expert_choice(tmp_path):
    model_dir = build_tiny_wan22_pipeline(tmp_path / "ti2v", "ti2v_5b")
    with pytest.raises(ConfigError, match="train.experts=high"):
        build_training_state(_cfg(tmp_path / "run", model_dir, "high"))
    with pytest.raises(ConfigError, match=r"'train.experts' expects one of \[.both., .high., .low.\], got 'middle'"):
        build_training_state(_cfg(tmp_path / "run", model_dir, "middle"))


def test_kill_and_resume_with_two_experts_gives_identical_parameters(a14b_dir, tmp_path):
    straight = _cfg(tmp_path / "a", a14b_dir, "both", steps=4)
    straight.train.checkpoint_every = 2
    adapter = load_adapter(a14b_dir)
    train(straight, dataset=_pairs(4), adapter=adapter)
    broken = _cfg(tmp_path / "b", a14b_dir, "both", steps=4)
    broken.train.checkpoint_every = 2
    with killed_after(3):
        train(broken, dataset=_pairs(4), adapter=load_adapter(a14b_dir))
    resumed = load_adapter(a14b_dir)
    result = train(broken, resume=True, dataset=_pairs(4), adapter=resumed)
    assert result.steps == 4
    want, got = adapter.transformer.state_dict(), resumed.transformer.state_dict()
    start = _expert_states(a14b_dir)
    assert any(not torch.equal(want[f"transformer.{k}"], v) for k, v in start["transformer"].items())
    assert any(not torch.equal(want[f"transformer_2.{k}"], v) for k, v in start["transformer_2"].items())
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_shipped_a14b_config_loads():
    from common.config import load_config
    from videodpo.state import validate_config

    path = Path(__file__).parents[2] / "configs" / "video" / "wan2.2_t2v_a14b_regdpo.yaml"
    cfg = load_config(RunConfig, path)
    validate_config(cfg)
    assert cfg.train.experts in ("both", "high", "low") and cfg.lora.enabled and cfg.lora.export_format == "both"
    assert cfg.data.height % 16 == 0 and (cfg.data.num_frames - 1) % 4 == 0


# ---- two gloo ranks -------------------------------------------------------------------


def _two_rank_runs(rank, world_size, model_dir, out_dir):
    """pair=2 and cp=2 training (losses, parameters), and under FSDP over two data ranks the
    gradients of one step where rank 0's sample goes to the high-noise expert and rank
    1's to the low-noise one."""
    from common.fsdp import full_grads, full_state_dict

    cfg = _cfg(Path(out_dir) / "pair", model_dir, "both", steps=3)
    cfg.parallel.pair = 2
    adapter = load_adapter(model_dir)
    result = train(cfg, dataset=_pairs(4), adapter=adapter)
    pair = ([h["loss"] for h in result.history], full_state_dict(adapter.transformer))
    cfg = _cfg(Path(out_dir) / "cp", model_dir, "both", steps=3)
    cfg.parallel.cp = 2
    adapter = load_adapter(model_dir)
    result = train(cfg, dataset=_pairs(4), adapter=adapter)
    cp = ([h["loss"] for h in result.history], full_state_dict(adapter.transformer))

    cfg = _cfg(Path(out_dir) / "dp", model_dir, "both")
    state = build_training_state(cfg)
    assert state.policy.lockstep
    x, noise, t, cond = _routed_batch(state.adapter)
    state.adapter.training_error(state.policy, x[rank:rank + 1], noise[rank:rank + 1], t[rank:rank + 1],
                                 {k: v[rank:rank + 1] for k, v in cond.items()}).mean().backward()
    return pair, cp, full_grads(state.policy)


def _routed_batch(adapter):
    g = torch.Generator().manual_seed(7)
    x, noise = torch.randn(2, 16, 2, 2, 2, generator=g), torch.randn(2, 16, 2, 2, 2, generator=g)
    cond = {"text": adapter.encode_prompts(["a square moving left", "a square moving right"])}
    return x, noise, torch.tensor([950.0, 120.0]), cond


@pytest.mark.slow
def test_pair_and_context_parallel_and_fsdp_lockstep_with_two_experts_equal_one_process(a14b_dir, tmp_path):
    from tests.multiproc import run_on_ranks

    adapter = load_adapter(a14b_dir)
    cfg = _cfg(tmp_path / "single", a14b_dir, "both", steps=3)
    result = train(cfg, dataset=_pairs(4), adapter=adapter)
    losses, params = [h["loss"] for h in result.history], adapter.transformer.state_dict()
    start = _expert_states(a14b_dir)
    for name in ("transformer", "transformer_2"):  # both experts trained in the three steps
        assert any(not torch.equal(params[f"{name}.{k}"], v) for k, v in start[name].items()), name
    # one process, both samples: the gradient the two data ranks average to
    state = build_training_state(_cfg(tmp_path / "single_dp", a14b_dir, "both"))
    x, noise, t, cond = _routed_batch(state.adapter)
    state.adapter.training_error(state.policy, x, noise, t, cond).mean().backward()
    grads = {n: p.grad for n, p in state.policy.named_parameters()}
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.startswith("transformer."))
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.startswith("transformer_2."))

    for *runs, rank_grads in run_on_ranks(_two_rank_runs, 2, str(a14b_dir), str(tmp_path)):
        for rank_losses, rank_params in runs:  # pair 2, then Ulysses cp 2
            assert rank_losses == pytest.approx(losses, rel=1e-5)
            for name, p in params.items():
                # a key bias's true gradient is 0 (softmax ignores a shift shared by all keys):
                # AdamW turns its float noise into steps of up to lr * g / eps, a few 1e-5
                atol = 5e-5 if name.endswith("to_k.bias") else 1e-5
                torch.testing.assert_close(rank_params[name], p, rtol=0, atol=atol,
                                           msg=lambda m, name=name: f"{name}: {m}")
        assert rank_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(rank_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
