"""Reg-DPO with general clips (`regularizer:` section): the projector with `feasible: none`
is the plain Reg-DPO step, with `mean` the general SFT error's gradient; 2 FSDP2 ranks
equal one process; pair parallelism is refused before training; a killed run resumes
bit-identically; mix mode adds the general error to the loss."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from common.regularizer import RegularizerConfig
from tests.killing import killed_after
from tests.multiproc import run_on_ranks
from tests.videodpo.test_trainer import WORLD, PairList, _adapter, _cfg
from videodpo.data.pairs import collate_pairs
from videodpo.data.synthetic import render_batch, sample_records
from videodpo.models.tiny import build_pixel_adapter
from videodpo.regularized_step import (
    GeneralClips,
    RegDpoSampleLoss,
    build_video_regularizer,
    general_training_step,
    pair_batch,
)
from videodpo.state import build_training_state
from videodpo.step import training_step
from videodpo.trainer import train

# Weights agree to 0; a bias gradient is a sum over ~500 tokens, formed by the ghost path as
# a ones-column product: fp32 summation order moves it by up to 3e-6 (2e-5 relative).
TOL = {"rtol": 2e-5, "atol": 5e-6}


def _general(adapter) -> GeneralClips:
    records = sample_records(WORLD, 6, seed=11)
    clips = render_batch(records)
    from videodpo.data.synthetic import caption

    text = adapter.encode_prompts([caption(r) for r in records])
    return GeneralClips([{"clip": adapter.encode_video(c[None])[0], "text": t}
                         for c, t in zip(clips, text)], "test")


def _run_cfg(tmp_path, feasible="subset", family="wan", **kw):
    cfg = _cfg(tmp_path, **kw)
    cfg.optim.grad_clip, cfg.optim.warmup_steps = 0.0, 0
    cfg.regularizer.mode = "projector"
    cfg.regularizer.general_cache = "in-memory"
    cfg.regularizer.projector = RegularizerConfig(feasible=feasible, n_general=3, path="ghost",
                                                  granularity="layer")
    return cfg


def _family_adapter(family):
    if family == "wan":
        return _adapter()
    return build_pixel_adapter("cogvideox", "t2v", seed=0, height=8, width=8, num_frames=4)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _batch(adapter):
    data = PairList()
    return collate_pairs(adapter, [data[0], data[1]])


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_feasible_none_is_the_plain_reg_dpo_step(tmp_path, family):
    cfg = _run_cfg(tmp_path, feasible="none")
    plain = build_training_state(cfg, _family_adapter(family))
    training_step(plain, [_batch(plain.adapter)])
    expected = _grads(plain.policy)

    state = build_training_state(cfg, _family_adapter(family))
    general = _general(state.adapter)
    metrics = general_training_step(state, [_batch(state.adapter)], general,
                                    build_video_regularizer(state))
    got = _grads(state.policy)
    assert set(got) == set(expected) and len(got) > 10
    assert sum(bool(g.any()) for g in expected.values()) > 10  # a step that would move the weights
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **TOL, msg=k)
    assert metrics["projector/cos_update_target"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_feasible_mean_is_the_general_sft_error_gradient(tmp_path, family):
    cfg = _run_cfg(tmp_path, feasible="mean")
    plain = build_training_state(cfg, _family_adapter(family))
    general = _general(plain.adapter)
    batch = general.draw(plain.adapter, 3, cfg.train.seed, 0)
    RegDpoSampleLoss(plain)(plain.policy, batch).mean().backward()
    expected = _grads(plain.policy)

    state = build_training_state(cfg, _family_adapter(family))
    general_training_step(state, [_batch(state.adapter)], general, build_video_regularizer(state))
    got = _grads(state.policy)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **TOL, msg=k)


def _on_rank(rank, world, out_dir, cfg, pairs):
    state = build_training_state(cfg, _adapter())
    general = _general(state.adapter)
    general_training_step(state, [pairs[rank]], general, build_video_regularizer(state))
    return {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for k, p in state.policy.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_projector_on_two_fsdp_ranks_matches_one_process(tmp_path):
    cfg = _run_cfg(tmp_path, feasible="subset")
    adapter = _adapter()
    data = PairList()
    pairs = [collate_pairs(adapter, [data[0], data[1]]), collate_pairs(adapter, [data[2], data[3]])]
    # one process: the two ranks' pairs, each with t and noise from that rank's generator
    state = build_training_state(cfg, _adapter())
    parts = []
    for rank, pair in enumerate(pairs):
        state.generator.manual_seed(cfg.train.seed + 7919 * rank)
        parts.append(pair_batch(state, pair))
    target = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    general = _general(state.adapter)
    regularizer = build_video_regularizer(state)
    regularizer.step(RegDpoSampleLoss(state), target,
                     general.draw(state.adapter, 3, cfg.train.seed, 0))
    expected = _grads(state.policy)

    results = run_on_ranks(_on_rank, 2, str(tmp_path), cfg, pairs)
    for grads in results:
        assert set(grads) == set(expected)
        for k in expected:
            torch.testing.assert_close(grads[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("keys", [{"pair": 2}, {"cp": 2}])
def test_regularizer_with_pair_or_context_parallelism_stops_before_training(tmp_path, keys):
    cfg = _run_cfg(tmp_path)
    for key, value in keys.items():
        setattr(cfg.parallel, key, value)
    with pytest.raises(ConfigError) as err:
        train(cfg, dataset=PairList(), adapter=_adapter())
    message = str(err.value)
    assert "\n" not in message and "regularizer.mode" in message
    assert "parallel.pair" in message and "parallel.cp" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_kill_and_resume_with_the_projector_is_bit_identical(tmp_path):
    def run(root, resume=False):
        cfg = _run_cfg(root, steps=4)
        cfg.train.checkpoint_every = 2
        adapter = _adapter()
        result = train(cfg, dataset=PairList(), adapter=adapter, resume=resume, general_clips=_general(adapter))
        return adapter, result

    full, result = run(tmp_path / "a")
    assert "projector/update_norm" in result.history[-1]
    with killed_after(3):
        run(tmp_path / "b")
    torch.manual_seed(123)
    resumed, _ = run(tmp_path / "b", resume=True)
    start = _adapter().transformer.state_dict()
    moved = 0
    for (name, p), (_, q) in zip(full.transformer.named_parameters(),
                                 resumed.transformer.named_parameters()):
        assert torch.equal(p, q), name
        moved += int(not torch.equal(p.detach(), start[name]))
    assert moved > 10


def test_mix_mode_adds_the_general_error(tmp_path):
    cfg = _run_cfg(tmp_path)
    cfg.regularizer.mode, cfg.regularizer.mix_weight = "mix", 0.5
    state = build_training_state(cfg, _adapter())
    general = _general(state.adapter)
    batch = _batch(state.adapter)
    metrics = general_training_step(state, [batch], general, None)
    got = _grads(state.policy)

    ref = build_training_state(cfg, _adapter())
    loss_fn = RegDpoSampleLoss(ref)
    pairs = loss_fn(ref.policy, pair_batch(ref, batch))
    (pairs.mean() + 0.5 * loss_fn(ref.policy, general.draw(ref.adapter, 3, 0, 0)).mean()).backward()
    assert sum(bool(g.any()) for g in got.values()) > 10  # a step that would move the weights
    for k, g in _grads(ref.policy).items():
        torch.testing.assert_close(got[k], g, **TOL, msg=k)
    assert metrics["general_sft"] > 0
