"""The training loop: export, kill-and-resume, skipped rows, non-finite steps, LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import DataError, UserError
from common.run import warmup_cosine
from tests.killing import killed_after
from videodpo.config import RunConfig
from videodpo.data.loader import PairSampler
from videodpo.data.synthetic import WorldConfig, caption, render_batch, sample_records
from videodpo.models import load_adapter
from videodpo.models.tiny import build_pixel_adapter
from videodpo.trainer import train

WORLD = WorldConfig(height=8, width=8, num_frames=4, shape_size=4, slow_step=1, fast_step=2)


class PairList:
    """In-memory pairs: real clips preferred, shifted copies rejected; `bad` rows fail."""

    def __init__(self, n: int = 6, bad: tuple[int, ...] = (), nan: tuple[int, ...] = ()) -> None:
        records = sample_records(WORLD, n, seed=3)
        clips = render_batch(records)
        self.items = [
            {"chosen": clips[i], "rejected": clips[i].roll(1, dims=-1), "caption": caption(r)}
            for i, r in enumerate(records)
        ]
        for i in nan:
            self.items[i]["rejected"] = torch.full_like(clips[i], float("nan"))
        self.unreadable = set(bad)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        if i in self.unreadable:
            raise DataError(f"row {i + 1}: chosen clip unreadable")
        return self.items[i]


def _cfg(tmp_path, kind: str = "reg_dpo", steps: int = 4, lora: bool = False) -> RunConfig:
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    cfg.loss.kind, cfg.loss.beta = kind, 100.0
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 1
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = steps, 2, 1
    cfg.lora.enabled, cfg.lora.rank = lora, 4
    return cfg


def _adapter():
    return build_pixel_adapter("wan", "t2v", seed=0, height=8, width=8, num_frames=4)


def _assert_trained(params: dict[str, torch.Tensor]) -> None:
    """Training moved the parameters away from `_adapter()`'s start (a no-op optimizer fails)."""
    start = _adapter().transformer.state_dict()
    moved = [n for n in start if not torch.equal(params[n].detach().cpu(), start[n])]
    assert len(moved) > len(start) // 2, f"only {len(moved)} of {len(start)} tensors changed"


def test_full_finetune_exports_a_loadable_model(tmp_path):
    cfg = _cfg(tmp_path)
    adapter = _adapter()
    result = train(cfg, dataset=PairList(), adapter=adapter)
    assert result.steps == 4 and result.skipped_rows == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    loaded = load_adapter(result.export_dir)
    for (name, p), (_, q) in zip(adapter.transformer.named_parameters(), loaded.transformer.named_parameters()):
        assert torch.equal(p, q), name
    _assert_trained(loaded.transformer.state_dict())
    assert (tmp_path / "run" / "config.yaml").is_file()


@pytest.mark.parametrize("lora", [False, True])
def test_kill_and_resume_gives_identical_parameters(tmp_path, lora):
    straight = _cfg(tmp_path / "a", lora=lora, steps=4)
    straight.train.checkpoint_every = 2
    full = _adapter()
    train(straight, dataset=PairList(), adapter=full)

    broken = _cfg(tmp_path / "b", lora=lora, steps=4)
    broken.train.checkpoint_every = 2
    with killed_after(3):  # after step 3; the last checkpoint is step 2
        train(broken, dataset=PairList(), adapter=_adapter())
    torch.manual_seed(123)  # a new process: different global RNG
    resumed = _adapter()
    result = train(broken, resume=True, dataset=PairList(), adapter=resumed)
    assert result.steps == 4
    if lora:  # the LoRA B matrices left zero
        lora_b = [p for n, p in resumed.transformer.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    else:
        _assert_trained(resumed.transformer.state_dict())
    for (name, p), (_, q) in zip(full.transformer.named_parameters(), resumed.transformer.named_parameters()):
        assert torch.equal(p, q), name


def test_resume_without_a_checkpoint_starts_from_zero(tmp_path):
    result = train(_cfg(tmp_path, steps=1), resume=True, dataset=PairList(), adapter=_adapter())
    assert result.steps == 1


def test_unreadable_rows_are_skipped_and_counted(tmp_path):
    cfg = _cfg(tmp_path, steps=3)
    cfg.data.max_bad_row_fraction = 0.5
    result = train(cfg, dataset=PairList(n=6, bad=(2,)), adapter=_adapter())
    assert result.skipped_rows == 1  # 6 pairs in 3 steps of 2: row 2 seen once
    assert result.history[-1]["skipped_rows"] == 1.0
    cfg.data.max_bad_row_fraction = 0.1
    cfg.out_dir = str(tmp_path / "strict")
    with pytest.raises(DataError, match="rows are bad"):
        train(cfg, dataset=PairList(n=6, bad=(0, 1, 2)), adapter=_adapter())


def test_non_finite_steps_are_skipped_counted_and_abort(tmp_path):
    cfg = _cfg(tmp_path, steps=3)
    cfg.train.batch_size = 1
    data = PairList(n=3, nan=(1,))
    adapter = _adapter()
    result = train(cfg, dataset=data, adapter=adapter)
    assert result.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in adapter.transformer.parameters())
    cfg.train.max_nonfinite, cfg.out_dir = 0, str(tmp_path / "abort")
    with pytest.raises(UserError, match="non-finite"):
        train(cfg, dataset=data, adapter=_adapter())


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    a = PairSampler(10, seed=1)
    stream = iter(a)
    first = [next(stream) for _ in range(13)]
    assert sorted(first[:10]) == list(range(10))
    a.advance(13)
    assert a.state_dict() == {"epoch": 1, "position": 3}
    b = PairSampler(10, seed=1)
    b.load_state_dict(a.state_dict())
    assert [next(stream) for _ in range(9)] == _first(b, 9)
    r0, r1 = PairSampler(10, seed=1, rank=0, replicas=2), PairSampler(10, seed=1, rank=1, replicas=2)
    assert sorted(_first(r0, 5) + _first(r1, 5)) == list(range(10))


def _first(sampler, n):
    stream = iter(sampler)
    return [next(stream) for _ in range(n)]


def test_warmup_then_cosine():
    f = warmup_cosine(warmup=2, total=10, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_corrupt_manifest_row_is_skipped_and_counted(tmp_path):
    from videodpo.data.manifest import write_manifest
    from videodpo.data.video_io import write_video

    data = PairList(n=4)
    rows = []
    for i, item in enumerate(data.items):
        chosen, rejected = tmp_path / f"c{i}.mp4", tmp_path / f"r{i}.mp4"
        write_video(chosen, item["chosen"], fps=8)
        write_video(rejected, item["rejected"], fps=8)
        rows.append({"chosen": str(chosen), "rejected": str(rejected), "caption": item["caption"]})
    rows[1]["rejected"] = str(tmp_path / "missing.mp4")
    manifest = write_manifest(tmp_path / "pairs.jsonl", rows)
    with manifest.open("a") as fh:
        fh.write("{not json\n")
    cfg = _cfg(tmp_path, steps=3)
    cfg.data.manifest, cfg.data.max_bad_row_fraction = str(manifest), 0.5
    result = train(cfg, adapter=_adapter())
    assert result.steps == 3
    assert result.skipped_rows == 2  # the missing clip and the broken JSON line
    cfg.data.max_bad_row_fraction, cfg.out_dir = 0.1, str(tmp_path / "strict")
    with pytest.raises(UserError):  # 2 of 5 rows bad is more than 10%: the run stops
        train(cfg, adapter=_adapter())


def _train_layout(rank, world_size, out_dir, layouts):
    """Two steps under each `(pair, cp, cp_mode)` of `layouts`, in one process group:
    losses and unsharded parameters per layout."""
    from common.fsdp import full_state_dict

    out = []
    for i, (pair, cp, cp_mode) in enumerate(layouts):
        cfg = _cfg(Path(out_dir) / str(i), steps=2)
        cfg.optim.eps = 1e-4  # damps AdamW's lr * sign(g) response to float noise in tiny gradients
        cfg.parallel.pair, cfg.parallel.cp, cfg.parallel.cp_mode = pair, cp, cp_mode
        adapter = _adapter()
        result = train(cfg, dataset=PairList(), adapter=adapter)
        out.append(([h["loss"] for h in result.history], full_state_dict(adapter.transformer)))
    return out


@pytest.mark.parametrize(
    "layouts",
    [pytest.param([(2, 1, "ulysses"), (1, 2, "ulysses")], id="pair-and-ulysses"),
     pytest.param([(1, 2, "ring")], id="ring", marks=pytest.mark.slow)],
)
def test_pair_and_cp_training_equal_single_process(tmp_path, layouts):
    """One spawn of two gloo ranks runs every layout of a parametrisation."""
    from tests.multiproc import run_on_ranks

    [(losses, params)] = _train_layout(0, 1, tmp_path / "single", [(1, 1, "ulysses")])
    _assert_trained(params)
    for rank_runs in run_on_ranks(_train_layout, 2, str(tmp_path / "multi"), layouts):
        assert len(rank_runs) == len(layouts)
        for rank_losses, rank_params in rank_runs:
            assert rank_losses == pytest.approx(losses, rel=1e-5)
            for name, p in params.items():
                # Adam divides by sqrt(v): float-order noise in tiny gradients shows up as up
                # to a few 1e-6 in the parameters; 1e-5 is 1% of one step (lr = 1e-3).
                torch.testing.assert_close(rank_params[name], p, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["wan2.1_t2v_1.3b_regdpo", "wan2.1_i2v_14b_regdpo", "cogvideox_5b_regdpo"])
def test_shipped_configs_load(name):
    from common.config import load_config

    cfg = load_config(RunConfig, Path(__file__).parents[2] / "configs" / "video" / f"{name}.yaml")
    assert cfg.loss.kind == "reg_dpo" and cfg.parallel.pair == 2 and cfg.model.path


def _pair_manifest(tmp_path: Path) -> Path:
    """Four `PairList` pairs written as mp4s and a pair manifest beside them."""
    from videodpo.data.manifest import write_manifest
    from videodpo.data.video_io import write_video

    rows = []
    for i, item in enumerate(PairList(n=4).items):
        rows.append({"chosen": str(write_video(tmp_path / f"c{i}.mp4", item["chosen"])),
                     "rejected": str(write_video(tmp_path / f"r{i}.mp4", item["rejected"])),
                     "caption": item["caption"]})
    return write_manifest(tmp_path / "pairs.jsonl", rows)


def test_train_and_sample_commands(tmp_path):
    from videodpo.cli import main

    model_dir = _adapter().save_pretrained(tmp_path / "model")
    manifest = _pair_manifest(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"out_dir: {tmp_path / 'run'}\nmodel: {{path: {model_dir}}}\ndata: {{manifest: {manifest}}}\n"
        "train: {steps: 2, batch_size: 2}\nloss: {kind: dpo, beta: 100.0}\n"
        "sample: {prompts: ['a red circle moving up at fast speed'], num_frames: 4, height: 8, width: 8, num_steps: 3}\n"
    )
    assert main(["train", "--config", str(cfg)]) == 0
    assert main(["sample", "--config", str(cfg)]) == 0
    assert (tmp_path / "run" / "samples" / "sample_000.mp4").is_file()
    assert (tmp_path / "run" / "samples" / "contact_sheet.png").is_file()
    assert main(["train", "--config", str(cfg), "--set", "loss.kind=ppo"]) == 1  # one-line error


def test_validation_every_n_steps_writes_clips_sheet_and_pair_metrics(tmp_path):
    from videodpo.data.manifest import write_manifest
    from videodpo.data.video_io import write_video

    rows = []
    for i, item in enumerate(PairList(n=2).items):
        rows.append({"chosen": str(write_video(tmp_path / f"c{i}.mp4", item["chosen"])),
                     "rejected": str(write_video(tmp_path / f"r{i}.mp4", item["rejected"])),
                     "caption": item["caption"]})
    cfg = _cfg(tmp_path, steps=2)
    cfg.validation.every, cfg.validation.num_steps = 2, 2
    cfg.validation.prompts = ["a red circle moving up at fast speed", "a blue square moving left at slow speed"]
    cfg.validation.num_frames, cfg.validation.height, cfg.validation.width = 4, 8, 8
    cfg.validation.manifest = str(write_manifest(tmp_path / "val.jsonl", rows))
    train(cfg, dataset=PairList(), adapter=_adapter())
    out = tmp_path / "run" / "validation" / "step_0000002"
    assert (out / "clip_000.mp4").is_file() and (out / "clip_001.mp4").is_file()
    assert (out / "contact_sheet.png").is_file()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val/dpo_accuracy" in r]
    # two held-out pairs: the accuracy is the share of them the policy ranks right, k / 2
    assert len(val) == 1 and val[0]["val/dpo_accuracy"] * 2 in (0.0, 1.0, 2.0) and val[0]["val/sft_error"] > 0


def test_training_from_the_latent_cache_equals_training_from_clips(tmp_path):
    from videodpo.config import PrecomputeConfig
    from videodpo.precompute import precompute

    model_dir = _adapter().save_pretrained(tmp_path / "model")
    manifest = _pair_manifest(tmp_path)
    precompute(PrecomputeConfig(manifest=str(manifest), model=str(model_dir), out_dir=str(tmp_path / "cache")))
    finals = []
    for source in ("manifest", "cache"):
        cfg = _cfg(tmp_path / source, steps=2)
        cfg.model.path = str(model_dir)
        if source == "manifest":
            cfg.data.manifest = str(manifest)
        else:
            cfg.data.latent_cache = str(tmp_path / "cache")
        result = train(cfg)
        finals.append((result.history, load_adapter(result.export_dir).transformer))
        _assert_trained(finals[-1][1].state_dict())
    assert [h["loss"] for h in finals[0][0]] == pytest.approx([h["loss"] for h in finals[1][0]], rel=1e-5)
    for (name, p), (_, q) in zip(finals[0][1].named_parameters(), finals[1][1].named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_activation_checkpointing_leaves_the_step_unchanged(tmp_path):
    from videodpo.data.pairs import random_pair_batch
    from videodpo.step import build_training_step

    results = []
    for every in (0, 1):
        cfg = _cfg(tmp_path, steps=2)
        cfg.parallel.activation_checkpointing = every
        adapter = _adapter()
        step_fn, state = build_training_step(cfg, adapter)
        metrics = step_fn(random_pair_batch(adapter, 2, 4, 8, 8, seed=5))
        results.append((metrics["loss"], {n: p.grad.clone() for n, p in state.policy.named_parameters()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, msg=name)


def _accumulate(rank, world_size, out_dir):
    """One optimizer step over 4 micro-batches (pair=2 with FSDP on 2 ranks, else one
    process): loss, reduce-scatters counted at each micro-batch's loss, and parameters."""
    from unittest import mock

    import torch.distributed as dist

    import videodpo.step as step
    from common.fsdp import full_state_dict
    from videodpo.data.pairs import random_pair_batch

    cfg = _cfg(Path(out_dir), steps=2)
    cfg.optim.eps = 1e-4
    cfg.train.grad_accum, cfg.parallel.pair = 4, world_size
    adapter = _adapter()
    start = {k: v.clone() for k, v in adapter.transformer.state_dict().items()}
    step_fn, state = step.build_training_step(cfg, adapter)
    batches = [random_pair_batch(adapter, 1, 4, 8, 8, seed=s) for s in range(4)]
    scatter = mock.patch.object(dist, "reduce_scatter_single", wraps=dist.reduce_scatter_single)
    seen_at_loss: list[int] = []
    real_loss = step.reg_dpo_loss

    def counting_loss(*args, **kwargs):
        seen_at_loss.append(counter.call_count)
        return real_loss(*args, **kwargs)

    with scatter as counter, mock.patch.object(step, "reg_dpo_loss", counting_loss):
        metrics = step_fn(batches)
        total = counter.call_count
    params = full_state_dict(state.policy)
    return metrics["loss"], seen_at_loss, total, params, start


@pytest.mark.slow
def test_grad_accum_with_fsdp_syncs_once_and_equals_one_process(tmp_path):
    from tests.multiproc import run_on_ranks

    loss, _, _, params, start = _accumulate(0, 1, str(tmp_path / "single"))
    assert any(not torch.equal(params[k], start[k]) for k in start)  # the step trained
    for rank_loss, seen, total, rank_params, _ in run_on_ranks(_accumulate, 2, str(tmp_path / "multi")):
        # micro-batches 2-4 start with no reduce-scatter behind them; the last backward ran them
        assert seen == [0, 0, 0, 0] and total > 0
        assert rank_loss == pytest.approx(loss, rel=1e-5)
        for name, p in params.items():
            torch.testing.assert_close(rank_params[name], p, rtol=0, atol=1e-5, msg=name)


def _set_up_both_ways(rank, world_size, model_dir, out_dir):
    """FSDP on 2 ranks, set up from `model.path` (meta device, each rank reads its rows)
    and from an in-memory adapter (today's path), full and LoRA: parameters after set-up,
    after two steps, the losses, and the row ranges this rank read from the files."""
    from unittest import mock

    from common.fsdp import SafetensorsWeights, full_state_dict
    from videodpo.data.pairs import random_pair_batch
    from videodpo.step import build_training_step

    reads: list[tuple[str, int | None, int | None]] = []
    real_rows = SafetensorsWeights.rows

    def recording_rows(self, key, start=None, stop=None):
        reads.append((key, start, stop))
        return real_rows(self, key, start, stop)

    out = {}
    for lora, source in [(False, "meta"), (False, "memory"), (False, "offload"), (True, "meta"), (True, "memory")]:
        cfg = _cfg(Path(out_dir), steps=2, lora=lora)
        cfg.model.path, cfg.optim.eps = model_dir, 1e-4
        cfg.parallel.reference_cpu_offload = source == "offload"
        adapter = None if source != "memory" else load_adapter(model_dir)
        with mock.patch.object(SafetensorsWeights, "rows", recording_rows):
            step_fn, state = build_training_step(cfg, adapter)
        set_up = full_state_dict(state.policy)
        reference = None if state.reference is None else full_state_dict(state.reference)
        losses = [step_fn(random_pair_batch(state.adapter, 2, 4, 8, 8, seed=s))["loss"] for s in (1, 2)]
        out[lora, source] = (set_up, reference, losses, full_state_dict(state.policy))
    return out, reads


@pytest.mark.slow
def test_meta_device_set_up_on_two_ranks_equals_todays_path(tmp_path):
    from tests.multiproc import run_on_ranks

    model_dir = str(_adapter().save_pretrained(tmp_path / "model"))
    results = run_on_ranks(_set_up_both_ways, 2, model_dir, str(tmp_path / "run"))
    weight = "blocks.0.ffn.net.0.proj.weight"  # (64, 32): 32 rows each
    for rank, (out, reads) in enumerate(results):
        # each rank read only the rows it keeps, for the policy and the reference
        assert [(s, e) for k, s, e in reads if k == weight] == [(32 * rank, 32 * rank + 32)] * 5
        assert all(s is not None for k, s, e in reads if k.endswith(".weight"))
        for lora in (False, True):
            meta, memory = out[lora, "meta"], out[lora, "memory"]
            assert meta[0].keys() == memory[0].keys()
            for name in memory[0]:
                torch.testing.assert_close(meta[0][name], memory[0][name], rtol=0, atol=0, msg=name)
                torch.testing.assert_close(meta[3][name], memory[3][name], rtol=0, atol=1e-7, msg=name)
            if not lora:
                for name in memory[1]:
                    torch.testing.assert_close(meta[1][name], memory[1][name], rtol=0, atol=0, msg=name)
            assert meta[2] == pytest.approx(memory[2], rel=1e-6)
            if not lora:  # a CPU-offloaded reference gives the same run
                offload = out[False, "offload"]
                assert offload[2] == pytest.approx(memory[2], rel=1e-6)
                for name in memory[3]:
                    torch.testing.assert_close(offload[3][name], memory[3][name], rtol=0, atol=1e-7, msg=name)
            if lora:  # the two steps trained the adapters
                lora_b = [v for k, v in meta[3].items() if "lora_B" in k]
                assert lora_b and all(v.abs().max() > 0 for v in lora_b)
            else:
                _assert_trained(meta[3])


def test_lora_from_a_model_folder_starts_as_the_in_memory_path(tmp_path):
    """One process, LoRA, `model.path`: the transformer is built on the meta device and
    filled from the files; the run equals training the same model loaded in memory."""
    model_dir = _adapter().save_pretrained(tmp_path / "model")
    runs = []
    for source in ("folder", "memory"):
        cfg = _cfg(tmp_path / source, steps=2, lora=True)
        cfg.model.path = str(model_dir)
        adapter = load_adapter(model_dir) if source == "memory" else None
        result = train(cfg, dataset=PairList(), adapter=adapter)
        runs.append([h["loss"] for h in result.history])
        exported = load_file(result.export_dir / "pytorch_lora_weights.safetensors")
        lora_b = [v for k, v in exported.items() if "lora_B" in k]
        assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # trained: B starts at zero
    assert runs[0] == pytest.approx(runs[1], rel=1e-6) and runs[0][0] != runs[0][1]
