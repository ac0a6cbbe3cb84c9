"""The training-run scaffold: schedule, seeds, decisions, and a kill-and-resume that
restores every registered state."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from common.run import (
    Attributes,
    GeneratorState,
    TrainingRun,
    build_lr_scheduler,
    build_optimizer,
    seed_for_rank,
    warmup_cosine,
)
from tests.killing import killed_after


def test_warmup_then_cosine():
    f = warmup_cosine(warmup=2, total=10, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_the_library_schedule_differs_only_by_spending_the_first_step_at_lr_zero():
    """Why `warmup_cosine` is kept: transformers' schedule is the same after warmup, but
    its warmup is step / warmup, so the first optimizer step runs at lr 0."""
    ours = build_lr_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 3, 12, 0.1)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    library = get_cosine_with_min_lr_schedule_with_warmup(opt, 3, 12, min_lr_rate=0.1)
    lrs = []
    for _ in range(12):
        lrs.append((ours.get_last_lr()[0], library.get_last_lr()[0]))
        ours.step()
        library.step()
    assert lrs[0] == (pytest.approx(1 / 3), 0.0)
    for step in range(3, 12):
        assert lrs[step][0] == pytest.approx(lrs[step][1]), step


def test_seeds_differ_per_data_rank_only():
    assert seed_for_rank(5, 0) == 5
    assert len({seed_for_rank(5, r) for r in range(8)}) == 8


def test_decisions_follow_the_schedule_and_always_end_with_a_checkpoint(tmp_path):
    run = TrainingRun(tmp_path, 7, model=None, optimizer=None, log_every=3, checkpoint_every=2, validate_every=4)
    assert [s for s in range(1, 8) if run.should_log(s)] == [3, 6, 7]
    assert [s for s in range(1, 8) if run.should_checkpoint(s)] == [2, 4, 6, 7]
    assert [s for s in range(1, 8) if run.should_validate(s)] == [4]
    run.finish()


class _Counter:
    def __init__(self) -> None:
        self.seen = 0


def _train(run_dir, steps: int, resume: bool = False) -> tuple[torch.nn.Module, list[float], _Counter]:
    """A tiny regression whose batches come from a generator registered with the run."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(optimizer, 1, steps, 0.0)
    gen, counter = torch.Generator().manual_seed(1), _Counter()
    run = TrainingRun(run_dir, steps, model=model, optimizer=optimizer, scheduler=scheduler, checkpoint_every=2,
                      stateful={"data": GeneratorState(gen), "counter": Attributes(counter, "seen")})
    if resume:
        run.resume()
    losses = []
    try:
        while run.step < steps:
            x = torch.randn(4, 3, generator=gen)
            loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            counter.seen += 4
            losses.append(loss.item())
            run.end_step({"loss": loss.item()})
    finally:
        run.finish()
    return model, losses, counter


def test_kill_and_resume_restores_every_registered_state(tmp_path):
    straight, losses, counter = _train(tmp_path / "a", 5)
    with killed_after(3):  # the newest checkpoint is step 2
        _train(tmp_path / "b", 5)
    torch.manual_seed(99)  # a new process: other global RNG
    resumed, tail, resumed_counter = _train(tmp_path / "b", 5, resume=True)
    assert tail == losses[2:]  # steps 3 to 5 again, on the same batches
    assert resumed_counter.seen == counter.seen == 20
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(straight.weight, torch.nn.Linear(3, 1).weight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3's line from before the kill is not doubled


def test_history_holds_every_step_and_validation_joins_its_step(tmp_path):
    run = TrainingRun(tmp_path, 5, model=None, optimizer=None, log_every=2, validate_every=3)
    calls = []

    def validate() -> dict[str, float]:
        calls.append(run.step)
        return {"score": 10.0 * run.step}

    for step in range(5):
        run.end_step({"loss": float(step)}, validate)
    run.finish()
    result = run.result()
    assert calls == [3] and result.steps == 5
    assert result.history == [{"step": 1, "loss": 0.0}, {"step": 2, "loss": 1.0},
                              {"step": 3, "loss": 2.0, "val/score": 30.0},
                              {"step": 4, "loss": 3.0}, {"step": 5, "loss": 4.0}]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 3, 4, 5]  # step 3 is logged for its validation
    assert logged[1]["val/score"] == 30.0


def test_a_resumed_run_returns_the_steps_it_ran(tmp_path):
    with killed_after(3):
        _train(tmp_path, 5)
    model = torch.nn.Linear(3, 1)
    run = TrainingRun(tmp_path, 5, model=model, optimizer=build_optimizer(model.parameters(), lr=0.1),
                      checkpoint_every=2, stateful={"data": GeneratorState(torch.Generator()),
                                                    "counter": Attributes(_Counter(), "seen")})
    assert run.resume() == 2
    run.end_step({"loss": 1.0})
    run.finish()
    assert [h["step"] for h in run.result().history] == [3]
