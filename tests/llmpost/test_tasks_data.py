"""Synthetic tasks (references checked independently), JSONL loading and mixing."""

import json
import random

import pytest

from common.errors import DataError
from llmpost.data import load_tasks, mix, record_from_dict
from llmpost.tasks import (
    GENERAL_TASKS,
    LEXICON,
    SNS_TASKS,
    TOPICS,
    generate_task,
    vocabulary_words,
    write_suite,
)


def test_at_least_six_sns_and_two_general_tasks_with_valid_records():
    assert len(SNS_TASKS) >= 6 and len(GENERAL_TASKS) >= 2
    vocab = set(vocabulary_words())
    for task in SNS_TASKS + GENERAL_TASKS:
        rows = generate_task(task, 50, seed=1)
        assert rows == generate_task(task, 50, seed=1)  # deterministic
        assert rows != generate_task(task, 50, seed=2)
        for row in rows:
            record = record_from_dict(row)
            assert record.category == ("sns" if task in SNS_TASKS else "general")
            assert set((row["prompt"] + " " + row["reference"]).split()) <= vocab


def _post_words(prompt):
    return prompt.split(" : ", 1)[1].split()


def test_references_follow_from_the_prompts():
    for row in generate_task("hashtags", 30, 0):
        assert row["reference"].split() == [w for w in _post_words(row["prompt"]) if w[0] == "#"]
    for row in generate_task("mentions", 30, 0):
        users = [w for w in _post_words(row["prompt"]) if w[0] == "@"]
        assert row["reference"] == (" ".join(users) or "none")
    for row in generate_task("taxonomy", 30, 0):
        topics = {t for w in _post_words(row["prompt"]) for t, ws in TOPICS.items() if w in ws}
        assert topics == {row["reference"]}
    for row in generate_task("translation", 30, 0):
        assert row["reference"].split() == [LEXICON[w] for w in _post_words(row["prompt"])]
    for row in generate_task("arithmetic", 30, 0):
        a, b = row["prompt"].split()[1], row["prompt"].split()[3]
        assert int(row["reference"]) == int(a) + int(b)
    for row in generate_task("copy_reverse", 30, 0):
        seq = _post_words(row["prompt"])
        want = seq if row["prompt"].startswith("copy") else seq[::-1]
        assert row["reference"].split() == want


def test_suite_round_trips_and_bad_rows_name_file_and_line(tmp_path):
    paths = write_suite(tmp_path, n_train=5, n_eval=2, seed=0)
    sns = load_tasks(paths["sns_train"])
    assert len(sns) == 5 * len(SNS_TASKS)
    bad = tmp_path / "bad.jsonl"
    row = generate_task("taxonomy", 1, 0)[0]
    del row["reference"]
    bad.write_text(json.dumps(generate_task("taxonomy", 1, 0)[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field\(s\) reference"):
        load_tasks(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not JSON"):
        load_tasks(bad)


def test_mix_respects_the_general_share_and_task_weights():
    sns = [record_from_dict(r) for t in ("taxonomy", "hashtags") for r in generate_task(t, 20, 0)]
    general = [record_from_dict(r) for r in generate_task("arithmetic", 20, 0)]
    batch = mix(sns, general, 40, 0.25, random.Random(0))
    assert sum(r.category == "general" for r in batch) == 10
    only = mix(sns, general, 40, 0.0, random.Random(0), task_weights={"hashtags": 1.0})
    assert {r.task for r in only} == {"hashtags"}


def _template_of(prompt: str, templates: dict[str, str]) -> str | None:
    """The name of the template that produced `prompt` (its fixed words around the slots)."""
    import re

    for name, template in templates.items():
        pattern = re.escape(template)
        for slot in re.findall(r"\\\{(\w+)\\\}", pattern):
            pattern = pattern.replace(f"\\{{{slot}\\}}", r"(.+?)")
        if re.fullmatch(pattern, prompt):
            return name
    return None


def test_ood_split_shares_no_template_or_template_word_order_with_training():
    from llmpost.tasks import OOD_SPLIT, TEMPLATES

    for task in SNS_TASKS + GENERAL_TASKS:
        train, ood = TEMPLATES[task]["train"], TEMPLATES[task][OOD_SPLIT]
        assert set(train.values()).isdisjoint(ood.values()), task
        # the fixed wording before the first slot differs: no OOD prompt starts like a training one
        train_heads = {t.split("{")[0] for t in train.values()}
        ood_heads = {t.split("{")[0] for t in ood.values()}
        assert not any(o.startswith(t) or t.startswith(o) for o in ood_heads for t in train_heads), task
        train_rows = generate_task(task, 200, seed=0, split="train")
        eval_rows = generate_task(task, 50, seed=0, split="eval")
        ood_rows = generate_task(task, 50, seed=0, split=OOD_SPLIT)
        for row in train_rows + eval_rows:
            assert _template_of(row["prompt"], train) is not None and _template_of(row["prompt"], ood) is None
        for row in ood_rows:
            assert _template_of(row["prompt"], ood) is not None and _template_of(row["prompt"], train) is None
        assert {r["id"].split("-")[1] for r in ood_rows} == {OOD_SPLIT}
        # every template of each split is used, and OOD words are in the tokenizer's vocabulary
        assert {_template_of(r["prompt"], train) for r in train_rows} == set(train), task
        assert {_template_of(r["prompt"], ood) for r in ood_rows} == set(ood), task
        assert {w for r in ood_rows for w in (r["prompt"] + " " + r["reference"]).split()} <= set(vocabulary_words())


def test_ood_references_follow_the_same_rules():
    from llmpost.tasks import OOD_SPLIT

    for row in generate_task("arithmetic", 30, 0, OOD_SPLIT):
        words = row["prompt"].split()
        assert int(row["reference"]) == int(words[2]) + int(words[4])
    for row in generate_task("hashtags", 30, 0, OOD_SPLIT):
        assert row["reference"].split() == [w for w in _post_words(row["prompt"]) if w[0] == "#"]
    for row in generate_task("copy_reverse", 30, 0, OOD_SPLIT):
        seq = _post_words(row["prompt"])
        want = seq if row["prompt"].startswith("repeat") else seq[::-1]
        assert row["reference"].split() == want


def test_suite_writes_an_ood_file_per_category(tmp_path):
    paths = write_suite(tmp_path, n_train=4, n_eval=3, seed=0)
    assert set(paths) == {f"{c}_{s}" for c in ("sns", "general") for s in ("train", "eval", "ood")}
    ood = load_tasks(paths["sns_ood"])
    assert len(ood) == 3 * len(SNS_TASKS) and {r.task for r in ood} == set(SNS_TASKS)
    train_prompts = {r.prompt for r in load_tasks(paths["sns_train"])}
    assert not train_prompts & {r.prompt for r in ood}
