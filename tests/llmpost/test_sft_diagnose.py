"""SFT's completion-only loss, padding and packing; the capability map and stage-2 weights."""

import json

import pytest
import torch
import torch.nn.functional as F

from llmpost.config import DiagnoseConfig
from llmpost.data import encode_prompt, record_from_dict
from llmpost.diagnose import capability_map, write_capability_map
from llmpost.sft import IGNORE, build_example, collate_packed, collate_padded, completion_loss
from llmpost.tasks import generate_task
from tests.llmpost.conftest import make_tiny_model


def test_completion_only_loss_matches_a_per_row_reference(word_tokenizer):
    model = make_tiny_model(word_tokenizer)
    records = [record_from_dict(r) for r in generate_task("mentions", 3, 0)]
    examples = [build_example(word_tokenizer, r) for r in records]
    for r, (ids, labels) in zip(records, examples):
        n_prompt = len(encode_prompt(word_tokenizer, r))
        assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    batch = collate_padded(examples, word_tokenizer.pad_token_id, 256)
    loss = completion_loss(model, batch)
    # Reference: each row alone, the answer tokens' cross-entropy summed, over all answers.
    total, count = 0.0, 0
    with torch.no_grad():
        for r, (ids, _) in zip(records, examples):
            n_prompt = len(encode_prompt(word_tokenizer, r))
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            target = torch.tensor(ids[n_prompt:])
            total += F.cross_entropy(logits[n_prompt - 1 : -1], target, reduction="sum").item()
            count += len(target)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_packing_keeps_labels_and_restarts_positions(word_tokenizer):
    records = [record_from_dict(r) for r in generate_task("taxonomy", 5, 0)]
    examples = [build_example(word_tokenizer, r) for r in records]
    length = len(examples[0][0]) + len(examples[1][0]) + 1
    packed = collate_packed(examples, word_tokenizer.pad_token_id, length)
    assert packed["input_ids"].shape[0] < len(examples)
    assert "attention_mask" not in packed  # the model reads the examples' bounds off the positions
    flat = [t for row in packed["labels"].tolist() for t in row if t != IGNORE]
    assert flat == [t for _, lab in examples for t in lab if t != IGNORE]
    first = packed["position_ids"][0].tolist()
    n0 = len(examples[0][0])
    assert first[:n0] == list(range(n0)) and first[n0] == 0
    # A packed row of one example is the padded row.
    single = collate_packed(examples[:1], word_tokenizer.pad_token_id, length)
    model = make_tiny_model(word_tokenizer)
    padded = collate_padded(examples[:1], word_tokenizer.pad_token_id, length)
    torch.testing.assert_close(completion_loss(model, single), completion_loss(model, padded))


def test_packed_examples_attend_only_to_themselves(word_tokenizer):
    """A packed batch's loss and gradients equal those of the same examples padded, each
    in its own row (before, packed examples attended to the ones before them)."""
    records = [record_from_dict(r) for r in generate_task("taxonomy", 6, 0)]
    examples = [build_example(word_tokenizer, r) for r in records]
    length = sum(len(i) for i, _ in examples[:3])
    packed = collate_packed(examples, word_tokenizer.pad_token_id, length)
    assert packed["input_ids"].shape[0] < len(examples)
    padded = collate_padded(examples, word_tokenizer.pad_token_id, length)
    model = make_tiny_model(word_tokenizer).double()
    results = []
    for batch in (packed, padded):
        model.zero_grad(set_to_none=True)
        loss = completion_loss(model, batch, num_tokens=40.0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=0)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-8, atol=1e-12, msg=name)


def test_capability_map_weak_tasks_and_weights(tmp_path):
    evaluation = {
        "tasks": {"a": 0.9, "b": 0.3, "c": 0.7, "d": 0.95, "math": 0.1},
        "categories": {"a": "sns", "b": "sns", "c": "sns", "d": "sns", "math": "general"},
    }
    cap = capability_map(evaluation, DiagnoseConfig(threshold=0.5, bottom_k=0, weak_weight=3))
    assert cap["weak"] == ["b"]
    # every SNS task is covered, weak ones 3x: weights 1, 3, 1, 1 over 6
    assert cap["weights"] == pytest.approx({"a": 1 / 6, "b": 3 / 6, "c": 1 / 6, "d": 1 / 6})
    cap = capability_map(evaluation, DiagnoseConfig(threshold=0.5, bottom_k=2, weak_weight=2))
    assert cap["weak"] == ["b", "c"] and "math" not in cap["weights"]
    write_capability_map(cap, tmp_path)
    assert json.loads((tmp_path / "capability_map.json").read_text())["weak"] == ["b", "c"]
    assert (tmp_path / "capability_map.png").stat().st_size > 0


@pytest.mark.parametrize("feasible", ["none", "mean"])
def test_projector_step_uses_the_target_or_general_gradient(word_tokenizer, feasible):
    import copy
    import random

    from common.regularizer import DataRegularizer, RegularizerConfig
    from llmpost.config import SftConfig
    from llmpost.data import sample_weighted
    from llmpost.policy import untie_embeddings
    from llmpost.sft import _projector_step, per_sample_completion_loss

    target = [record_from_dict(r) for r in generate_task("hashtags", 10, 0)]
    general = [record_from_dict(r) for r in generate_task("arithmetic", 10, 0)]
    model = untie_embeddings(make_tiny_model(word_tokenizer))
    reference = copy.deepcopy(model)
    cfg = SftConfig(batch_size=4, lr=0.5, grad_clip=0.0, general_mode="projector",
                    projector=RegularizerConfig(feasible=feasible, n_general=3, path="ghost"))
    pad = word_tokenizer.pad_token_id

    def examples_of(records):
        return [build_example(word_tokenizer, r) for r in records]

    reg = DataRegularizer(model, cfg.projector)
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    _projector_step(model, sgd, reg, examples_of, target, general, cfg, pad, random.Random(5), None)

    rng = random.Random(5)
    t_rows = sample_weighted(target, 4, rng)
    g_rows = sample_weighted(general, 3, rng)
    rows = t_rows if feasible == "none" else g_rows
    batch = collate_padded(examples_of(rows), pad, 256)
    per_sample_completion_loss(reference, batch).mean().backward()
    torch.optim.SGD(reference.parameters(), lr=cfg.lr).step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
