"""Tiny random diffusers video pipelines for tests: Wan2.1 T2V and I2V, saved to a folder.

Everything is built from configs (no downloads): a 2-layer `WanTransformer3DModel`, an
`AutoencoderKLWan(base_dim=8, num_res_blocks=1)`, a one-layer UMT5 encoder with a
word-level tokenizer trained in place, and for I2V a two-layer CLIP vision encoder.
`build_tiny_wan_pipeline(out_dir, task)` saves with `save_pretrained`, so code under
test loads it back with `from_pretrained(out_dir)` like a real checkpoint. Frame counts
must be 4k + 1 and sizes multiples of 16 (VAE 8x, patch 2x).
`build_tiny_cogvideox_pipeline(out_dir, task)` does the same for CogVideoX (T5 text of
exactly 16 tokens: pass `max_sequence_length=16`; 32x32 clips of 9 frames).
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_DIM = 32
WORDS = (
    "a an the at of off and moving speed edges around wrapping bouncing clip video "
    "red green blue yellow square circle triangle left right up down slow fast"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer (pad 0, eos 1, unk 2) wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )  # fmt: skip
    return UMT5EncoderModel(config).eval()


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, num_res_blocks=1, z_dim=16).eval()


def tiny_wan_transformer(task: str = "t2v", image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    i2v = task == "i2v"
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
        in_channels=36 if i2v else 16, out_channels=16, text_dim=TEXT_DIM, freq_dim=32,
        ffn_dim=64, num_layers=2, image_dim=image_dim if i2v else None,
        added_kv_proj_dim=32 if i2v else None, rope_max_seq_len=64,
    ).eval()  # fmt: skip


def tiny_clip_image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, image_size=32, patch_size=8,
    )  # fmt: skip
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPVisionModel(config).eval(), processor


def build_tiny_wan_pipeline(out_dir: str | Path, task: str = "t2v", seed: int = 0) -> Path:
    """Save a random tiny Wan2.1 pipeline (`WanPipeline` or `WanImageToVideoPipeline`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    if task == "t2v":
        pipe = WanPipeline(transformer=tiny_wan_transformer("t2v"), **parts)
    elif task == "i2v":
        encoder, processor = tiny_clip_image_encoder()
        pipe = WanImageToVideoPipeline(
            transformer=tiny_wan_transformer("i2v", image_dim=encoder.config.hidden_size),
            image_encoder=encoder,
            image_processor=processor,
            **parts,
        )
    else:
        raise ValueError(f"task must be t2v or i2v, got {task!r}")
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_cogvideox_pipeline(out_dir: str | Path, task: str = "t2v", seed: int = 0) -> Path:
    """Save a random tiny `CogVideoXPipeline` or `CogVideoXImageToVideoPipeline`."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    if task not in ("t2v", "i2v"):
        raise ValueError(f"task must be t2v or i2v, got {task!r}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1,
            num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
        )
    ).eval()  # fmt: skip
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()  # fmt: skip
    i2v = task == "i2v"
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8 if i2v else 4,
        out_channels=4, time_embed_dim=32, text_embed_dim=TEXT_DIM, num_layers=2,
        sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=i2v, use_learned_positional_embeddings=i2v,
    ).eval()  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction")
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    return out_dir


def tiny_wan22_vae():
    """Wan2.2's VAE layout: 48 latent channels, residual blocks, pixel patch 2 (16x spatial)."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, num_res_blocks=1, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
        scale_factor_temporal=4, latents_mean=(torch.randn(48, generator=g) * 0.1).tolist(),
        latents_std=(1 + torch.rand(48, generator=g)).tolist(),
    ).eval()  # fmt: skip


def build_tiny_wan22_pipeline(out_dir: str | Path, kind: str = "ti2v_5b", seed: int = 0) -> Path:
    """Save a random tiny Wan2.2 pipeline: `ti2v_5b` (`WanPipeline`, 48-channel VAE,
    `expand_timesteps`; sizes multiples of 32), `ti2v_5b_i2v` (the same as
    `WanImageToVideoPipeline`), `a14b` (two 2-layer experts split at
    `boundary_ratio` 0.875, the Wan2.1 VAE) or `a14b_i2v` (the same as image-to-video,
    `boundary_ratio` 0.9)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    parts = dict(tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer)),
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    if kind in ("ti2v_5b", "ti2v_5b_i2v"):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48,
            out_channels=48, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
            rope_max_seq_len=64,
        ).eval()  # fmt: skip
        if kind == "ti2v_5b_i2v":  # image conditioning: the first latent frame at t = 0
            from diffusers import WanImageToVideoPipeline

            pipe = WanImageToVideoPipeline(transformer=transformer, vae=tiny_wan22_vae(), expand_timesteps=True,
                                           image_encoder=None, image_processor=None, **parts)
        else:
            pipe = WanPipeline(transformer=transformer, vae=tiny_wan22_vae(), expand_timesteps=True, **parts)
    elif kind == "a14b":
        pipe = WanPipeline(transformer=tiny_wan_transformer("t2v"), transformer_2=tiny_wan_transformer("t2v"),
                           vae=tiny_wan_vae(), boundary_ratio=0.875, **parts)
    elif kind == "a14b_i2v":  # 36 input channels (mask + image latents), no CLIP image encoder
        from diffusers import WanImageToVideoPipeline

        experts = [WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36,
            out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
        ).eval() for _ in range(2)]  # fmt: skip
        pipe = WanImageToVideoPipeline(transformer=experts[0], transformer_2=experts[1], vae=tiny_wan_vae(),
                                       boundary_ratio=0.9, image_encoder=None, image_processor=None, **parts)
    else:
        raise ValueError(f"kind must be ti2v_5b, ti2v_5b_i2v, a14b or a14b_i2v, got {kind!r}")
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    return out_dir
