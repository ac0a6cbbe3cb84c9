"""Sampling responses from the policy: batched HF `generate`, or vLLM behind the same
interface.

`Rollout.generate(prompts, num_samples)` takes token-id prompts and returns a
`RolloutBatch` with, per response: its tokens (ending at eos or cut at a stop string),
the sampling policy's token log-probs, its length and whether it was truncated at
`max_new_tokens`. Responses of one prompt are consecutive (the GRPO/DAPO group layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class GenerationConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_strings: list[str] = field(default_factory=list)
    backend: str = "hf"  # hf | vllm
    batch_size: int = 256  # sequences per generate call
    # False: log-probs from the logits generate already computed (KV-cache numerics, equal
    # to a fresh forward within ~1e-6); True: one more forward pass, exact.
    recompute_logprobs: bool = False


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    lengths: list[int]
    truncated: list[bool]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.response_ids)


def pack_right_padded(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + response per row, right-padded: (input_ids, attention_mask, response_mask).

    `response_mask[b, t]` is 1 where token t+1 is a response token, so it lines up with
    the log-probs of `token_logprobs` (position t predicts token t+1).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq_len = max(lengths)
    ids = torch.full((len(prompts), seq_len), pad_id, dtype=torch.long)
    attn = torch.zeros(len(prompts), seq_len, dtype=torch.long)
    resp = torch.zeros(len(prompts), seq_len - 1, dtype=torch.float32)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[b, : len(p) + len(r)] = 1
        resp[b, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    return ids, attn, resp


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each next token, `(B, S-1)`, and optionally the entropy per position."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logp, entropy


def _cut_at_stop(tokens: list[int], tokenizer: Any, stops: list[str]) -> tuple[list[int], bool]:
    """Shortest prefix whose text contains a stop string (kept), and whether one was found."""
    if not stops:
        return tokens, False
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        if any(s in text for s in stops):
            return tokens[:k], True
    return tokens, False


class HFRollout:
    """Batched sampling with transformers' `generate` (works on FSDP2-sharded models)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: GenerationConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], num_samples: int = 1,
                 greedy: bool = False, with_logprobs: bool = True) -> RolloutBatch:
        cfg, tok = self.config, self.tokenizer
        from_logits = with_logprobs and not cfg.recompute_logprobs
        logprobs: list[list[float]] = []
        expanded = [p for p in prompts for _ in range(num_samples)]
        pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
        was_training = self.model.training
        self.model.eval()
        responses: list[list[int]] = []
        truncated: list[bool] = []
        synced = dist.is_initialized() and dist.get_world_size() > 1
        for start in range(0, len(expanded), cfg.batch_size):
            chunk = expanded[start : start + cfg.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            device = next(self.model.parameters()).device
            kwargs: dict[str, Any] = dict(
                max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                do_sample=not greedy, synced_gpus=synced,
                output_logits=from_logits, return_dict_in_generate=True,
            )
            if not greedy:
                kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
            out = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
            new_tokens = out.sequences[:, width:]
            if from_logits:
                steps = torch.stack(out.logits, dim=1).float() / cfg.temperature  # (B, T, V)
                chosen = steps.log_softmax(-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
                logprobs += chosen.cpu().tolist()
            for row in new_tokens.tolist():
                if eos_id in row:
                    responses.append(row[: row.index(eos_id) + 1])
                    truncated.append(False)
                else:
                    resp, stopped = _cut_at_stop(row, tok, cfg.stop_strings)
                    responses.append(resp)
                    truncated.append(not stopped)
        if cfg.stop_strings:
            for i, r in enumerate(responses):
                cut, stopped = _cut_at_stop(r, tok, cfg.stop_strings)
                if stopped:
                    responses[i], truncated[i] = cut, False
        if from_logits:
            logprobs = [lp[: len(r)] for lp, r in zip(logprobs, responses)]
        elif with_logprobs:
            logprobs = self.score(expanded, responses)
        else:
            logprobs = [[] for _ in responses]
        self.model.train(was_training)
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
        return RolloutBatch(expanded, responses, logprobs, [len(r) for r in responses],
                            truncated, texts)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of `responses` under the current model (at `temperature`)."""
        out: list[list[float]] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.config.batch_size):
            p = prompts[start : start + self.config.batch_size]
            r = [x or [self.tokenizer.eos_token_id] for x in responses[start : start + len(p)]]
            ids, attn, mask = pack_right_padded(p, r, self.tokenizer.pad_token_id)
            logp, _ = token_logprobs(self.model, ids.to(device), attn.to(device), self.config.temperature)
            for b in range(len(p)):
                sel = mask[b].bool()
                n = len(responses[start + b])
                out.append(logp[b].cpu()[sel][:n].tolist())
        return out


class VLLMRollout:
    """vLLM back-end (CUDA only, imported lazily). `sync_weights(model)` pushes the policy's
    current weights into the engine before each rollout."""

    def __init__(self, model_path: str, tokenizer: Any, config: GenerationConfig,
                 **engine_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as err:  # pragma: no cover - needs CUDA and the vllm extra
            raise ImportError("the vllm back-end needs `pip install .[vllm]` and a GPU") from err
        self.llm = LLM(model=model_path, **engine_kwargs)
        self.tokenizer, self.config = tokenizer, config

    def sync_weights(self, model: torch.nn.Module) -> None:  # pragma: no cover - GPU only
        state = model.state_dict()
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((k, v.full_tensor() if hasattr(v, "full_tensor") else v)
                                  for k, v in state.items())

    def generate(self, prompts: list[list[int]], num_samples: int = 1,
                 greedy: bool = False) -> RolloutBatch:  # pragma: no cover - GPU only
        from vllm import SamplingParams

        cfg = self.config
        params = SamplingParams(
            n=num_samples, temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens, stop=cfg.stop_strings or None, logprobs=0,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        batch = RolloutBatch([], [], [], [], [], [])
        for prompt, out in zip(prompts, outputs):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                batch.prompt_ids.append(prompt)
                batch.response_ids.append(ids)
                batch.logprobs.append([lp[t].logprob for lp, t in zip(completion.logprobs, ids)])
                batch.lengths.append(len(ids))
                batch.truncated.append(completion.finish_reason == "length")
                batch.texts.append(completion.text.strip())
        return batch


def build_rollout(model: torch.nn.Module, tokenizer: Any, config: GenerationConfig,
                  model_path: str | None = None) -> HFRollout | VLLMRollout:
    if config.backend == "hf":
        return HFRollout(model, tokenizer, config)
    if config.backend == "vllm":
        if model_path is None:
            raise ValueError("the vllm back-end needs the model directory")
        return VLLMRollout(model_path, tokenizer, config)
    raise ValueError(f"generation.backend must be 'hf' or 'vllm', got {config.backend!r}")
