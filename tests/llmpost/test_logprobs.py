"""Chunked log-probs at scored positions only (llmpost.logprobs) equal the full-vocabulary
computation: log-probs, entropy and parameter gradients, on one process, under FSDP2, at
Qwen3's real vocabulary; the SFT loss equals plain cross-entropy; and the peak memory of
a DAPO update stays near one chunk's logits instead of the full `(B, S, V)` tensors.

`python -m tests.llmpost.test_logprobs {chunked|full} ROWS` prints the peak of one
update on the large-vocabulary workload (the numbers in the README).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmpost.logprobs import chunked_logprobs, response_logprobs, sampled_logprobs
from llmpost.model import tiny_qwen3
from llmpost.rollout import pack_right_padded
from llmpost.sft import IGNORE, collate_packed, collate_padded, completion_loss
from tests.multiproc import run_on_ranks

QWEN3_VOCAB = 151_936


def _model(vocab, hidden=32, layers=2, max_positions=64, seed=0):
    return tiny_qwen3(vocab, hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_positions=max_positions, pad_token_id=0,
                      eos_token_id=1, seed=seed)


def _ragged_batch(vocab, n, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    return pack_right_padded(prompts, responses, 0)


def _full_logprobs(model, ids, attn, temperature=1.0):
    """The plain computation: full `(B, S-1, V)` logits, log-softmax, gather, entropy."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1] / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach()


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_logprobs_entropy_and_gradients_equal_the_full_computation(chunk_size):
    model = _model(50).double()
    ids, attn, mask = _ragged_batch(50, 5, seed=1)
    weights = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    ref_logp, ref_entropy = _full_logprobs(model, ids, attn, temperature=0.7)
    (ref_logp * mask * weights).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    logp, entropy = response_logprobs(model, ids, attn, mask, temperature=0.7,
                                      chunk_size=chunk_size, with_entropy=True)
    (logp * weights).sum().backward()
    torch.testing.assert_close(logp, ref_logp * mask, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy * mask, rtol=0, atol=1e-12)
    assert not entropy.requires_grad
    _assert_grads_close(_grads(model), ref_grads, rtol=1e-10, atol=1e-12)


def test_no_grad_scoring_and_a_trained_head_under_a_frozen_body():
    model = _model(50).double()
    ids, attn, mask = _ragged_batch(50, 4, seed=3)
    ref_logp, _ = _full_logprobs(model, ids, attn)
    with torch.no_grad():
        logp, entropy = response_logprobs(model, ids, attn, mask, chunk_size=4)
    assert entropy is None and not logp.requires_grad
    torch.testing.assert_close(logp, ref_logp.detach() * mask, rtol=0, atol=1e-12)

    # hidden states that need no gradient under a trained head: the head's gradient arrives
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state.detach()
    sel = mask.bool()
    logp, _ = chunked_logprobs(model.lm_head, hidden[:, :-1][sel], ids[:, 1:][sel], chunk_size=3)
    logp.sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, _head_only_grad(model, ids, attn, mask),
                               rtol=1e-10, atol=1e-12)


def _head_only_grad(model, ids, attn, mask):
    """Gradient of the summed log-probs w.r.t. the head weight, hidden states held fixed."""
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state.detach()
    weight = model.lm_head.weight.detach().clone().requires_grad_()
    logits = hidden[:, :-1] @ weight.T
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (logp * mask).sum().backward()
    return weight.grad


def test_chunk_size_below_one_is_a_config_error_naming_the_key():
    from common.config import load_config
    from common.errors import ConfigError
    from llmpost.config import PipelineConfig

    for key in ("stage1.logprob_chunk_size", "stage2.logprob_chunk_size"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(PipelineConfig, None, [f"{key}=0"])


def test_bad_mask_shape_is_one_clear_error():
    model = _model(50)
    ids, attn, mask = _ragged_batch(50, 2, seed=4)
    with pytest.raises(ValueError, match="response_mask must have shape"):
        response_logprobs(model, ids, attn, mask[:, 1:])


def test_sampled_logprobs_equal_the_stacked_log_softmax():
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(3, 40, generator=gen) for _ in range(6)]
    tokens = torch.randint(0, 40, (3, 6), generator=gen)
    stacked = (torch.stack(steps, 1) / 0.8).log_softmax(-1)
    want = stacked.gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(sampled_logprobs(steps, tokens, 0.8), want)


def _sft_examples(seed):
    rng = random.Random(seed)
    out = []
    for _ in range(5):
        prompt = [rng.randrange(2, 50) for _ in range(rng.randint(1, 6))]
        answer = [rng.randrange(2, 50) for _ in range(rng.randint(1, 5))]
        out.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return out


def _old_completion_loss(model, batch, num_tokens=None):
    """The SFT loss before chunking: cross-entropy over the full `(B, S-1, V)` logits."""
    # use_cache=False: with a cache transformers ignores packed position ids (no block mask)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    denom = num_tokens if num_tokens is not None else (labels != IGNORE).sum().item()
    return total / max(float(denom), 1.0)


@pytest.mark.parametrize("collate", [collate_padded, collate_packed])
def test_sft_loss_and_gradient_equal_plain_cross_entropy(collate):
    model = _model(50).double()
    batch = collate(_sft_examples(6), 0, 24)
    want = _old_completion_loss(model, batch, num_tokens=7.0)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = completion_loss(model, batch, num_tokens=7.0, chunk_size=4)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    _assert_grads_close(_grads(model), want_grads, rtol=1e-10, atol=1e-12)
    # the default denominator is the batch's label count, as before
    with torch.no_grad():
        torch.testing.assert_close(completion_loss(model, batch), _old_completion_loss(model, batch),
                                   rtol=1e-12, atol=0)


def _fsdp_rank(rank, world, state, batches):
    from torch.distributed.tensor import DTensor

    from common.fsdp import apply_fsdp, full_grads

    model = _model(50)
    model.load_state_dict(state)
    apply_fsdp(model)
    ids, attn, mask = batches[rank]
    with torch.no_grad():  # a scoring pass first: it must leave the root resharded
        scored, _ = response_logprobs(model, ids, attn, mask, chunk_size=2)
    assert isinstance(model.lm_head.weight, DTensor)  # no backward will come to reshard it
    logp, entropy = response_logprobs(model, ids, attn, mask, temperature=0.7, chunk_size=2,
                                      with_entropy=True)
    (logp * mask).sum().backward()
    return scored, logp.detach(), entropy, full_grads(model)


@pytest.mark.slow
def test_fsdp_two_ranks_equal_the_full_computation():
    model = _model(50)
    batches = [_ragged_batch(50, 3, seed=7), _ragged_batch(50, 4, seed=8)]  # unequal chunk counts
    results = run_on_ranks(_fsdp_rank, 2, model.state_dict(), batches)
    ref_grads = []
    for (ids, attn, mask), (scored, logp, entropy, _) in zip(batches, results):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch.testing.assert_close(scored, _full_logprobs(model, ids, attn)[0] * mask)
        ref_logp, ref_entropy = _full_logprobs(model, ids, attn, temperature=0.7)
        (ref_logp * mask).sum().backward()
        ref_grads.append(_grads(model))
        torch.testing.assert_close(logp, ref_logp.detach() * mask)
        torch.testing.assert_close(entropy, ref_entropy * mask)
    mean_grads = {k: (ref_grads[0][k] + ref_grads[1][k]) / 2 for k in ref_grads[0]}
    for _, _, _, grads in results:  # FSDP averages the ranks' gradients
        _assert_grads_close(grads, mean_grads, rtol=1e-5, atol=1e-6)


def _long_batch(rows, response_len, prompt_len=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, QWEN3_VOCAB, (rows, prompt_len), generator=gen).tolist()
    responses = torch.randint(2, QWEN3_VOCAB, (rows, response_len), generator=gen).tolist()
    return prompts, responses


def _plain_reference_row(model, ids, attn, mask, weights, temperature, positions=16):
    """One sequence by the plain formula: full-vocabulary logits, `log_softmax`, gather and
    autograd at every position, `positions` at a time so that float64 fits in memory; the
    head's input gradient is summed over the blocks and sent through the body once (the
    chain rule, written out). Accumulates `(logp * weights).sum()`'s gradient."""
    hidden = model.model(input_ids=ids[None], attention_mask=attn[None]).last_hidden_state[0, :-1]
    leaf = hidden.detach().requires_grad_()
    logps, entropies = [], []
    for s in range(0, leaf.shape[0], positions):
        block = slice(s, s + positions)
        logp_all = (model.lm_head(leaf[block]) / temperature).log_softmax(-1)
        logp = logp_all.gather(-1, ids[1:][block, None]).squeeze(-1)
        (logp * mask[block] * weights[block]).sum().backward()
        logps.append(logp.detach())
        entropies.append(-(logp_all.exp() * logp_all).sum(-1).detach())
    hidden.backward(leaf.grad)
    return torch.cat(logps) * mask, torch.cat(entropies) * mask


@pytest.mark.slow
def test_qwen3_vocabulary_8_by_1024_response_tokens_equal_the_full_computation():
    """Qwen3's 151,936-token vocabulary, 8 x 1,024 response tokens, float64 on both sides
    (so 1e-6 is a real bound: the two differ by about 1e-13). A whole-batch `(8, 1039, V)`
    float64 logits tensor alone would be 10 GB, so the reference runs one sequence and a
    few positions at a time (rows do not interact; the plain formula per position)."""
    model = _model(QWEN3_VOCAB, layers=1, max_positions=2048).double()
    ids, attn, mask = pack_right_padded(*_long_batch(8, 1024), pad_id=0)
    assert int(mask.sum()) == 8 * 1024
    weights = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    logp, entropy = response_logprobs(model, ids, attn, mask, temperature=0.9, chunk_size=1000,
                                      with_entropy=True)
    (logp * weights).sum().backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    for b in range(ids.shape[0]):
        ref_logp, ref_entropy = _plain_reference_row(model, ids[b], attn[b], mask[b], weights[b], 0.9)
        torch.testing.assert_close(logp[b], ref_logp, rtol=0, atol=1e-6)
        torch.testing.assert_close(entropy[b], ref_entropy, rtol=0, atol=1e-6)
    _assert_grads_close(grads, _grads(model), rtol=1e-6, atol=1e-6)


def measure_update_peak(mode: str, rows: int, response_len: int = 1024) -> dict[str, float]:
    """Peak memory (VmHWM growth, MiB) of one DAPO update on the Qwen3-vocabulary workload,
    with the chunked log-probs (`chunked`) or the full-logits formula (`full`). Run it in a
    fresh process started with MALLOC_MMAP_THRESHOLD_=65536."""
    from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory
    from llmpost import dapo_trainer
    from llmpost.config import DapoConfig
    from llmpost.dapo_trainer import PolicyBatch, dapo_update
    from llmpost.rollout import token_logprobs

    if mode == "full":  # the update as it was: full logits at every position
        dapo_trainer.response_logprobs = (
            lambda model, ids, attn, mask, temperature, chunk_size, with_entropy:
            token_logprobs(model, ids, attn, temperature, with_entropy))
    torch.manual_seed(0)
    model = _model(QWEN3_VOCAB, layers=1, max_positions=2048)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = DapoConfig()

    def update(prompts, responses):
        old = [[-12.0] * len(r) for r in responses]
        advantages = torch.linspace(-1, 1, len(responses))
        batch = PolicyBatch(prompts, responses, old, advantages, ["t"] * len(responses))
        dapo_update(model, optimizer, batch, cfg, pad_id=0)

    update(*_long_batch(2, 4, seed=1))  # warm-up: optimizer state and gradients exist
    prompts, responses = _long_batch(rows, response_len)
    reset_peak_memory()
    baseline = current_memory_mb()
    update(prompts, responses)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    chunk_tokens = min(cfg.logprob_chunk_size, rows * response_len)
    return {"peak_mb": peak_memory_mb() - baseline, "model_mb": model_mb,
            "chunk_logits_mb": chunk_tokens * QWEN3_VOCAB * 4 / 2**20,
            "rows": rows, "response_len": response_len, "mode": mode}


def _run_measurement(mode: str, rows: int) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "tests.llmpost.test_logprobs", mode, str(rows)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_update_peak_memory_stays_below_two_chunks_of_logits_plus_the_model():
    """8 x 1,024 response tokens at V = 151,936: the full formula would hold 5 GB of fp32
    logits per `(B, S, V)` tensor; the chunked update must stay under 2 x 622 MB + model."""
    result = _run_measurement("chunked", 8)
    budget = 2 * result["chunk_logits_mb"] + result["model_mb"]
    assert result["peak_mb"] < budget, result
    # and it is a real measurement: at least one chunk's logits were alive at once
    assert result["peak_mb"] > result["chunk_logits_mb"], result


if __name__ == "__main__":
    print(json.dumps(measure_update_peak(sys.argv[1], int(sys.argv[2]))))
