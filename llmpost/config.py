"""Dataclass configs of the llmpost pipeline; YAML files in configs/llm/ fill them.

One place for each default: DAPO's knobs carry the paper's values (clip 0.2 / 0.28,
token-level loss, dynamic sampling, overlong buffer, no KL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.regularizer import RegularizerConfig
from llmpost.logprobs import DEFAULT_CHUNK_SIZE


@dataclass
class VLLMEngineConfig:
    """Knobs passed to the vLLM engine (`generation.vllm.*`). The GPU ones are documented
    in the README; on the CPU build, `gpu_memory_utilization` is the share of host memory
    vLLM may take and sleep mode is ignored (vLLM warns)."""

    gpu_memory_utilization: float = 0.5  # the engine's share of device memory (weights + KV cache)
    tensor_parallel_size: int = 1  # ranks per engine; consecutive trainer ranks form a group
    enforce_eager: bool = True  # False: CUDA graphs on a GPU (faster decode, slower start)
    max_model_len: int = 0  # prompt + response tokens per sequence (0: the model's limit)
    sleep_between_rollouts: bool = False  # free the KV cache (level-1 sleep) during the update
    cpu_kv_cache_mib: int = 256  # KV cache on the CPU build (fixed size skips its profiling)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (the engine's weights)
    sync_bucket_mib: float = 256.0  # unsharded weights gathered at once by sync_weights


@dataclass
class GenerationConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_strings: list[str] = field(default_factory=list)
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = 256  # sequences per generate call
    # hf: False takes log-probs from the logits generate already computed (KV-cache
    # numerics, equal to a fresh forward within ~1e-6); True runs one more forward, exact.
    # vllm: the old log-probs always come from the policy's own forward (verl's default);
    # the engine's log-probs feed the mismatch metrics and `dapo.tis_cap`.
    recompute_logprobs: bool = False
    vllm: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)


@dataclass
class TinyModelConfig:
    """A randomly initialised Qwen3, used when `model.path` is empty (demo, tests)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 256


@dataclass
class ModelConfig:
    path: str | None = None  # local HF directory (safetensors + config.json)
    tokenizer: str | None = None  # defaults to `path`
    dtype: str = "float32"  # float32 | bfloat16 (the master weights)
    param_dtype: str | None = None  # FSDP compute dtype, e.g. bfloat16 on GPUs
    activation_checkpointing: int = 0  # every k-th block
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    sns_train: list[str] = field(default_factory=list)  # JSONL task files
    general_train: list[str] = field(default_factory=list)
    sns_eval: list[str] = field(default_factory=list)
    general_eval: list[str] = field(default_factory=list)
    chat_kwargs: dict[str, bool] = field(default_factory=dict)  # e.g. enable_thinking: false


@dataclass
class DapoConfig:
    LIMITS = {"steps": ">=1", "prompts_per_step": ">=1", "group_size": ">=2", "general_fraction": "[0,1]",
              "lr": ">0", "weight_decay": ">=0", "grad_clip": ">=0", "epochs": ">=1",
              "mini_batches": ">=1", "micro_batch_size": ">=0", "eps_low": "[0,1]", "eps_high": ">=0",
              "kl_coef": ">=0", "max_extra_rounds": ">=0", "overlong_buffer": ">=0",
              "hard_probe_per_task": ">=1", "save_every": ">=1", "logprob_chunk_size": ">=1"}
    steps: int = 50
    prompts_per_step: int = 32  # groups per update, over all ranks
    group_size: int = 8
    general_fraction: float = 0.2  # share of general prompts in the rollout pool
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass, against the same old log-probs
    micro_batch_size: int = 0  # sequences per forward (0: the whole mini-batch)
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None  # verl uses 3.0
    tis_cap: float | None = None  # vllm: weight token losses by min(p_old / p_engine, C)
    kl_coef: float = 0.0  # DAPO drops the KL term; > 0 adds k3 KL to the stage's start model
    dynamic_sampling: bool = True
    max_extra_rounds: int = 3
    overlong_buffer: int = 0  # tokens before max_new_tokens where the penalty starts
    overlong_factor: float = 1.0
    hard_examples: bool = False  # stage 3: keep prompts the model does not yet solve greedily
    hard_probe_per_task: int = 64
    save_every: int = 10
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE  # response tokens per LM-head chunk
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # mix: general prompts join the rollout pool; projector: rollouts on the target only,
    # general references regularize the update (llmpost.dapo_regularized)
    general_mode: Literal["mix", "projector"] = "mix"
    projector: RegularizerConfig = field(default_factory=lambda: RegularizerConfig(
        feasible="subset", granularity="layer", fraction=0.5, n_general=8, path="ghost"))


@dataclass
class SftConfig:
    LIMITS = {"steps": ">=1", "batch_size": ">=1", "lr": ">0", "weight_decay": ">=0", "grad_clip": ">=0",
              "general_fraction": "[0,1]", "max_length": ">=2", "save_every": ">=1",
              "logprob_chunk_size": ">=1"}
    steps: int = 100
    batch_size: int = 32  # sequences per step, over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    general_fraction: float = 0.05  # paper: about 100K general of 1.8M
    general_mode: Literal["mix", "projector"] = "mix"  # projector: general data as regularizer
    projector: RegularizerConfig = field(default_factory=lambda: RegularizerConfig(
        feasible="subset", granularity="layer", fraction=0.5, n_general=8, path="ghost"))
    packing: bool = False
    max_length: int = 256  # packed row length, or truncation length when padding
    save_every: int = 25
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE  # label tokens per LM-head chunk


@dataclass
class DiagnoseConfig:
    LIMITS = {"threshold": "[0,1]", "bottom_k": ">=0", "weak_weight": ">0"}
    threshold: float = 0.8  # tasks scoring below are weak
    bottom_k: int = 0  # also mark the k lowest SNS tasks weak (0: threshold only)
    weak_weight: float = 3.0  # stage-2 sampling weight of a weak task (others 1)


@dataclass
class EvalConfig:
    LIMITS = {"per_task": ">=0", "max_new_tokens": ">=1", "batch_size": ">=1"}
    per_task: int = 64  # eval rows per task (0: all)
    max_new_tokens: int = 16
    batch_size: int = 256


@dataclass
class RewardsConfig:
    LIMITS = {"code_workers": ">=1"}
    # The code reward runs policy code in a bubblewrap sandbox; true runs it without one
    # where bwrap is missing (a warning each stage). Never on a shared machine.
    allow_unsandboxed_code: bool = False
    code_workers: int = 4  # sandboxed runs at once


@dataclass
class PipelineConfig:
    run_dir: str = "runs/llmpost"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: DapoConfig = field(default_factory=DapoConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    stage2: SftConfig = field(default_factory=SftConfig)
    stage3: DapoConfig = field(default_factory=lambda: DapoConfig(hard_examples=True))
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
