"""Reward functions and their registry.

A reward is a plain function `(prompt, response, reference, **meta) -> float` in [0, 1]
(the judge may return any float). Tasks name their reward in the JSONL record
(`"reward": "exact_match"`), and `RewardRegistry.score` looks it up; a reward that raises
is logged and scored 0 so one bad sample never kills a run.

    registry = default_registry()
    registry.register("my_metric", lambda prompt, response, reference, **meta: ...)
    registry.register("judge", judge_reward(my_judge))
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from llmpost.sandbox import run_python

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
    import sacrebleu

    return sacrebleu.sentence_bleu(response, [reference]).score / 100.0


def chrf(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """Sentence chrF (sacrebleu) scaled to [0, 1]."""
    import sacrebleu

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


def code_reward(prompt: str, response: str, reference: str, **meta: Any) -> float:
    """Run the response's code (a ```python block, or all of it) in the sandbox.

    With `meta["tests"]` (Python asserts appended to the code) the reward is 1 when the
    script exits 0; otherwise stdout must equal the reference. `meta["timeout_s"]` and
    `meta["memory_mb"]` set the sandbox limits (default 5 s, 512 MiB).
    """
    block = _CODE_BLOCK.search(response)
    code = block.group(1) if block else response
    tests = meta.get("tests")
    if tests:
        code = code + "\n\n" + tests
    result = run_python(
        code,
        stdin=meta.get("stdin", ""),
        timeout_s=float(meta.get("timeout_s", 5.0)),
        memory_mb=int(meta.get("memory_mb", 512)),
    )
    if not result.ok:
        return 0.0
    return 1.0 if tests else float(result.stdout.strip() == reference.strip())


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
        import torch

        text = self.template.format(prompt=prompt, response=response, reference=reference)
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1]
        pair = torch.stack([logits[self.yes_id], logits[self.no_id]]).float().softmax(0)
        return float(pair[0])


class RewardRegistry:
    """Name -> reward function; `score` never raises."""

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
        except Exception as err:  # noqa: BLE001 - a broken reward must not stop training
            self.failures[name] += 1
            logger.warning("reward %r raised %s: %s; scored 0", name, type(err).__name__, err)
            return 0.0


def default_registry() -> RewardRegistry:
    """A fresh registry holding every built-in reward (no judge: register one)."""
    return RewardRegistry({
        "exact_match": exact_match,
        "choice_match": choice_match,
        "token_f1": token_f1,
        "rouge_l": rouge_l,
        "bleu": bleu,
        "chrf": chrf,
        "regex": regex_match,
        "format": format_check,
        "code": code_reward,
    })
