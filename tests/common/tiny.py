"""Tiny models built from config for the common tests (random init, seconds on a CPU)."""

import torch


def tiny_wan(seed: int = 0, in_channels: int = 4, num_layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=in_channels, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers,
        cross_attn_norm=True, rope_max_seq_len=32,
    )


def wan_batch(batch: int, frames: int = 2, size: int = 8, channels: int = 4, text_len: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, text_len, 16, generator=g)
    target = torch.randn(batch, channels, frames, size, size, generator=g)
    return x, t, text, target


def wan_loss(model, x, t, text, target):
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    return ((out - target) ** 2).mean()


def tiny_qwen3(seed: int = 0, vocab: int = 64):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg)


def qwen_batch(batch: int, seq: int = 12, vocab: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def qwen_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss
