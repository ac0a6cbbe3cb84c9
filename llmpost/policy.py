"""The policy model's life cycle in a stage: load, shard with FSDP2, save; and the few
cross-rank reductions the trainers need (token counts, "does any rank need more").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.distributed import barrier, rank_and_world
from common.fsdp import apply_fsdp, full_state_dict, to_dtype
from common.io import replace_path
from common.run import TrainingRun, build_optimizer, seed_for_rank
from llmpost.config import ModelConfig
from llmpost.model import load_model, tiny_qwen3


def start_stage(model: torch.nn.Module, lr: float, weight_decay: float, stage_dir: Path, seed: int,
                steps: int, save_every: int, desc: str, validate_every: int = 0) -> TrainingRun:
    """The stage's `common.run.TrainingRun`: seeded per rank, AdamW, checkpoints every
    `save_every` steps and at the end, resumed from `stage_dir/checkpoints` if one is there."""
    rank, _ = rank_and_world()
    # Sampling RNG from the stage's seed (a resumed run gets it back from the checkpoint).
    torch.manual_seed(seed_for_rank(seed, rank))
    optimizer = build_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    run = TrainingRun(stage_dir, steps, model=model, optimizer=optimizer, checkpoint_every=save_every,
                      validate_every=validate_every, is_main=rank == 0, desc=desc)
    run.resume()
    return run


def build_policy(cfg: ModelConfig, tokenizer: Any, path: str | Path | None, seed: int = 0) -> torch.nn.Module:
    """The model at `path`, or a fresh tiny Qwen3 sized for `tokenizer` when `path` is None."""
    if path is not None:
        return load_model(path, to_dtype(cfg.dtype))
    t = cfg.tiny
    return tiny_qwen3(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_layers=t.num_layers,
        num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size, max_positions=t.max_positions,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, seed=seed,
    )


def untie_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """Give the output head its own copy of the input embedding (the projector's ghost path
    cannot share one parameter between two layers)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def shard_policy(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """FSDP2 over all ranks (no-op on one process, apart from activation checkpointing)."""
    return apply_fsdp(model, param_dtype=cfg.param_dtype,
                      ac_every=cfg.activation_checkpointing)


def save_policy(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Unsharded `save_pretrained` (safetensors) + tokenizer; rank 0 writes, all take part."""
    out_dir = Path(out_dir)
    state = full_state_dict(model, rank0_only=True)
    rank, _ = rank_and_world()
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        model.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        replace_path(tmp, out_dir)
    barrier()
    return out_dir
