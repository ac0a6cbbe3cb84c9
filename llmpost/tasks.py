"""Synthetic SNS-style and general text tasks with automatic references, as JSONL.

Six SNS tasks (post taxonomy, hashtag extraction, query-post relevance, mention NER,
label inference from sentiment cues, toy translation with a lexicon) and two general
tasks (arithmetic, copy / reverse). Every word is a whole token of a small word-level
vocabulary, so a 0.3M-parameter model can learn them on a CPU in minutes.

    records = generate_task("hashtags", n=100, seed=0)
    write_suite("runs/tasks", n_train=2000, n_eval=64, seed=0)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOPICS: dict[str, list[str]] = {
    "food": ["pizza", "pasta", "sushi", "burger", "salad", "cake"],
    "travel": ["beach", "flight", "hotel", "museum", "island", "train"],
    "sports": ["soccer", "tennis", "goal", "match", "coach", "race"],
    "tech": ["phone", "laptop", "code", "app", "robot", "chip"],
    "music": ["guitar", "song", "concert", "band", "piano", "album"],
}
FILLER = ["today", "just", "saw", "the", "a", "new", "with", "friends", "at", "this",
          "weekend", "my", "our", "went", "to", "had", "got", "and"]
HASHTAGS = ["#fun", "#weekend", "#tbt", "#nofilter", "#mood", "#life", "#goals", "#vibes"]
USERS = ["@anna", "@ben", "@carla", "@dan", "@eva", "@finn", "@gus", "@hana"]
CUES = {
    "positive": ["love", "great", "amazing", "awesome", "happy"],
    "negative": ["hate", "awful", "terrible", "boring", "sad"],
}
# Toy language: each source word has one fixed translation.
LEXICON: dict[str, str] = {
    "i": "ik", "you": "jij", "we": "wij", "like": "mag", "see": "zie", "want": "wil",
    "the": "de", "a": "een", "big": "groot", "small": "klein", "red": "rood",
    "blue": "blauw", "cat": "kat", "dog": "hond", "house": "huis", "car": "auto",
    "book": "boek", "tree": "boom",
}
LETTERS = list("abcdefghij")
MAX_NUMBER = 9

SNS_TASKS = ("taxonomy", "hashtags", "relevance", "mentions", "sentiment", "translation")
GENERAL_TASKS = ("arithmetic", "copy_reverse")
TASK_REWARDS = {
    "taxonomy": "exact_match", "hashtags": "exact_match", "relevance": "choice_match",
    "mentions": "exact_match", "sentiment": "choice_match", "translation": "chrf",
    "arithmetic": "exact_match", "copy_reverse": "exact_match",
}


def _post(rng: random.Random, topic: str, extra: list[str]) -> list[str]:
    words = rng.sample(TOPICS[topic], 2) + rng.sample(FILLER, rng.randint(2, 3)) + extra
    rng.shuffle(words)
    return words


# Prompt wording per task: `train` templates make the training and in-distribution eval
# rows, `ood` templates (new wording, never in training) the out-of-distribution rows.
# Each generator returns the template's name, its slots, the reference and meta.
TEMPLATES: dict[str, dict[str, dict[str, str]]] = {
    "taxonomy": {"train": {"ask": "topic of post : {post}"},
                 "ood": {"ask": "which topic fits this post : {post}"}},
    "hashtags": {"train": {"ask": "hashtags in post : {post}"},
                 "ood": {"ask": "list the hashtags of this post : {post}"}},
    "relevance": {"train": {"ask": "is post about {query} ? post : {post}"},
                  "ood": {"ask": "does this text talk about {query} ? text : {post}"}},
    "mentions": {"train": {"ask": "mentions in post : {post}"},
                 "ood": {"ask": "which users are tagged in this post : {post}"}},
    "sentiment": {"train": {"ask": "sentiment of post : {post}"},
                  "ood": {"ask": "how does this post feel : {post}"}},
    "translation": {"train": {"ask": "translate : {source}"},
                    "ood": {"ask": "say in toy language : {source}"}},
    "arithmetic": {"train": {"ask": "add {a} + {b} ="},
                   "ood": {"ask": "what is {a} plus {b} ?"}},
    "copy_reverse": {"train": {"copy": "copy : {seq}", "reverse": "reverse : {seq}"},
                     "ood": {"copy": "repeat : {seq}", "reverse": "backwards : {seq}"}},
}
OOD_SPLIT = "ood"

Generated = tuple[str, dict[str, str], str, dict]


def _taxonomy(rng: random.Random) -> Generated:
    topic = rng.choice(list(TOPICS))
    return "ask", {"post": " ".join(_post(rng, topic, []))}, topic, {}


def _hashtags(rng: random.Random) -> Generated:
    words = _post(rng, rng.choice(list(TOPICS)), [])
    tags = rng.sample(HASHTAGS, rng.randint(1, 3))
    for tag in tags:
        words.insert(rng.randint(0, len(words)), tag)
    ordered = [w for w in words if w.startswith("#")]
    return "ask", {"post": " ".join(words)}, " ".join(ordered), {}


def _relevance(rng: random.Random) -> Generated:
    query = rng.choice(list(TOPICS))
    relevant = rng.random() < 0.5
    topic = query if relevant else rng.choice([t for t in TOPICS if t != query])
    slots = {"query": query, "post": " ".join(_post(rng, topic, []))}
    return "ask", slots, "yes" if relevant else "no", {"choices": ["yes", "no"]}


def _mentions(rng: random.Random) -> Generated:
    users = rng.sample(USERS, rng.randint(0, 2))
    words = _post(rng, rng.choice(list(TOPICS)), [])
    for user in users:
        words.insert(rng.randint(0, len(words)), user)
    ordered = [w for w in words if w.startswith("@")]
    return "ask", {"post": " ".join(words)}, " ".join(ordered) or "none", {}


def _sentiment(rng: random.Random) -> Generated:
    label = rng.choice(["positive", "negative", "neutral"])
    cue = [] if label == "neutral" else [rng.choice(CUES[label])]
    words = _post(rng, rng.choice(list(TOPICS)), cue)
    choices = {"choices": ["positive", "negative", "neutral"]}
    return "ask", {"post": " ".join(words)}, label, choices


def _translation(rng: random.Random) -> Generated:
    source = rng.choices(list(LEXICON), k=rng.randint(3, 5))
    return "ask", {"source": " ".join(source)}, " ".join(LEXICON[w] for w in source), {}


def _arithmetic(rng: random.Random) -> Generated:
    a, b = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
    return "ask", {"a": str(a), "b": str(b)}, str(a + b), {}


def _copy_reverse(rng: random.Random) -> Generated:
    seq = rng.choices(LETTERS, k=rng.randint(3, 5))
    if rng.random() < 0.5:
        return "copy", {"seq": " ".join(seq)}, " ".join(seq), {}
    return "reverse", {"seq": " ".join(seq)}, " ".join(reversed(seq)), {}


GENERATORS: dict[str, Callable[[random.Random], Generated]] = {
    "taxonomy": _taxonomy, "hashtags": _hashtags, "relevance": _relevance,
    "mentions": _mentions, "sentiment": _sentiment, "translation": _translation,
    "arithmetic": _arithmetic, "copy_reverse": _copy_reverse,
}


def template_family(split: str) -> str:
    """Which templates a split uses: `ood` its own, every other split (train, eval) the
    training wording."""
    return OOD_SPLIT if split == OOD_SPLIT else "train"


def generate_task(task: str, n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """`n` JSONL-ready records of one task; the same (task, seed, split) gives the same rows.
    Split `ood` words its prompts with templates that no other split uses."""
    rng = random.Random(f"{task}/{split}/{seed}")
    category = "sns" if task in SNS_TASKS else "general"
    templates = TEMPLATES[task][template_family(split)]
    records = []
    for i in range(n):
        name, slots, reference, meta = GENERATORS[task](rng)
        prompt = templates[name].format(**slots)
        records.append({
            "id": f"{task}-{split}-{i}", "task": task, "category": category,
            "prompt": prompt, "reference": reference, "reward": TASK_REWARDS[task],
            "meta": meta,
        })
    return records


def vocabulary_words() -> list[str]:
    """Every word the tasks can produce (prompts and references), for a word-level tokenizer."""
    words = {w for ws in TOPICS.values() for w in ws} | set(TOPICS) | set(FILLER)
    words |= set(HASHTAGS) | set(USERS) | {w for ws in CUES.values() for w in ws}
    words |= set(LEXICON) | set(LEXICON.values()) | set(LETTERS)
    words |= {str(i) for i in range(2 * MAX_NUMBER + 1)}
    words |= {"positive", "negative", "neutral", "yes", "no", "none"}
    words |= {w for family in TEMPLATES.values() for group in family.values()
              for template in group.values() for w in template.split() if not w.startswith("{")}
    return sorted(words)


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_suite(out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0,
                tasks: tuple[str, ...] = SNS_TASKS + GENERAL_TASKS) -> dict[str, Path]:
    """Write `{sns,general}_{train,eval,ood}.jsonl` under `out_dir`; returns their paths.
    `ood` has `n_eval` rows per task in the out-of-distribution wording."""
    out_dir = Path(out_dir)
    paths = {}
    for category, names in (("sns", SNS_TASKS), ("general", GENERAL_TASKS)):
        for split, n in (("train", n_train), ("eval", n_eval), (OOD_SPLIT, n_eval)):
            rows = [r for t in names if t in tasks for r in generate_task(t, n, seed, split)]
            paths[f"{category}_{split}"] = write_jsonl(rows, out_dir / f"{category}_{split}.jsonl")
    return paths
