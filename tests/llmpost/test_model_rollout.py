"""Tokenizer and tiny Qwen3 round-trips, chat encoding, and rollout outputs checked
against an independent forward pass."""

import pytest
import torch
import torch.nn.functional as F

from llmpost.config import GenerationConfig
from llmpost.data import encode_prompt, encode_response, record_from_dict
from llmpost.model import load_model
from llmpost.rollout import HFRollout, pack_right_padded
from llmpost.tasks import generate_task
from llmpost.tokenizer import load_tokenizer, train_tokenizer
from tests.llmpost.conftest import make_tiny_model


def test_tokenizer_and_model_round_trip(tmp_path, word_tokenizer):
    record = record_from_dict(generate_task("hashtags", 1, 0)[0])
    ids = encode_prompt(word_tokenizer, record)
    text = word_tokenizer.decode(ids)
    assert text.startswith("<|im_start|> user hashtags in post :")
    assert text.endswith("<|im_start|> assistant")
    assert word_tokenizer.unk_token_id not in ids
    answer = encode_response(word_tokenizer, record.reference)
    assert answer[-1] == word_tokenizer.eos_token_id
    assert word_tokenizer.decode(answer, skip_special_tokens=True) == record.reference

    model = make_tiny_model(word_tokenizer)
    model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path), load_tokenizer(tmp_path)
    assert encode_prompt(tok, record) == ids
    x = torch.tensor([ids])
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_bpe_tokenizer_round_trip(tmp_path):
    tok = train_tokenizer(["hello world, #fun @anna 12 + 3"] * 5, kind="bpe", vocab_size=300)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    ids = again("hello #fun", add_special_tokens=False).input_ids
    assert again.decode(ids) == "hello #fun"


@pytest.mark.parametrize("recompute", [False, True])
def test_rollout_logprobs_lengths_and_truncation(word_tokenizer, recompute):
    torch.manual_seed(0)
    model = make_tiny_model(word_tokenizer)
    records = [record_from_dict(r) for r in generate_task("taxonomy", 3, 0)]
    prompts = [encode_prompt(word_tokenizer, r) for r in records]
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=6, recompute_logprobs=recompute)
    batch = HFRollout(model, word_tokenizer, cfg).generate(prompts, num_samples=4)
    assert len(batch) == 12 and batch.prompt_ids[4] == prompts[1]  # groups consecutive
    eos = word_tokenizer.eos_token_id
    for ids, lp, n, trunc in zip(batch.response_ids, batch.logprobs, batch.lengths, batch.truncated):
        assert len(ids) == n == len(lp) and n <= 6
        assert trunc == (eos not in ids)
        if not trunc:
            assert ids[-1] == eos and ids.count(eos) == 1
    # Independent log-probs: full forward on each prompt + response, one row at a time.
    with torch.no_grad():
        for p, r, lp in zip(batch.prompt_ids, batch.response_ids, batch.logprobs):
            logits = model(input_ids=torch.tensor([p + r])).logits[0]
            ref = F.log_softmax(logits[len(p) - 1 : -1], -1).gather(1, torch.tensor(r)[:, None])
            torch.testing.assert_close(torch.tensor(lp), ref.squeeze(1), rtol=1e-4, atol=1e-4)
    assert any(batch.truncated)  # an untrained model rarely closes its turn in 6 tokens


def test_greedy_is_deterministic_and_stop_strings_cut(word_tokenizer):
    model = make_tiny_model(word_tokenizer, seed=3)
    prompts = [encode_prompt(word_tokenizer, record_from_dict(r)) for r in generate_task("arithmetic", 4, 0)]
    rollout = HFRollout(model, word_tokenizer, GenerationConfig(max_new_tokens=5))
    a, b = rollout.generate(prompts, greedy=True), rollout.generate(prompts, greedy=True)
    assert a.response_ids == b.response_ids
    stop = a.texts[0].split()[1]  # the second word of the first answer
    cut = HFRollout(model, word_tokenizer, GenerationConfig(max_new_tokens=5, stop_strings=[stop]))
    c = cut.generate(prompts[:1], greedy=True)
    assert c.texts[0].split()[-1] == stop and not c.truncated[0]
    assert len(c.logprobs[0]) == c.lengths[0]


def test_pack_right_padded_marks_response_positions():
    ids, attn, resp = pack_right_padded([[1, 2], [3]], [[4, 5], [6, 7, 8]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 5], [3, 6, 7, 8]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    # position t predicts token t+1
    assert resp.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_cut_at_stop_finds_the_shortest_prefix_holding_a_stop(word_tokenizer):
    """The bisection gives what scanning every prefix gives, and says when no stop is met."""
    import random

    from llmpost.rollout import _cut_at_stop

    rng = random.Random(0)
    vocab = [i for i in range(len(word_tokenizer)) if i not in word_tokenizer.all_special_ids]
    for _ in range(30):
        tokens = [rng.choice(vocab) for _ in range(rng.randint(1, 12))]
        words = word_tokenizer.decode(tokens, skip_special_tokens=True).split()
        stops = [rng.choice(words)] if words and rng.random() < 0.8 else ["<never>"]
        scan = next((tokens[:k] for k in range(1, len(tokens) + 1)
                     if any(s in word_tokenizer.decode(tokens[:k], skip_special_tokens=True) for s in stops)), None)
        cut, stopped = _cut_at_stop(tokens, word_tokenizer, stops)
        assert stopped == (scan is not None) and cut == (scan if scan is not None else tokens)


def test_generate_stop_strings_fail_on_a_word_level_vocabulary(word_tokenizer):
    """Why `_cut_at_stop` is kept: transformers' `StopStringCriteria` tokenizes a probe
    string to clean the vocabulary, which a word-level tokenizer (the demo's) cannot."""
    model = make_tiny_model(word_tokenizer, seed=3)
    prompt = torch.tensor([encode_prompt(word_tokenizer, record_from_dict(generate_task("arithmetic", 1, 0)[0]))])
    with pytest.raises(ValueError, match="substring not found"):
        model.generate(input_ids=prompt, max_new_tokens=3, stop_strings=["the"], tokenizer=word_tokenizer,
                       pad_token_id=word_tokenizer.pad_token_id, do_sample=False)
