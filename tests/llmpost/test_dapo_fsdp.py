"""FSDP2 on 2 gloo processes takes the same DAPO update as one process with the whole
batch (token-level mean over all ranks, several mini-batches, micro-batches, clipping)."""

import random

import pytest
import torch

from common.fsdp import apply_fsdp, full_state_dict
from llmpost.config import DapoConfig
from llmpost.dapo_trainer import PolicyBatch, dapo_update
from llmpost.model import tiny_qwen3
from llmpost.rollout import pack_right_padded, token_logprobs
from tests.multiproc import run_on_ranks

VOCAB, PAD = 40, 0


def _model():
    return tiny_qwen3(VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_positions=64, pad_token_id=PAD, eos_token_id=1)


def _batch(model, n, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    responses = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 7))] for _ in range(n)]
    ids, attn, mask = pack_right_padded(prompts, responses, PAD)
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, attn)
    gen = torch.Generator().manual_seed(seed)
    old = []
    for b, r in enumerate(responses):  # old log-probs off by up to +-0.5: some ratios clip
        cur = logp[b][mask[b].bool()]
        old.append((cur + (torch.rand(len(r), generator=gen) - 0.5)).tolist())
    adv = torch.randn(n, generator=gen)
    return PolicyBatch(prompts, responses, old, adv, ["t"] * n)


def _cfg():
    return DapoConfig(epochs=2, mini_batches=2, micro_batch_size=2, grad_clip=0.5, lr=1e-2,
                      dual_clip=3.0)


def _update(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=_cfg().lr)
    dapo_update(model, opt, batch, _cfg(), PAD)


def _on_rank(rank, world, state, shards):
    model = _model()
    model.load_state_dict(state)
    apply_fsdp(model)
    _update(model, shards[rank])
    return full_state_dict(model)


def _cat(*batches):
    return PolicyBatch(
        [p for b in batches for p in b.prompts], [r for b in batches for r in b.responses],
        [o for b in batches for o in b.old_logprobs],
        torch.cat([b.advantages for b in batches]), [t for b in batches for t in b.tasks])


def test_fsdp_two_ranks_match_one_process():
    torch.manual_seed(0)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shards = [_batch(model, 6, seed=1), _batch(model, 6, seed=2)]
    # One process: mini-batch k is the union of the ranks' k-th mini-batches.
    half = [list(range(0, 3)), list(range(3, 6))]
    whole = _cat(*(s.select(h) for h in half for s in shards))
    _update(model, whole)
    expected = model.state_dict()

    results = run_on_ranks(_on_rank, 2, state, shards)
    for result in results:
        for name, value in expected.items():
            torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = sum((expected[k] - state[k]).abs().sum() for k in state)
    assert moved > 0


def _pipeline_on_rank(rank, world, cfg):
    from llmpost.pipeline import run_stage

    return [run_stage(cfg, stage)["tasks"] for stage in (0, 1, 2, 3)]


@pytest.mark.slow
def test_pipeline_on_two_ranks(tmp_path, word_tokenizer):
    """Stages 0-3 under FSDP2 on 2 processes: synced generation, dynamic sampling rounds,
    sharded evaluation and saving all stay in step across ranks."""
    from llmpost.tasks import write_suite
    from tests.llmpost.test_pipeline import _config

    paths = write_suite(tmp_path / "data", n_train=20, n_eval=3, seed=0)
    word_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    cfg = _config((tmp_path, paths), tmp_path / "run")
    results = run_on_ranks(_pipeline_on_rank, 2, cfg)
    assert results[0] == results[1]
    assert (tmp_path / "run" / "stage3" / "model" / "model.safetensors").exists()


def test_kl_term_alone_gives_the_k3_gradient():
    """With zero advantages the policy term has no gradient; the update is the KL's."""
    from dataclasses import replace

    from llmpost.dapo import kl_k3

    torch.manual_seed(0)
    model = _model()
    batch = _batch(model, 4, seed=3)
    batch.advantages = torch.zeros(4)
    gen = torch.Generator().manual_seed(1)
    batch.ref_logprobs = [[x + float(torch.randn(1, generator=gen)) * 0.3 for x in o]
                          for o in batch.old_logprobs]
    reference = _model()
    reference.load_state_dict(model.state_dict())
    cfg = replace(_cfg(), epochs=1, mini_batches=1, micro_batch_size=0, grad_clip=0.0,
                  kl_coef=0.5)
    dapo_update(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, cfg, PAD)

    ids, attn, mask = pack_right_padded(batch.prompts, batch.responses, PAD)
    logp, _ = token_logprobs(reference, ids, attn)
    ref = torch.zeros_like(logp)
    for b, r in enumerate(batch.ref_logprobs):
        ref[b, mask[b].nonzero().squeeze(-1)] = torch.tensor(r)
    loss = 0.5 * (kl_k3(logp, ref) * mask).sum() / mask.sum()
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def _metric_inputs(rank):
    """Rank-specific groups: rank 0 saw tasks a and b, rank 1 only b (and one of its own)."""
    from types import SimpleNamespace

    from llmpost.dapo import SampledGroup

    def group(task, rewards, lengths):
        return SampledGroup(rewards, {"record": SimpleNamespace(task=task), "correct": rewards,
                                      "lengths": lengths, "truncated": [x > 5 for x in lengths]})

    if rank == 0:
        seen = [group("a", [1.0, 0.0], [3, 7]), group("b", [1.0, 1.0], [2, 2])]
        kept, clip, ent, loss = seen[:1], [0.5, 0.0], [1.0, 2.0], 0.25
    else:
        seen = [group("b", [0.0, 1.0], [9, 4]), group("c", [0.0, 0.0], [1, 1])]
        kept, clip, ent, loss = seen[:1], [0.25, 0.25], [3.0, 4.0], 0.75
    tasks = [g.data["record"].task for g in kept for _ in range(2)]
    update = {"loss": loss, "clip_frac": torch.tensor(clip), "entropy": torch.tensor(ent)}
    return seen, kept, SimpleNamespace(tasks=tasks), update


def _metrics_on_rank(rank, world):
    from llmpost.dapo_trainer import _step_metrics

    seen, kept, batch, update = _metric_inputs(rank)
    return _step_metrics(seen, kept, batch, update, group_size=2)


def test_step_metrics_pool_every_ranks_groups():
    """Per-task and overall metrics on 2 ranks are those of all groups together, on both
    ranks (not rank 0's share); the loss is the mean of the ranks' losses."""
    from types import SimpleNamespace

    from llmpost.dapo_trainer import _step_metrics

    (s0, k0, b0, u0), (s1, k1, b1, u1) = _metric_inputs(0), _metric_inputs(1)
    update = {"loss": (u0["loss"] + u1["loss"]) / 2,
              "clip_frac": torch.cat([u0["clip_frac"], u1["clip_frac"]]),
              "entropy": torch.cat([u0["entropy"], u1["entropy"]])}
    want = _step_metrics(s0 + s1, k0 + k1, SimpleNamespace(tasks=b0.tasks + b1.tasks), update, 2)
    assert want["b/reward"] == pytest.approx(0.75) and "c/accuracy" in want
    for got in run_on_ranks(_metrics_on_rank, 2):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value), key
