"""Task records: loading JSONL, the general-data pool, mixing by ratio, chat encoding.

A record is one line of JSON:
`{"id", "task", "category", "prompt" or "messages", "reference", "reward", "meta"}`.
`category` is "sns" (the target domain) or "general". Prompts go through the
tokenizer's own chat template, so the same code serves the demo's word-level tokenizer
and a real Qwen3 tokenizer.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError

REQUIRED = ("id", "task", "category", "reference", "reward")


@dataclass
class TaskRecord:
    id: str
    task: str
    category: str
    reference: str
    reward: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)  # "file:line" it was read from

    def chat(self) -> list[dict[str, str]]:
        """The conversation up to the assistant's turn."""
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]

    def prompt_text(self) -> str:
        """The prompt as plain text (for rewards and judges)."""
        return self.prompt if self.prompt is not None else self.messages[-1]["content"]


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got a JSON {type(row).__name__}"
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if ("prompt" in row) == ("messages" in row):
        return "exactly one of 'prompt' or 'messages' is expected"
    if row["category"] not in ("sns", "general"):
        return f"category must be 'sns' or 'general', got {row['category']!r}"
    known = set(REQUIRED) | {"prompt", "messages", "meta"}
    unknown = sorted(set(row) - known)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    for key in ("id", "task", "reward"):
        if not isinstance(row[key], str) or not row[key]:
            return f"'{key}' must be a non-empty string, got {row[key]!r}"
    if not isinstance(row["reference"], str):
        return f"'reference' must be a string, got {'null' if row['reference'] is None else repr(row['reference'])}"
    if "prompt" in row and not isinstance(row["prompt"], str):
        return f"'prompt' must be a string, got {type(row['prompt']).__name__}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
    if "meta" in row and not isinstance(row["meta"], dict):
        return f"'meta' must be a JSON object, got {type(row['meta']).__name__}"
    return None


def record_from_dict(row: Any, where: str = "") -> TaskRecord:
    """A TaskRecord from one parsed JSON row; DataError naming `where` if it does not fit."""
    problem = _row_problem(row)
    if problem:
        raise DataError(f"{where}: {problem}")
    return TaskRecord(**{k: row[k] for k in row}, source=where)


def load_tasks(path: str | Path) -> list[TaskRecord]:
    """Every record of a JSONL file; a bad row raises DataError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"task file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: task file is a directory, expected a JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not JSON ({err.msg})") from None
        records.append(record_from_dict(row, f"{path}:{line_no}"))
    return records


def load_many(paths: Sequence[str | Path]) -> list[TaskRecord]:
    return [r for p in paths for r in load_tasks(p)]


def by_task(records: Sequence[TaskRecord]) -> dict[str, list[TaskRecord]]:
    groups: dict[str, list[TaskRecord]] = defaultdict(list)
    for r in records:
        groups[r.task].append(r)
    return dict(groups)


def sample_weighted(
    records: Sequence[TaskRecord], n: int, rng: random.Random,
    task_weights: dict[str, float] | None = None,
) -> list[TaskRecord]:
    """`n` records drawn with replacement: pick a task by weight (default: equal), then a row."""
    groups = by_task(records)
    tasks = sorted(groups)
    weights = [(task_weights or {}).get(t, 1.0 if task_weights is None else 0.0) for t in tasks]
    if sum(weights) <= 0:
        raise DataError("no task has a positive sampling weight")
    picks = rng.choices(tasks, weights=weights, k=n)
    return [rng.choice(groups[t]) for t in picks]


def mix(
    target: Sequence[TaskRecord], general: Sequence[TaskRecord], n: int,
    general_fraction: float, rng: random.Random,
    task_weights: dict[str, float] | None = None,
) -> list[TaskRecord]:
    """A batch of `n` with round(n * general_fraction) general rows, the rest target rows."""
    n_general = round(n * general_fraction) if general else 0
    batch = sample_weighted(target, n - n_general, rng, task_weights) if n > n_general else []
    if n_general:
        batch += sample_weighted(general, n_general, rng)
    rng.shuffle(batch)
    return batch


def encode_prompt(tokenizer: Any, record: TaskRecord, chat_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat-templated prompt, ending where the assistant starts."""
    text = tokenizer.apply_chat_template(
        record.chat(), tokenize=False, add_generation_prompt=True, **(chat_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of an assistant answer, closed by the end-of-turn (eos) token."""
    return tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
