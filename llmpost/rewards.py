"""Reward functions and their registry.

A reward is a plain function `(prompt, response, reference, **meta) -> float` in [0, 1]
(the judge may return any float). Tasks name their reward in the JSONL record
(`"reward": "exact_match"`), and `RewardRegistry.score` looks it up; a reward that raises
is logged and scored 0 so one bad sample never kills a run. `check_records` runs before
training (and in `llmpost eval`): unknown reward names and wrongly typed `reference` or
`meta` stop the run there, naming the row.

    registry = default_registry()
    registry.register("my_metric", lambda prompt, response, reference, **meta: ...)
    registry.register("judge", judge_reward(my_judge))
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import sacrebleu
import torch

from common.errors import DataError, UserError
from llmpost.sandbox import CodeSandbox, SandboxLimits, SandboxResult

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, prompt: str, response: str, reference: str, **meta: Any) -> float: ...


def normalize(text: str) -> str:
    """Lower-case, drop surrounding punctuation and collapse whitespace."""
    return " ".join(text.lower().strip().strip(".!?").split())


def exact_match(prompt: str, response: str, reference: str, **meta: Any) -> float:
    return float(normalize(response) == normalize(reference))


def choice_match(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """The first listed choice that appears in the response must be the reference.

    `meta["choices"]` lists the allowed answers (e.g. ["yes", "no"] or ["A", "B", "C"]);
    without it the response's first word is compared.
    """
    words = normalize(response).replace(",", " ").split()
    choices = [normalize(c) for c in meta.get("choices", [])]
    picked = next((w for w in words if w in choices), None) if choices else (words[:1] or [None])[0]
    return float(picked is not None and picked == normalize(reference))


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def token_f1(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """SQuAD-style bag-of-tokens F1."""
    pred, ref = _tokens(response), _tokens(reference)
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """ROUGE-L F1 (beta = 1) over whitespace tokens."""
    pred, ref = _tokens(response), _tokens(reference)
    if not pred and not ref:
        return 1.0
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """Sentence BLEU (sacrebleu, exponential smoothing) scaled to [0, 1]."""
    return sacrebleu.sentence_bleu(response, [reference]).score / 100.0


def chrf(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """Sentence chrF (sacrebleu) scaled to [0, 1]."""
    return sacrebleu.sentence_chrf(response, [reference]).score / 100.0


def regex_match(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """1 if the response matches `meta["pattern"]` in full (default: the reference as a regex)."""
    pattern = meta.get("pattern", reference)
    return float(re.fullmatch(pattern, response.strip(), flags=re.DOTALL) is not None)


def format_check(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """Format reward: `meta["pattern"]` found anywhere, or 0.5 * format + 0.5 * exact match
    of the captured group `answer` when the pattern names one."""
    match = re.search(meta["pattern"], response, flags=re.DOTALL)
    if match is None:
        return 0.0
    if "answer" in match.groupdict():
        return 0.5 + 0.5 * float(normalize(match.group("answer")) == normalize(reference))
    return 1.0


_CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


class CodeReward:
    """Run the response's code (a ```python block, or all of it) in a `CodeSandbox`.

    With `meta["tests"]` (Python asserts appended to the code) the reward is 1 when the
    script exits 0; otherwise stdout must equal the reference. `meta["stdin"]`,
    `meta["timeout_s"]` and `meta["memory_mb"]` override the sandbox's limits per row.
    """

    def __init__(self, sandbox: CodeSandbox | None = None) -> None:
        self.sandbox = sandbox or CodeSandbox()

    def check(self) -> None:
        """Raise SandboxUnavailable unless runs are isolated or unsandboxed runs are allowed."""
        self.sandbox.check()

    def job(self, response: str, meta: dict[str, Any]) -> tuple[str, str, SandboxLimits]:
        block = _CODE_BLOCK.search(response)
        code = block.group(1) if block else response
        tests = meta.get("tests")
        if tests:
            code = code + "\n\n" + tests
        limits = replace(self.sandbox.limits,
                         timeout_s=float(meta.get("timeout_s", self.sandbox.limits.timeout_s)),
                         memory_mb=int(meta.get("memory_mb", self.sandbox.limits.memory_mb)))
        return code, str(meta.get("stdin", "")), limits

    @staticmethod
    def judge(result: SandboxResult, reference: str, meta: dict[str, Any]) -> float:
        if not result.ok:
            return 0.0
        return 1.0 if meta.get("tests") else float(result.stdout.strip() == reference.strip())

    def __call__(self, prompt: str, response: str, reference: str, **meta: Any) -> float:
        return self.judge(self.sandbox.run(*self.job(response, meta)), reference, meta)

    def score_many(self, items: Sequence[tuple[str, str, str, dict[str, Any]]]) -> list[float]:
        """Rewards of `(prompt, response, reference, meta)` items, run in the sandbox's pool."""
        results = self.sandbox.run_many([self.job(resp, meta) for _, resp, _, meta in items])
        return [self.judge(res, ref, meta) for res, (_, _, ref, meta) in zip(results, items)]


def code_reward(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """`CodeReward` with a one-slot sandbox of default limits (see `CodeReward`)."""
    return CodeReward(CodeSandbox(workers=1))(prompt, response, reference, **meta)


JudgeFn = Callable[[str, str, str], float]


def judge_reward(judge: JudgeFn) -> RewardFn:
    """Wrap any callable `judge(prompt, response, reference) -> float` (an API client, a
    local reward model, `LocalModelJudge`) as a reward."""

    def reward(prompt: str, response: str, reference: str, **meta: Any) -> float:
        return float(judge(prompt, response, reference))

    return reward


class LocalModelJudge:
    """A local causal LM as judge: the reward is P("yes") / (P("yes") + P("no")) for the
    next token after a question built from `template`."""

    def __init__(self, model: Any, tokenizer: Any, template: str | None = None,
                 yes: str = "yes", no: str = "no") -> None:
        self.model, self.tokenizer = model, tokenizer
        self.template = template or (
            "Question: {prompt}\nReference answer: {reference}\nResponse: {response}\n"
            "Is the response correct? Answer yes or no:"
        )
        self.yes_id = tokenizer.convert_tokens_to_ids(yes)
        self.no_id = tokenizer.convert_tokens_to_ids(no)

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        text = self.template.format(prompt=prompt, response=response, reference=reference)
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1]
        pair = torch.stack([logits[self.yes_id], logits[self.no_id]]).float().softmax(0)
        return float(pair[0])


# Meta keys a built-in reward reads, and the types it accepts (checked before training).
STR, NUM, INT = (str,), (int, float), (int,)
REWARD_META: dict[str, dict[str, tuple[type, ...]]] = {
    "exact_match": {}, "token_f1": {}, "rouge_l": {}, "bleu": {}, "chrf": {},
    "choice_match": {"choices": (list,)},
    "regex": {"pattern": STR},
    "format": {"pattern": STR},
    "code": {"tests": STR, "stdin": STR, "timeout_s": NUM, "memory_mb": INT},
}
REQUIRED_META: dict[str, tuple[str, ...]] = {"format": ("pattern",)}


class RewardRegistry:
    """Name -> reward function; `score` scores 0 when a reward raises on a sample, but a
    `UserError` (e.g. no sandbox for the code reward) stops the run."""

    def __init__(self, rewards: dict[str, RewardFn] | None = None) -> None:
        self._rewards: dict[str, RewardFn] = dict(rewards or {})
        self.failures: Counter[str] = Counter()

    def register(self, name: str, fn: RewardFn) -> None:
        self._rewards[name] = fn

    def names(self) -> list[str]:
        return sorted(self._rewards)

    def __contains__(self, name: str) -> bool:
        return name in self._rewards

    def get(self, name: str) -> RewardFn:
        if name not in self._rewards:
            raise KeyError(f"unknown reward {name!r}; registered: {', '.join(self.names())}")
        return self._rewards[name]

    def score(self, name: str, prompt: str, response: str, reference: str,
              meta: dict[str, Any] | None = None) -> float:
        """The reward, or 0 when the function raises (logged with the reward's name)."""
        try:
            fn = self.get(name)
            return float(fn(prompt, response, reference, **(meta or {})))
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a broken reward must not stop training
            self.failures[name] += 1
            logger.warning("reward %r raised %s: %s; scored 0", name, type(err).__name__, err)
            return 0.0

    def score_many(self, items: Sequence[tuple[str, str, str, str, dict[str, Any] | None]]) -> list[float]:
        """Rewards of `(name, prompt, response, reference, meta)` items. Rewards with a
        `score_many` of their own (the code reward: a sandbox pool) get their items at once."""
        scores: list[float | None] = [None] * len(items)
        batched: dict[str, list[int]] = {}
        for i, (name, *_rest) in enumerate(items):
            if hasattr(self._rewards.get(name), "score_many"):
                batched.setdefault(name, []).append(i)
        for name, rows in batched.items():
            try:
                values = self._rewards[name].score_many(
                    [(items[i][1], items[i][2], items[i][3], items[i][4] or {}) for i in rows])
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - as in score: fall back row by row
                logger.warning("reward %r batch raised %s: %s; scoring row by row",
                               name, type(err).__name__, err)
                continue
            for i, value in zip(rows, values):
                scores[i] = float(value)
        return [s if s is not None else self.score(*items[i]) for i, s in enumerate(scores)]

    def check_records(self, records: Sequence[Any]) -> None:
        """Before training: every record's reward is registered and its `reference` and
        `meta` have the types that reward reads; rewards that need set-up (the code
        sandbox) check it. Raises DataError naming the first bad row's file and line."""
        problems = []
        used = set()
        for r in records:
            where = getattr(r, "source", "") or f"record {r.id!r}"
            problem = self._record_problem(r)
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                used.add(r.reward)
        if problems:
            more = f" (and {len(problems) - 1} more bad rows)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        for name in sorted(used):
            check = getattr(self._rewards[name], "check", None)
            if callable(check):
                check()

    def _record_problem(self, r: Any) -> str | None:
        if not isinstance(r.reward, str) or r.reward not in self._rewards:
            return (f"reward {r.reward!r} is not registered; expected one of "
                    f"{', '.join(self.names())}")
        if not isinstance(r.reference, str):
            return f"'reference' must be a string for reward {r.reward!r}, got {_kind(r.reference)}"
        if not isinstance(r.meta, dict):
            return f"'meta' must be a JSON object, got {_kind(r.meta)}"
        spec = REWARD_META.get(r.reward, {})
        for key in REQUIRED_META.get(r.reward, ()):
            if key not in r.meta:
                return f"reward {r.reward!r} needs meta.{key}"
        for key, types in spec.items():
            value = r.meta.get(key)
            if key in r.meta and (not isinstance(value, types) or isinstance(value, bool)):
                names = " or ".join(t.__name__ for t in types)
                return f"meta.{key} must be {names} for reward {r.reward!r}, got {_kind(value)}"
        return None


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def default_registry(code_sandbox: CodeSandbox | None = None,
                     allow_unsandboxed_code: bool = False) -> RewardRegistry:
    """A fresh registry holding every built-in reward (no judge: register one). The code
    reward runs in `code_sandbox` (default: bwrap with default limits)."""
    sandbox = code_sandbox or CodeSandbox(allow_unsandboxed=allow_unsandboxed_code)
    return RewardRegistry({
        "exact_match": exact_match,
        "choice_match": choice_match,
        "token_f1": token_f1,
        "rouge_l": rouge_l,
        "bleu": bleu,
        "chrf": chrf,
        "regex": regex_match,
        "format": format_check,
        "code": CodeReward(sandbox),
    })
