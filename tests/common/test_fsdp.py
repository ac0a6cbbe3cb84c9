"""FSDP2 on 2 gloo processes equals one process; activation checkpointing saves memory."""

import pytest
import torch

from common.fsdp import (
    apply_activation_checkpointing,
    apply_fsdp,
    find_blocks,
    full_grads,
    full_state_dict,
    to_dtype,
)
from tests.common import tiny
from tests.multiproc import run_on_ranks

MODELS = {
    "wan": (tiny.tiny_wan, lambda b: tiny.wan_batch(b), tiny.wan_loss),
    "qwen3": (tiny.tiny_qwen3, lambda b: (tiny.qwen_batch(b),), tiny.qwen_loss),
}
BATCH = 4
STEPS = 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def train(kind: str, rank: int, world: int, ac_every: int = 0):
    """Two AdamW steps; each rank takes its contiguous share of the batch."""
    build, make_batch, loss_fn = MODELS[kind]
    model = build()
    if world > 1 or ac_every:
        apply_fsdp(model, ac_every=ac_every)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    per_rank = BATCH // world
    losses, grads = [], []
    for step in range(STEPS):
        batch = [x[rank * per_rank:(rank + 1) * per_rank] for x in make_batch(BATCH + step)]
        loss = loss_fn(model, *batch)
        loss.backward()
        full_loss = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(full_loss)
            full_loss /= world
        losses.append(full_loss.item())
        grads.append(full_grads(model))
        opt.step()
        opt.zero_grad()
    return losses, grads, full_state_dict(model)


def _fsdp_worker(rank, world, kinds):
    return {kind: train(kind, rank, world) for kind in kinds}


@pytest.fixture(scope="module")
def two_rank_runs():
    """Both models on two ranks in one spawn (starting the processes is the slow part)."""
    return run_on_ranks(_fsdp_worker, 2, ("wan", "qwen3"))


@pytest.mark.parametrize("kind", ["wan", "qwen3"])
def test_fsdp_two_ranks_equals_one_process(kind, two_rank_runs):
    ref_losses, ref_grads, ref_params = train(kind, 0, 1)
    results = [runs[kind] for runs in two_rank_runs]
    for losses, grads, params in results:
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b)
        for step_grads, step_ref in zip(grads, ref_grads):
            assert step_grads.keys() == step_ref.keys()
            for name in step_ref:
                assert rel_err(step_grads[name], step_ref[name]) < 1e-5, name
        for name in ref_params:
            assert rel_err(params[name], ref_params[name]) < 1e-5, name
        # the run really trained: parameters moved
    start = MODELS[kind][0]().state_dict()
    assert any(rel_err(ref_params[n], start[n]) > 1e-4 for n in start)


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return loss, total


@pytest.mark.parametrize("kind", ["wan", "qwen3"])
def test_activation_checkpointing_same_grads_fewer_saved_bytes(kind):
    build, make_batch, loss_fn = MODELS[kind]
    batch = make_batch(BATCH)
    plain = build()
    loss_plain, bytes_plain = saved_bytes(lambda: loss_fn(plain, *batch))
    loss_plain.backward()

    ckpt = build()
    assert apply_activation_checkpointing(ckpt, every=1) == 2
    loss_ckpt, bytes_ckpt = saved_bytes(lambda: loss_fn(ckpt, *batch))
    loss_ckpt.backward()

    assert torch.equal(loss_plain, loss_ckpt)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    assert set(plain.state_dict()) == set(ckpt.state_dict())
    assert bytes_ckpt < 0.7 * bytes_plain, (bytes_ckpt, bytes_plain)


def _bf16_worker(rank, world):
    model = tiny.tiny_wan()
    apply_fsdp(model, param_dtype="bfloat16", reduce_dtype="float32")
    x, t, text, target = tiny.wan_batch(2)
    loss = tiny.wan_loss(model, x, t, text, target)
    loss.backward()
    grads = full_grads(model)
    return loss.item(), {g.dtype for g in grads.values()}, {p.dtype for p in model.parameters()}


def test_fsdp_bf16_params_fp32_reduce():
    ref = tiny.wan_loss(tiny.tiny_wan(), *tiny.wan_batch(2)).item()
    for loss, grad_dtypes, param_dtypes in run_on_ranks(_bf16_worker, 2):
        assert grad_dtypes == {torch.float32} and param_dtypes == {torch.float32}
        assert loss != ref and abs(loss - ref) < 0.05 * abs(ref)  # computed in bf16, close


def test_activation_checkpointing_with_padding_mask_on_a_causal_lm():
    ids = tiny.qwen_batch(2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    plain, ckpt = tiny.tiny_qwen3(), tiny.tiny_qwen3()
    apply_activation_checkpointing(ckpt)
    for model in (plain, ckpt):
        model(input_ids=ids, attention_mask=mask).logits[mask.bool()].sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def _load_sharded(rank, world, folder):
    """Meta-device skeleton, FSDP2 over the ranks, then this rank's rows from the files."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from common.fsdp import SafetensorsWeights, load_weights, materialize

    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    apply_fsdp(model)
    materialize(model, "cpu")
    weights = SafetensorsWeights(folder)
    missing = load_weights(model, weights)
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    loss = tiny.wan_loss(model, *tiny.wan_batch(2)).item()
    return missing, full_state_dict(model), local_bytes, loss, len({e[0] for e in weights.entries.values()})


@pytest.mark.slow  # two spawned processes importing diffusers
def test_meta_skeleton_filled_from_sharded_safetensors_on_two_ranks(tmp_path):
    """A model saved as several safetensors shards (with an index) loads into an FSDP2
    skeleton: every rank keeps about half the bytes, and the result equals the model."""
    source = tiny.tiny_wan()
    source.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    expect = source.state_dict()
    expect_loss = tiny.wan_loss(source, *tiny.wan_batch(2)).item()
    total = sum(p.numel() * p.element_size() for p in source.parameters())
    for missing, params, local_bytes, loss, files in run_on_ranks(_load_sharded, 2, str(tmp_path / "model")):
        assert missing == [] and files > 1
        assert local_bytes < 0.6 * total  # scale_shift_table (1, 2, 16) leaves rank 1 no rows
        assert abs(loss - expect_loss) <= 1e-5 * abs(expect_loss)
        for name, value in expect.items():
            assert torch.equal(params[name], value), name


def test_safetensors_rows_equal_the_saved_slices(tmp_path):
    from safetensors.torch import save_file

    from common.fsdp import SafetensorsWeights

    tensors = {"w": torch.randn(5, 3, 2).bfloat16(), "s": torch.tensor(2.5), "i": torch.arange(7),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = SafetensorsWeights(tmp_path)
    assert torch.equal(weights.rows("w", 1, 4), tensors["w"][1:4]) and weights.rows("w", 1, 4).dtype == torch.bfloat16
    assert torch.equal(weights.rows("w"), tensors["w"]) and torch.equal(weights.rows("i", 5, 7), tensors["i"][5:])
    assert torch.equal(weights.rows("s", 0, 1), tensors["s"]) and weights.rows("empty").shape == (0, 4)
    assert "missing" not in weights


def test_to_dtype_reads_long_and_short_names():
    """The one dtype parser: `bf16` works (torch has no attribute of that name)."""
    assert to_dtype("bf16") is to_dtype("bfloat16") is torch.bfloat16
    assert to_dtype("fp16") is torch.float16 and to_dtype("float32") is torch.float32
    assert to_dtype(None) is None and to_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'half8'"):
        to_dtype("half8")


def test_blocks_are_the_declared_no_split_modules():
    qwen, wan = tiny.tiny_qwen3(), tiny.tiny_wan()
    assert find_blocks(qwen) == list(qwen.model.layers)
    assert find_blocks(wan) == list(wan.blocks)

    class Undeclared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    with pytest.raises(ValueError, match="Undeclared declares no `_no_split_modules`"):
        find_blocks(Undeclared())
    assert len(find_blocks(Undeclared(), block_types=(torch.nn.Linear,))) == 3
