"""The CUDA paths: skipped where there is no GPU (this project's CI), run by hand on a GPU
machine. Each test compares the CUDA run with the same run on the CPU."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from common import attention as attn
from tests.common.test_attention import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_and_lse_on_cuda_match_float64_reference(dtype, causal):
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 33, 64, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 33, 64, device="cuda", dtype=dtype)
    ref, ref_lse = reference(q, k, v, causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    out = attn.attention(q, k, v, causal=causal, backend="sdpa")
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol)
    out, lse = attn.attention_with_lse(q, k, v, causal=causal)
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double().cpu(), ref_lse.cpu(), rtol=tol, atol=tol)


def test_auto_backend_on_cuda_names_what_runs(caplog):
    caplog.set_level(logging.INFO, logger="common.attention")
    q = torch.randn(1, 2, 8, 32, device="cuda", dtype=torch.bfloat16)
    attn.attention(q, q, q, backend="auto")
    chosen = attn.resolve_backend("auto", "cuda")
    assert chosen in attn.available_backends("cuda")
    if "flash" not in attn.available_backends("cuda") and "xformers" not in attn.available_backends("cuda"):
        assert chosen == "sdpa"


def _video_run(tmp_path, device_name: str, mixed: str):
    from tests.videodpo.test_trainer import PairList, _cfg
    from videodpo.models.tiny import build_pixel_adapter
    from videodpo.trainer import train

    adapter = build_pixel_adapter("wan", "i2v", seed=0, height=8, width=8, num_frames=4,
                                  num_layers=2, num_heads=2, head_dim=16, ffn_dim=64, patch_size=(1, 2, 2))
    cfg = _cfg(tmp_path / device_name, "reg_dpo", steps=3)
    cfg.train.mixed_precision = mixed
    result = train(cfg, dataset=PairList(), adapter=adapter)
    params = {n: p.detach().float().cpu() for n, p in adapter.transformer.named_parameters()}
    devices = {p.device.type for p in adapter.transformer.parameters()}
    return result, params, devices


def test_video_reg_dpo_training_on_cuda_matches_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_result, cpu_params, cpu_devices = _video_run(tmp_path, "cpu", "no")
    monkeypatch.undo()
    gpu_result, gpu_params, gpu_devices = _video_run(tmp_path, "cuda", "no")
    assert cpu_devices == {"cpu"} and gpu_devices == {"cuda"}
    for a, b in zip(cpu_result.history, gpu_result.history):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-3, abs_tol=1e-4), (a, b)
    for name in cpu_params:
        torch.testing.assert_close(gpu_params[name], cpu_params[name], rtol=1e-3, atol=1e-4, msg=name)
    bf16_result, _, _ = _video_run(tmp_path, "cuda_bf16", "bf16")
    assert all(math.isfinite(r["loss"]) for r in bf16_result.history)
    assert math.isclose(bf16_result.history[0]["loss"], gpu_result.history[0]["loss"], rel_tol=0.05)


def test_dapo_update_on_cuda_matches_cpu():
    from tests.llmpost.test_dapo_fsdp import _batch, _model, _update

    torch.manual_seed(0)
    cpu_model = _model()
    gpu_model = _model()
    gpu_model.load_state_dict(cpu_model.state_dict())
    batch = _batch(cpu_model, 8, seed=1)
    _update(cpu_model, batch)
    _update(gpu_model.cuda(), batch)
    for (name, p), q in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-3, atol=1e-4, msg=name)


def test_fsdp_on_one_nccl_rank_matches_plain_model():
    import torch.distributed as dist

    from common.fsdp import apply_fsdp, full_state_dict
    from tests.llmpost.test_dapo_fsdp import _batch, _model, _update

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = _model()
        batch = _batch(plain, 8, seed=2)
        plain.cuda()
        sharded = _model().cuda()
        sharded.load_state_dict(plain.state_dict())
        apply_fsdp(sharded)
        _update(plain, batch)
        _update(sharded, batch)
        state = full_state_dict(sharded)
        for name, p in plain.state_dict().items():
            torch.testing.assert_close(state[name].float().cpu(), p.float().cpu(), rtol=1e-4, atol=1e-5, msg=name)
        # bookkeeping made on the CPU crosses NCCL (which takes GPU tensors only)
        from common.distributed import all_reduce_values, global_sum

        assert global_sum(2.5) == 2.5
        counts = all_reduce_values(torch.tensor([3, 4]))
        assert counts.device.type == "cpu" and counts.tolist() == [3, 4]
    finally:
        dist.destroy_process_group()


def test_memory_peak_is_read_from_cuda():
    from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory

    reset_peak_memory()
    before = current_memory_mb()
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    peak = peak_memory_mb()
    del x
    assert 64 <= peak - before < 65


def _ring_on_one_device(q, k, v, dout, world, layout, causal, seq_len, kernel):
    """Ring attention's block schedule for `world` ranks, run in one process: each rank's
    forward merges its pieces against every K/V shard (`_ring_pieces`, `_merge_into`),
    its backward recomputes each piece with `lse_backward` from the merged out and lse.
    One GPU cannot hold several NCCL ranks, so the shards stay here; the kernels and the
    merge are the ring's own. Returns the whole out, dq, dk, dv (padding dropped)."""
    from common.attention import lse_backward, lse_forward, repeat_kv, sum_kv_groups
    from common.context_parallel import _merge_into, _ring_pieces

    def shard(x):
        return [_shard_of(x, r, world, layout) for r in range(world)]

    qs, ks, vs, douts = shard(q), shard(k), shard(v), shard(dout)
    h, hk, s = q.shape[1], k.shape[1], qs[0].shape[2]
    scale = q.shape[-1] ** -0.5
    outs, dqs = [], []
    dks = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in ks]
    dvs = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in vs]
    for r in range(world):
        out = torch.zeros(qs[r].shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qs[r].shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for j in range(world):
            for qsl, ksl, piece_causal in _ring_pieces(r, j, world, s, layout, causal, seq_len):
                o_b, l_b = lse_forward(qs[r][:, :, qsl].contiguous(), repeat_kv(ks[j][:, :, ksl], h).contiguous(),
                                       repeat_kv(vs[j][:, :, ksl], h).contiguous(), piece_causal, scale, kernel)
                _merge_into(out[:, :, qsl], lse[:, :, qsl], o_b, l_b)
        out = out.to(q.dtype)
        dq = torch.zeros(qs[r].shape, dtype=torch.float32, device=q.device)
        for j in range(world):
            for qsl, ksl, piece_causal in _ring_pieces(r, j, world, s, layout, causal, seq_len):
                dq_b, dk_b, dv_b = lse_backward(
                    douts[r][:, :, qsl].contiguous(), qs[r][:, :, qsl].contiguous(),
                    repeat_kv(ks[j][:, :, ksl], h).contiguous(), repeat_kv(vs[j][:, :, ksl], h).contiguous(),
                    out[:, :, qsl].contiguous(), lse[:, :, qsl].contiguous(), piece_causal, scale, kernel,
                )
                dq[:, :, qsl] += dq_b.float()
                dks[j][:, :, ksl] += sum_kv_groups(dk_b.float(), hk)
                dvs[j][:, :, ksl] += sum_kv_groups(dv_b.float(), hk)
        outs.append(out)
        dqs.append(dq)
    length = q.shape[2]
    return tuple(_unshard(parts, world, layout)[:, :, :length] for parts in (outs, dqs, dks, dvs))


def _shard_of(x, rank, world, layout):
    """Rank `rank`'s shard along dim 2 (zero padding at the end), as `split_sequence` cuts."""
    parts = 2 * world if layout == "zigzag" else world
    length = -(-x.shape[2] // parts) * parts
    x = torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))
    chunks = x.chunk(parts, dim=2)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], 2) if layout == "zigzag" else chunks[rank]


def _unshard(parts, world, layout):
    if layout == "contiguous":
        return torch.cat(parts, dim=2)
    chunks = [None] * (2 * world)
    for r, p in enumerate(parts):
        chunks[r], chunks[2 * world - 1 - r] = p.chunk(2, dim=2)
    return torch.cat(chunks, dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layout", "causal"), [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_ring_blocks_on_cuda_kernels_match_sdpa(dtype, layout, causal):
    """Ring attention's pieces on the CUDA LSE kernel (flash-attn, or torch's flash /
    memory-efficient op) merge to SDPA's output and q/k/v gradients on the GPU: 4 ranks,
    GQA (8 query, 2 K/V heads), a padded length (250 of 256)."""
    kernel = attn.lse_kernel("cuda", dtype)
    assert kernel in ("flash_attn", "torch_flash", "torch_efficient")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(2, 8, 250, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    k, v = (torch.randn(2, 2, 250, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    out, dq, dk, dv = _ring_on_one_device(q, k, v, dout, 4, layout, causal, 250, kernel)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=causal, enable_gqa=True)
    ref.backward(dout)
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-4
    for name, got, want in (("out", out, ref), ("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.1e} ({kernel}, {dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_lse_gradients_on_cuda_match_cpu(dtype):
    """Gradients through out and lse (the extra-column trick of `lse_backward`) on the
    CUDA kernel equal the CPU flash kernel's in float32."""
    g = torch.Generator().manual_seed(3)
    q, w = (torch.randn(2, 4, 40, 64, generator=g) for _ in range(2))
    k, v = (torch.randn(2, 2, 40, 64, generator=g) for _ in range(2))
    wl = torch.randn(2, 4, 40, generator=g)

    def grads(device, dt):
        leaves = [t.to(device, dt).requires_grad_() for t in (q, k, v)]
        out, lse = attn.attention_with_lse(*leaves, causal=True)
        loss = (out.float() * w.to(device)).sum() + (lse.float() * wl.to(device)).sum()
        return [t.float().cpu() for t in torch.autograd.grad(loss, leaves)]

    want = grads("cpu", torch.float32)
    got = grads("cuda", dtype)
    tol = 5e-2 if dtype == torch.bfloat16 else 2e-4
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.1e}"


def test_vllm_engine_knobs_on_cuda(tmp_path):
    """The GPU knobs of `generation.vllm`: CUDA graphs (enforce_eager off), a memory share,
    max_model_len and sleep / wake-up around the update; greedy still equals HF's after a
    weight change pushed while the engine slept, and the log-probs match the policy's."""
    pytest.importorskip("vllm")
    from llmpost.config import GenerationConfig, VLLMEngineConfig
    from llmpost.rollout import HFRollout, VLLMRollout
    from llmpost.tasks import vocabulary_words
    from llmpost.tokenizer import train_tokenizer
    from tests.llmpost.conftest import make_tiny_model

    tokenizer = train_tokenizer([" ".join(vocabulary_words())])
    model = make_tiny_model(tokenizer, seed=0, hidden=128)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    cfg = GenerationConfig(max_new_tokens=6, backend="vllm", vllm=VLLMEngineConfig(
        gpu_memory_utilization=0.2, enforce_eager=False, max_model_len=128,
        sleep_between_rollouts=True))
    engine = VLLMRollout(str(tmp_path), tokenizer, cfg)
    prompts = [tokenizer(w, add_special_tokens=False).input_ids for w in
               ("cat dog", "the house is", "tech news today")]
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25.0)  # peaked: clear greedy winners
    engine.sync_weights(model)
    engine.generate(prompts, 2, seed=0)
    engine.sleep()
    assert engine.asleep
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine.sync_weights(model)  # wakes the engine
    assert not engine.asleep
    ours = engine.generate(prompts, 1, greedy=True).response_ids
    hf = HFRollout(model, tokenizer, cfg).generate(prompts, 1, greedy=True).response_ids
    assert ours == hf
    sampled = engine.generate(prompts, 4, seed=1)
    policy = HFRollout(model, tokenizer, cfg).score(sampled.prompt_ids, sampled.response_ids)
    assert max(abs(a - b) for e, p in zip(sampled.logprobs, policy) for a, b in zip(e, p)) < 2e-3
    engine.close()


@pytest.mark.parametrize("offload", [False, True])
def test_raw_clip_training_encodes_on_the_gpu(tmp_path, offload):
    """videodpo with a pipeline folder on a GPU: the VAE, text and image encoders run on
    the GPU (no encoder work on the CPU); `model.offload_encoders` parks them on the CPU
    between uses."""
    from unittest import mock

    from tests.videodpo.tiny_models import build_tiny_wan_pipeline
    from videodpo.config import RunConfig
    from videodpo.data.pairs import collate_pairs
    from videodpo.state import build_training_state

    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.model.path, cfg.model.offload_encoders = str(build_tiny_wan_pipeline(tmp_path / "wan", "i2v")), offload
    cfg.loss.kind = "sft"
    adapter = build_training_state(cfg).adapter
    seen = []
    real_encode = adapter.encode_video

    def spy(video):
        seen.append((video.device.type, next(adapter.vae.parameters()).device.type))
        return real_encode(video)

    clip = torch.rand(3, 5, 32, 32) * 2 - 1
    items = [{"chosen": clip, "rejected": clip.flip(-1), "caption": "a red square moving left",
              "first_frame": clip[:, 0]}]
    with mock.patch.object(adapter, "encode_video", spy):
        batch = collate_pairs(adapter, items)
    assert seen and all(s == ("cuda", "cuda") for s in seen)
    assert batch.chosen.is_cuda and batch.cond["text"].is_cuda and batch.cond["image_embeds"].is_cuda
    parked = {next(getattr(adapter.pipeline, n).parameters()).device.type
              for n in ("vae", "text_encoder", "image_encoder")}
    assert parked == ({"cpu"} if offload else {"cuda"})


def test_chunked_logprobs_on_cuda_match_cpu_and_stay_near_one_chunk():
    """bf16 and fp32 heads at Qwen3's vocabulary on the GPU: log-probs and gradients equal
    the CPU float64 computation, and the LM-head part of the step stays under 2 chunks of
    fp32 logits above what the body needs."""
    from llmpost.logprobs import response_logprobs
    from llmpost.rollout import pack_right_padded
    from tests.llmpost.test_logprobs import QWEN3_VOCAB, _long_batch, _model

    ids, attn_mask, mask = pack_right_padded(*_long_batch(4, 512), pad_id=0)
    cpu = _model(QWEN3_VOCAB, layers=1, max_positions=1024).double()
    logp_ref, _ = response_logprobs(cpu, ids, attn_mask, mask, chunk_size=256)
    logp_ref.sum().backward()
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        gpu = _model(QWEN3_VOCAB, layers=1, max_positions=1024).to("cuda", dtype)
        args = (ids.cuda(), attn_mask.cuda(), mask.cuda())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        logp, _ = response_logprobs(gpu, *args, chunk_size=256)
        logp.sum().backward()
        peak = torch.cuda.max_memory_allocated() - start
        torch.testing.assert_close(logp.double().cpu(), logp_ref.detach(), rtol=tol, atol=tol)
        for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
            if dtype == torch.float32:  # bf16 gradients: only finite (bf16 sums drift)
                torch.testing.assert_close(q.grad.double().cpu(), p.grad, rtol=tol, atol=tol,
                                           msg=name)
            assert torch.isfinite(q.grad).all(), name
        model_bytes = sum(p.numel() * p.element_size() for p in gpu.parameters())
        assert peak < 2 * 256 * QWEN3_VOCAB * 4 + 4 * model_bytes + (64 << 20), (dtype, peak)
