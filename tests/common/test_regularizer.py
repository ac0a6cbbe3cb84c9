"""DataRegularizer: the three gradient paths agree, match the flat projector, and FSDP2 equals
one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.ghost_grams import linear_sketch_gram
from common.projector import project
from common.regularizer import DataRegularizer, RegularizerConfig
from tests.multiproc import run_on_ranks

VOCAB = 97


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg)


def per_sample_lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    tokens = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return tokens.mean(1)


def batches(n_target=3, n_general=5, seq_t=9, seq_g=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, VOCAB, (n_target, seq_t), generator=g)
    general = torch.randint(0, VOCAB, (n_general, seq_g), generator=g)
    return target, general


def grads_after(model, cfg, target, general):
    model.zero_grad(set_to_none=True)
    stats = DataRegularizer(model, cfg).step(per_sample_lm_loss, target, general)
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}, stats


def assert_grads_close(got, want, rtol=1e-5):
    for k in want:
        scale = want[k].abs().max().item() + 1e-12
        err = (got[k] - want[k]).abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{k}: max error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize(
    ("feasible", "granularity"),
    [("hull", "model"), ("halfspace", "block"), ("subset", "layer"), ("cone", "layer"),
     ("span", "block"), ("mean", "model"), ("filter", "layer")],
)
def test_three_paths_give_the_same_update(feasible, granularity):
    model = tiny_qwen3()
    target, general = batches()
    base = dict(feasible=feasible, granularity=granularity, fraction=0.4, n_general=5)
    want, want_stats = grads_after(model, RegularizerConfig(path="materialized", **base), target, general)
    for extra in (
        dict(path="ghost", ghost_pairs="ghost"),  # T x T ghost products everywhere
        dict(path="ghost", ghost_pairs="auto"),  # per-layer choice
        dict(path="sketch", sketch_min_numel=1, sketch_dim=512),  # sketch code, exact sides
    ):
        got, stats = grads_after(model, RegularizerConfig(**base, **extra), target, general)
        assert_grads_close(got, want)
        assert stats.target_loss == pytest.approx(want_stats.target_loss, rel=1e-5)
        assert stats.cos_update_target == pytest.approx(want_stats.cos_update_target, abs=1e-5)


def _plain_per_sample_grads(model, ids):
    out = []
    for row in ids:
        model.zero_grad(set_to_none=True)
        per_sample_lm_loss(model, row[None]).sum().backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(out).double()


@pytest.mark.parametrize("feasible", ["hull", "halfspace", "subset", "none"])
def test_model_granularity_equals_flat_projector_on_plain_autograd(feasible):
    model = tiny_qwen3(seed=2)
    target, general = batches(seed=4)
    g_target = _plain_per_sample_grads(model, target).mean(0)
    g_general = _plain_per_sample_grads(model, general)
    want = project(g_target, g_general, feasible, fraction=0.4)
    cfg = RegularizerConfig(feasible=feasible, granularity="model", fraction=0.4, n_general=5)
    got, stats = grads_after(model, cfg, target, general)
    flat = torch.cat([got[k].flatten() for k, _ in model.named_parameters()]).double()
    torch.testing.assert_close(flat, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    assert stats.target_grad_norm == pytest.approx(g_target.norm().item(), rel=1e-5)
    assert stats.update_norm == pytest.approx(want.norm().item(), rel=1e-4)


def test_layer_groups_project_each_layer_on_its_own():
    model = tiny_qwen3(seed=3)
    target, general = batches(seed=5)
    g_target = _plain_per_sample_grads(model, target).mean(0)
    g_general = _plain_per_sample_grads(model, general)
    cfg = RegularizerConfig(feasible="cone", granularity="layer", n_general=5, path="ghost")
    got, _ = grads_after(model, cfg, target, general)
    # a Linear without bias and a norm: one parameter tensor each, projected separately
    offset = 0
    for name, p in model.named_parameters():
        sl = slice(offset, offset + p.numel())
        offset += p.numel()
        if name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"):
            want = project(g_target[sl], g_general[:, sl], "cone")
            torch.testing.assert_close(got[name].flatten().double(), want, rtol=1e-4, atol=1e-7)


def test_sketch_error_within_documented_bound():
    torch.manual_seed(0)
    n, T, width, out, k = 4, 6, 96, 80, 16
    xg, gg = torch.randn(n, T, width), torch.randn(n, T, out)
    g_target = torch.randn(out, width)
    cfg = RegularizerConfig(path="sketch", sketch_dim=k, sketch_min_numel=1, n_general=n)
    exact_cols = torch.cat([g_target[None], torch.einsum("nto,nti->noi", gg, xg)]).flatten(1).double()
    exact = exact_cols @ exact_cols.T
    norms = exact.diagonal().sqrt()
    bound = math.sqrt(2 / k + 2 * (1 + 2 / k) / k)
    errors = []
    for step in range(30):
        est = linear_sketch_gram("layer", g_target, xg, gg, cfg.sketch_dim, cfg.seed, step)
        errors.append((est - exact) / torch.outer(norms, norms))
    errors = torch.stack(errors)
    # unbiased: the mean over draws shrinks; spread within the stated standard deviation
    assert errors.mean(0).abs().max() < 3 * bound / math.sqrt(30)
    assert errors.std(0).max() <= bound
    assert errors.abs().max() > 1e-3  # it really is an approximation at k < dims


def test_none_and_mean_are_plain_training():
    model = tiny_qwen3(seed=1)
    target, general = batches(seed=7)
    model.zero_grad()
    per_sample_lm_loss(model, target).mean().backward()
    plain_target = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    per_sample_lm_loss(model, general).mean().backward()
    plain_general = {k: p.grad.clone() for k, p in model.named_parameters()}
    got, _ = grads_after(model, RegularizerConfig(feasible="none", n_general=5), target, general)
    assert_grads_close(got, plain_target)
    got, _ = grads_after(model, RegularizerConfig(feasible="mean", n_general=5), target, general)
    assert_grads_close(got, plain_general)


def test_padded_dict_batches():
    def masked_loss(model, batch):
        logits = model(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1]
        tokens = F.cross_entropy(logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none")
        keep = batch["mask"][:, 1:]
        return (tokens * keep).sum(1) / keep.sum(1)

    target, general = batches(seed=9)
    mask_t, mask_g = torch.ones_like(target), torch.ones_like(general)
    mask_t[0, -3:] = 0  # right padding; HF masking makes vmap fall back to a loop
    mask_g[1, -4:] = 0
    tb, gb = {"ids": target, "mask": mask_t}, {"ids": general, "mask": mask_g}
    grads = {}
    for path in ("materialized", "ghost"):
        model = tiny_qwen3(seed=5)
        cfg = RegularizerConfig(path=path, feasible="hull", granularity="layer", n_general=5)
        DataRegularizer(model, cfg).step(masked_loss, tb, gb)
        grads[path] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert_grads_close(grads["ghost"], grads["materialized"])


def test_activation_checkpointing_recompute_adds_nothing():
    from common.fsdp import apply_activation_checkpointing

    target, general = batches(seed=11)
    cfg = dict(feasible="halfspace", granularity="block", n_general=5)
    want, _ = grads_after(tiny_qwen3(seed=6), RegularizerConfig(path="materialized", **cfg), target, general)
    model = tiny_qwen3(seed=6)
    assert apply_activation_checkpointing(model) == 2
    got, _ = grads_after(model, RegularizerConfig(path="ghost", **cfg), target, general)
    assert_grads_close(got, want)


def test_bad_config_and_inputs_raise_config_errors():
    with pytest.raises(ConfigError, match="regularizer.feasible"):
        RegularizerConfig(feasible="ball")
    with pytest.raises(ConfigError, match="regularizer.granularity"):
        RegularizerConfig(granularity="neuron")
    with pytest.raises(ConfigError, match="fraction"):
        RegularizerConfig(fraction=1.5)
    model = tiny_qwen3()
    target, general = batches()
    reg = DataRegularizer(model, RegularizerConfig(n_general=4))
    with pytest.raises(ConfigError, match="n_general is 4"):
        reg.step(per_sample_lm_loss, target, general)
    reg = DataRegularizer(model, RegularizerConfig(n_general=5))
    with pytest.raises(ConfigError, match="one loss per sample"):
        reg.step(lambda m, ids: per_sample_lm_loss(m, ids).mean(), target, general)
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ConfigError, match="tied"):
        DataRegularizer(model, RegularizerConfig())


FSDP_CONFIGS = [
    dict(feasible="hull", granularity="layer", n_general=5, path="ghost"),
    dict(feasible="halfspace", granularity="model", n_general=5, path="ghost", ghost_pairs="ghost"),
    dict(feasible="subset", granularity="block", n_general=5, path="ghost", fraction=0.4),
]


def _fsdp_worker(rank, world_size, configs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_qwen3(seed=0)
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    target, general = batches()  # every rank passes the same batches
    out = []
    for cfg_kwargs in configs:
        model.zero_grad(set_to_none=True)
        stats = DataRegularizer(model, RegularizerConfig(**cfg_kwargs)).step(
            per_sample_lm_loss, target, general
        )
        grads = {k: p.grad.full_tensor().detach().clone() for k, p in model.named_parameters()}
        out.append((grads, stats.cos_update_target))
    return out


def test_fsdp_two_processes_equal_one():
    results = run_on_ranks(_fsdp_worker, 2, FSDP_CONFIGS)  # one spawn for every config
    for i, cfg_kwargs in enumerate(FSDP_CONFIGS):
        reference = RegularizerConfig(**{**cfg_kwargs, "path": "materialized"})
        want, want_stats = grads_after(tiny_qwen3(seed=0), reference, *batches())
        for rank_results in results:
            grads, cos = rank_results[i]
            assert_grads_close(grads, want)
            assert cos == pytest.approx(want_stats.cos_update_target, abs=1e-5)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_ghost_path_on_video_transformers_equals_materialized(family):
    """Wan's root and blocks own a `scale_shift_table` besides their children (tapped per
    sample); CogVideoX's patch conv sees B x F frame rows: both through the ghost path."""
    from videodpo.models.tiny import build_pixel_adapter
    from videodpo.objective import per_sample_error

    adapter = build_pixel_adapter(family, "t2v", seed=0, height=8, width=8, num_frames=4)
    objective = adapter.objective
    text = adapter.encode_prompts(["a red square moving left slow"])[0]

    def loss_fn(model, b):
        noisy = objective.add_noise(b["x"], b["noise"], b["t"])
        target = objective.target(b["x"], b["noise"], b["t"])
        return per_sample_error(adapter.predict(model, noisy, b["t"], {"text": b["text"]}), target)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 4, 8, 8, generator=g)
        return {"x": x, "noise": torch.randn(x.shape, generator=g),
                "t": objective.sample_timesteps(n, g), "text": text.expand(n, *text.shape)}

    target, general = batch(2, 0), batch(3, 1)
    results = {}
    for path in ("materialized", "ghost"):
        cfg = RegularizerConfig(feasible="subset", granularity="block", n_general=3, path=path)
        model = adapter.transformer
        model.zero_grad(set_to_none=True)
        DataRegularizer(model, cfg).step(loss_fn, target, general)
        results[path] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert_grads_close(results["ghost"], results["materialized"], rtol=1e-4)
    if family == "wan":
        tables = [v for k, v in results["ghost"].items() if "scale_shift_table" in k]
        assert len(tables) == 3 and all(v.abs().max() > 0 for v in tables)
