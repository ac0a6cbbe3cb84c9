"""Tiny Wan T2V / I2V, CogVideoX and Qwen3 with cp=2 equal cp=1: outputs and gradients.

Each rank runs the model on its token shard through `apply_context_parallel` with the
plan its family declares (`videodpo.models.cp_plans`, `llmpost.cp_plan`: Qwen3 on zigzag
shards); the output is gathered, every rank computes the same loss, and the parameter
gradients (each rank's share) are summed over the cp group. The reference is the
unmodified model on one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.context_parallel import CPGroups, gather_sequence
from common.cp_plans import apply_context_parallel
from llmpost.cp_plan import CAUSAL_LM_CP_PLAN, shard_causal_lm_inputs
from videodpo.models.cp_plans import COGVIDEOX_CP_PLAN, WAN_CP_PLAN, cp_plan_for

TOL = 1e-5


def _wan(i2v: bool):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    extra = {"image_dim": 16, "added_kv_proj_dim": 16} if i2v else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
        in_channels=8 if i2v else 4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
        num_layers=2, rope_max_seq_len=32, **extra,
    )


def _wan_inputs(i2v: bool, frames: int):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 8 if i2v else 4, frames, 4, 4, generator=g)
    # Wan's I2V processor takes the last 512 context tokens as text, the rest as image
    text = torch.randn(1, 512 if i2v else 6, 16, generator=g)
    kwargs = {"hidden_states": latents, "timestep": torch.tensor([300]), "encoder_hidden_states": text}
    if i2v:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 3, 16, generator=g)
    return kwargs


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=16, num_layers=2, sample_width=4, sample_height=4,
        sample_frames=9, patch_size=2, max_text_seq_length=5,
        use_rotary_positional_embeddings=True,
    )


def _cogvideox_inputs():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(1)
    frames = 3  # 3 x 2 x 2 = 12 video tokens
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (2, 2)), (2, 2), frames)
    return {
        "hidden_states": torch.randn(1, frames, 4, 4, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "timestep": torch.tensor([300]),
        "image_rotary_emb": rope,
    }


def _diffusion_step(model, inputs):
    """Output and parameter gradients of loss = sum(output * fixed weights)."""
    out = model(**inputs, return_dict=False)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config)


def _lm_step(model, input_ids, groups=None):
    """Logits and gradients of the mean next-token loss; with `groups`, on this rank's shard
    (the local sum divided by the global token count: the ranks' losses add up)."""
    labels = input_ids
    if groups is None:
        logits = model(input_ids=input_ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    else:
        shard = shard_causal_lm_inputs(input_ids, groups, labels=labels)
        logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
        count = labels[:, 1:].numel()
        loss = F.cross_entropy(
            logits.flatten(0, 1), shard["shift_labels"].flatten(), reduction="sum"
        ) / count
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _lm_ids(length: int):
    return torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(3))


CASES = [
    ("wan_t2v", "ulysses", 2),
    ("wan_t2v", "ring", 3),  # 3 x 2 x 2 = 12 tokens
    ("wan_t2v_odd", "ring", 3),  # 3 tokens over 2 ranks: padded, the pad masked
    ("wan_i2v", "ulysses", 2),
    ("wan_i2v", "ring", 2),
    ("cogvideox", "ulysses", 0),
    ("cogvideox", "ring", 0),
    ("qwen3", "ulysses", 10),
    ("qwen3", "ring", 9),
]


def _run_case(name, frames, groups=None):
    if name.startswith("wan"):
        i2v = name == "wan_i2v"
        model, inputs = _wan(i2v), _wan_inputs(i2v, frames)
        if name == "wan_t2v_odd":  # 3 frames of 1 x 1 patches: 3 tokens over 2 ranks
            inputs["hidden_states"] = inputs["hidden_states"][..., :2, :2]
        return _diffusion_step(model, inputs) if groups is None else (model, inputs)
    if name == "cogvideox":
        model, inputs = _cogvideox(), _cogvideox_inputs()
        return _diffusion_step(model, inputs) if groups is None else (model, inputs)
    model = _qwen3()
    return _lm_step(model, _lm_ids(frames), groups)


def _cases_worker(rank, world_size, cases):
    world = dist.group.WORLD
    results = []
    for name, mode, frames in cases:
        groups = CPGroups(cp=world, **{mode: world})
        if name == "qwen3":
            model = _qwen3()
            apply_context_parallel(model, groups, CAUSAL_LM_CP_PLAN)
            out, grads = _lm_step(model, _lm_ids(frames), groups)
            out = gather_sequence(out, 1, world, seq_len=frames, layout="zigzag")
        else:
            model, inputs = _run_case(name, frames, groups)
            apply_context_parallel(model, groups, cp_plan_for(model))
            out, grads = _diffusion_step(model, inputs)
        for g in grads.values():
            dist.all_reduce(g)  # each rank holds its tokens' share
        results.append((out, grads))
    return results


@pytest.fixture(scope="module")
def cp_results():
    from tests.multiproc import run_on_ranks

    return run_on_ranks(_cases_worker, 2, CASES)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_cp2_equals_one_process(cp_results, index):
    """fp32; gradient errors are measured against the model's gradient scale, since some
    entries are sums that cancel to round-off (a cross-attention key bias has gradient 0)."""
    name, mode, frames = CASES[index]
    ref_out, ref_grads = _run_case(name, frames)
    scale = max(g.abs().max() for g in ref_grads.values())
    ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
    for rank in range(2):
        out, grads = cp_results[rank][index]
        assert out.shape == ref_out.shape
        assert _rel(out, ref_out) < TOL, f"{name}/{mode} rank {rank}: output"
        assert grads.keys() == ref_grads.keys()
        flat = torch.cat([grads[key].flatten() for key in ref_grads])
        assert (flat - ref_flat).norm() / ref_flat.norm() < TOL, f"{name}/{mode}: gradient"
        for key, ref in ref_grads.items():
            err = (grads[key] - ref).abs().max() / scale
            assert err < TOL, f"{name}/{mode} rank {rank}: grad of {key}: {err:.1e}"


def test_remove_restores_the_model():
    model, inputs = _wan(False), _wan_inputs(False, 2)
    before = model(**inputs, return_dict=False)[0]
    # a size-1 cp group: hooks and processors are in place, then removed
    handle = apply_context_parallel(model, CPGroups(cp=None), WAN_CP_PLAN)
    with_cp = model(**inputs, return_dict=False)[0]
    handle.remove()
    after = model(**inputs, return_dict=False)[0]
    assert torch.allclose(with_cp, before, atol=1e-6)
    assert torch.equal(after, before)
    assert type(model.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_size_one_group_leaves_cogvideox_and_qwen3_unchanged():
    model, inputs = _cogvideox(), _cogvideox_inputs()
    before = model(**inputs, return_dict=False)[0]
    apply_context_parallel(model, CPGroups(cp=None), COGVIDEOX_CP_PLAN)
    assert torch.allclose(model(**inputs, return_dict=False)[0], before, atol=1e-6)
    lm, ids = _qwen3(), _lm_ids(7)
    before = lm(input_ids=ids).logits
    handle = apply_context_parallel(lm, CPGroups(cp=None), CAUSAL_LM_CP_PLAN)
    shard = shard_causal_lm_inputs(ids, CPGroups(cp=None), labels=ids)
    assert torch.equal(shard["shift_labels"][:, :-1], ids[:, 1:])
    after = lm(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
    assert torch.allclose(after, before, atol=1e-5)
    assert lm.config._attn_implementation == "context_parallel"
    handle.remove()
    assert lm.config._attn_implementation != "context_parallel"
    assert not any(hasattr(m, "context_parallel_state") for m in lm.modules())


def test_plans_are_found_through_the_adapters():
    from videodpo.models.cogvideox import CogVideoXAdapter
    from videodpo.models.wan import WanAdapter

    assert cp_plan_for(_wan(False)) is WanAdapter.cp_plan is WAN_CP_PLAN
    assert cp_plan_for(_cogvideox()) is CogVideoXAdapter.cp_plan is COGVIDEOX_CP_PLAN
    with pytest.raises(TypeError, match="no plan for Qwen3ForCausalLM"):
        cp_plan_for(_qwen3())


def test_plan_naming_a_missing_module_is_rejected():
    from common.cp_plans import ContextParallelPlan, GatherOutput

    plan = ContextParallelPlan(hooks={"head_out": (GatherOutput(dim=1),)})
    with pytest.raises(TypeError, match="WanTransformer3DModel has no module 'head_out'"):
        apply_context_parallel(_wan(False), CPGroups(cp=None), plan)
