"""The policy model: a tiny Qwen3 built from a config for the demo and tests, or any
local causal-LM directory loaded with `from_pretrained` for a real run."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_positions: int = 256,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 (about 0.3M parameters at the defaults)."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM from a local directory (safetensors + config.json)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (expected {path / 'config.json'})")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
