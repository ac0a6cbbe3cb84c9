"""Kill-and-resume gives the same parameters as an uninterrupted run; partial writes are ignored."""

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.checkpoint import Checkpointer
from common.fsdp import apply_fsdp, full_state_dict
from tests.common import tiny
from tests.multiproc import run_on_ranks


def make_state(seed=0, shard=False):
    model = tiny.tiny_qwen3(seed)
    if shard:
        apply_fsdp(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_steps(model, opt, sched, data_state, steps):
    """Each step draws fresh random tokens from the global RNG: resuming must restore it."""
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 10))
        loss = tiny.qwen_loss(model, ids) + 0.0 * data_state["position"]
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        data_state["position"] += 1


def _run(root, total, kill_after=None, kill_in_save=False):
    torch.manual_seed(123)
    model, opt, sched = make_state()
    ck = Checkpointer(root, keep_last=2)
    data = {"position": 0}
    step = ck.load(model, opt, sched, extra=data) or 0
    while step < total:
        train_steps(model, opt, sched, data, 1)
        step += 1
        if step % 4 == 0:
            if kill_in_save and step == 8:
                # die halfway through writing: the model shards are on disk, the rename is not
                ck._prune = lambda: None
                orig_save = torch.save

                def dying_save(*a, _save=orig_save, **k):
                    _save(*a, **k)
                    os.kill(os.getpid(), signal.SIGKILL)

                torch.save = dying_save
            ck.save(step, model, opt, sched, extra=data)
        if kill_after is not None and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save({"params": full_state_dict(model), "data": data}, os.path.join(root, "final.pt"))


def run_process(root, total, **kw):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_run, args=(str(root), total), kwargs=kw)
    p.start()
    p.join()
    return p.exitcode


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    assert run_process(tmp_path / "a", 8) == 0
    # killed after step 6: the step-4 checkpoint is the latest; resume trains 4 more
    assert run_process(tmp_path / "b", 8, kill_after=6) == -signal.SIGKILL
    assert Checkpointer(tmp_path / "b").latest().name == "step_000000004"
    assert run_process(tmp_path / "b", 8) == 0
    a = torch.load(tmp_path / "a" / "final.pt")
    b = torch.load(tmp_path / "b" / "final.pt")
    assert a["data"] == b["data"] == {"position": 8}
    for name, tensor in a["params"].items():
        assert torch.equal(tensor, b["params"][name]), name
    fresh = make_state()[0].state_dict()
    assert not torch.equal(a["params"]["lm_head.weight"], fresh["lm_head.weight"])


def test_checkpoint_cut_off_mid_write_is_never_latest(tmp_path):
    assert run_process(tmp_path, 12, kill_in_save=True) == -signal.SIGKILL
    ck = Checkpointer(tmp_path)
    assert (tmp_path / ".tmp_step_000000008").is_dir()
    assert ck.latest().name == "step_000000004"
    # a step folder without its completion marker is ignored too
    (tmp_path / "step_000000099").mkdir()
    assert ck.latest().name == "step_000000004"
    # resuming from it continues and finishes
    assert run_process(tmp_path, 12) == 0
    assert ck.latest().name == "step_000000012"
    assert len(ck.step_dirs()) == 2  # keep_last


def _fsdp_ckpt_worker(rank, world, root):
    torch.manual_seed(0)
    model, opt, sched = make_state(shard=True)
    data = {"position": 0}
    train_steps(model, opt, sched, data, 2)
    ck = Checkpointer(root)
    ck.save(2, model, opt, sched, extra={"position": rank})
    before = full_state_dict(model)
    rng = torch.get_rng_state()
    train_steps(model, opt, sched, data, 1)
    after_continued = full_state_dict(model)

    model2, opt2, sched2 = make_state(seed=5, shard=True)
    extra = {}
    assert ck.load(model2, opt2, sched2, extra=extra) == 2
    restored = full_state_dict(model2)
    assert torch.equal(torch.get_rng_state(), rng)
    train_steps(model2, opt2, sched2, extra, 1)
    return before, restored, after_continued, full_state_dict(model2), extra


def test_fsdp_sharded_save_load_two_ranks(tmp_path):
    results = run_on_ranks(_fsdp_ckpt_worker, 2, str(tmp_path))
    for rank, (before, restored, continued, resumed, extra) in enumerate(results):
        assert extra["position"] == rank + 1
        for name in before:
            assert torch.equal(before[name], restored[name]), name
            assert torch.equal(continued[name], resumed[name]), name


def _corrupt(step_dir):
    """Overwrite the middle of every DCP data file: still 'complete', no longer loadable."""
    for f in (step_dir / "dcp").glob("*.distcp"):
        data = bytearray(f.read_bytes())
        data[len(data) // 4: len(data) // 2] = b"\x00" * (len(data) // 2 - len(data) // 4)
        f.write_bytes(bytes(data[: len(data) // 2]))


def test_resume_falls_back_from_a_corrupt_latest_checkpoint(tmp_path, caplog):
    _run(str(tmp_path / "a"), 12)
    _run(str(tmp_path / "b"), 8)  # checkpoints at 4 and 8
    _corrupt(tmp_path / "b" / "step_000000008")
    with caplog.at_level("WARNING", logger="common.checkpoint"):
        _run(str(tmp_path / "b"), 12)  # step 8 fails, step 4 loads, 8 steps follow
    assert "step_000000008 failed to load" in caplog.text
    assert "previous complete checkpoint" in caplog.text and "step_000000004" in caplog.text
    a = torch.load(tmp_path / "a" / "final.pt")
    b = torch.load(tmp_path / "b" / "final.pt")
    assert a["data"] == b["data"] == {"position": 12}
    for name, tensor in a["params"].items():
        assert torch.equal(tensor, b["params"][name]), name


def test_resume_from_a_different_model_size_is_one_error_naming_each_checkpoint(tmp_path):
    from common.checkpoint import CheckpointError

    model, opt, sched = make_state()
    ck = Checkpointer(tmp_path)
    ck.save(1, model, opt, sched)
    ck.save(2, model, opt, sched)
    bigger = tiny.tiny_qwen3(0, vocab=96)
    with pytest.raises(CheckpointError) as err:
        ck.load(bigger, torch.optim.AdamW(bigger.parameters()))
    message = str(err.value)
    assert "\n" not in message
    assert "step_000000002" in message and "step_000000001" in message
    assert "size" in message.lower()


def test_resume_trims_metrics_logged_after_the_checkpoint(tmp_path):
    import json

    from common.checkpoint import trim_metrics_log

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)] + ['{"step": 7, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert trim_metrics_log(tmp_path, 4) == 3
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3, 4]


def _fallback_worker(rank, world, root):
    from pathlib import Path

    torch.manual_seed(0)
    model, opt, sched = make_state(shard=True)
    data = {"position": 0}
    ck = Checkpointer(root)
    train_steps(model, opt, sched, data, 1)
    ck.save(1, model, opt, sched, extra=dict(data))
    at_step_1 = full_state_dict(model)
    train_steps(model, opt, sched, data, 1)
    ck.save(2, model, opt, sched, extra=dict(data))
    if rank == 1:  # only rank 1 cannot read its state of step 2
        (Path(root) / "step_000000002" / "rank_00001.pt").write_bytes(b"cut")
    dist.barrier()
    model2, opt2, sched2 = make_state(seed=5, shard=True)
    extra = {}
    step = ck.load(model2, opt2, sched2, extra=extra)
    restored = full_state_dict(model2)
    return step, extra, all(torch.equal(at_step_1[k], restored[k]) for k in at_step_1)


@pytest.mark.slow
def test_resume_falls_back_on_every_rank_when_one_rank_cannot_read_its_state(tmp_path):
    results = run_on_ranks(_fallback_worker, 2, str(tmp_path))
    assert results == [(1, {"position": 1}, True), (1, {"position": 1}, True)]
