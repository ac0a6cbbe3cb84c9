"""Every built-in reward, the judge hook, the registry's error handling and its pre-training
record check (the sandbox's own tests are in test_sandbox.py)."""

import pytest
import sacrebleu
import torch

from llmpost.rewards import (
    LocalModelJudge,
    bleu,
    choice_match,
    chrf,
    code_reward,
    default_registry,
    exact_match,
    format_check,
    judge_reward,
    regex_match,
    rouge_l,
    token_f1,
)
from llmpost.sandbox import CodeSandbox


def test_exact_match_normalizes_case_space_and_final_punctuation():
    assert exact_match("", "  Food  Travel. ", "food travel") == 1.0
    assert exact_match("", "food", "travel") == 0.0


def test_choice_match_takes_the_first_listed_choice():
    meta = {"choices": ["yes", "no"]}
    assert choice_match("", "well yes , not no", "yes", **meta) == 1.0
    assert choice_match("", "no yes", "yes", **meta) == 0.0
    assert choice_match("", "maybe", "yes", **meta) == 0.0
    assert choice_match("", "B because", "b") == 1.0


def test_token_f1_hand_value():
    # pred {a, b, c}, ref {a, b, d, e}: common 2, P 2/3, R 2/4 -> F1 = 4/7
    assert token_f1("", "a b c", "a b d e") == pytest.approx(4 / 7)
    assert token_f1("", "", "") == 1.0
    assert token_f1("", "x", "y") == 0.0


def test_rouge_l_hand_value():
    # LCS("a c b d", "a b c d") = 3 ("a b d" or "a c d"): P 3/4, R 3/4
    assert rouge_l("", "a c b d", "a b c d") == pytest.approx(0.75)
    assert rouge_l("", "a b", "b a x") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_bleu_and_chrf_match_sacrebleu():
    hyp, ref = "the cat sat on a mat", "the cat sat on the mat"
    assert bleu("", hyp, ref) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100)
    assert chrf("", hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score / 100)
    assert bleu("", ref, ref) == pytest.approx(1.0)
    assert 0 < chrf("", hyp, ref) < 1


def test_regex_and_format():
    assert regex_match("", " 12 ", "", pattern=r"\d+") == 1.0
    assert regex_match("", "12 apples", "", pattern=r"\d+") == 0.0
    pattern = r"<answer>(?P<answer>.*?)</answer>"
    assert format_check("", "think <answer>42</answer>", "42", pattern=pattern) == 1.0
    assert format_check("", "<answer>41</answer>", "42", pattern=pattern) == 0.5
    assert format_check("", "42", "42", pattern=pattern) == 0.0


@pytest.mark.skipif(not CodeSandbox(workers=1).sandboxed, reason="bubblewrap cannot isolate here")
def test_code_reward_tests_and_stdout():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(2, 3) == 5"
    assert code_reward("", good, "", tests=tests) == 1.0
    assert code_reward("", bad, "", tests=tests) == 0.0
    assert code_reward("", "print(6 * 7)", "42") == 1.0
    assert code_reward("", "print(6 * 8)", "42") == 0.0


def test_registry_scores_by_name_and_survives_a_raising_reward(caplog):
    registry = default_registry()
    assert {"exact_match", "choice_match", "token_f1", "rouge_l", "bleu", "chrf", "regex",
            "format", "code"} <= set(registry.names())
    assert registry.score("exact_match", "p", "a", "a") == 1.0

    def broken(prompt, response, reference, **meta):
        raise RuntimeError("boom")

    registry.register("broken", broken)
    with caplog.at_level("WARNING"):
        assert registry.score("broken", "p", "a", "a") == 0.0
        assert registry.score("missing", "p", "a", "a") == 0.0
    assert registry.failures["broken"] == 1 and registry.failures["missing"] == 1
    assert "boom" in caplog.text


def test_judge_hook_with_a_callable_and_a_local_model():
    registry = default_registry()
    registry.register("judge", judge_reward(lambda p, r, ref: 0.25 + 0.5 * (r == ref)))
    assert registry.score("judge", "q", "x", "x") == 0.75

    class Tok:
        def convert_tokens_to_ids(self, token):
            return {"yes": 1, "no": 2}[token]

        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.tensor([[0, 3]])})

    class Model:
        def __call__(self, input_ids):
            logits = torch.zeros(1, 2, 4)
            logits[0, -1, 1], logits[0, -1, 2] = 2.0, 0.0
            return type("Out", (), {"logits": logits})

    judge = LocalModelJudge(Model(), Tok())
    expected = torch.tensor([2.0, 0.0]).softmax(0)[0].item()
    assert judge("q", "r", "ref") == pytest.approx(expected)


def _write_rows(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(**over):
    row = {"id": "a", "task": "t", "category": "sns", "prompt": "p", "reference": "x",
           "reward": "exact_match", "meta": {}}
    row.update(over)
    return row


@pytest.mark.parametrize("bad, message", [
    ({"reward": "exct_match"}, "reward 'exct_match' is not registered"),
    ({"reward": "choice_match", "meta": {"choices": "yes"}}, "meta.choices must be list"),
    ({"reward": "code", "meta": {"timeout_s": "5"}}, "meta.timeout_s must be int or float"),
    ({"reward": "format", "meta": {}}, "needs meta.pattern"),
])
def test_check_records_names_the_file_and_line_of_a_bad_reward_row(tmp_path, bad, message):
    from common.errors import DataError
    from llmpost.data import load_tasks

    path = _write_rows(tmp_path / "tasks.jsonl", [_row(), _row(id="b", **bad)])
    records = load_tasks(path)
    with pytest.raises(DataError, match=rf"tasks.jsonl:2: .*{message}"):
        default_registry().check_records(records)
    default_registry().check_records(records[:1])  # the good row passes


def _messages_row(messages):
    row = _row(messages=messages)
    del row["prompt"]
    return row


@pytest.mark.parametrize("row, message", [
    (_row(reference=None), "'reference' must be a string, got null"),
    (_row(meta=["a"]), "'meta' must be a JSON object, got list"),
    (_messages_row("hello"), "'messages' must be a non-empty list"),
    (_messages_row([]), "'messages' must be a non-empty list"),
    ("just a string", "expected a JSON object, got a JSON str"),
])
def test_task_rows_with_wrong_types_fail_on_load(tmp_path, row, message):
    from common.errors import DataError
    from llmpost.data import load_tasks

    path = _write_rows(tmp_path / "tasks.jsonl", [row])
    with pytest.raises(DataError, match=rf"tasks.jsonl:1: {message}"):
        load_tasks(path)
