"""The training-run scaffold both tracks use: seeds, optimizer and schedule, resume, and
what happens after each step.

A track builds its model and step function, then a `TrainingRun` with the state a
checkpoint must hold (model, optimizer, LR schedule, and any `Stateful`: the data
position, a generator, counters), registered once. Its loop reads like torchtitan's:

    run = TrainingRun(out_dir, steps, model=..., optimizer=..., scheduler=..., stateful={...})
    if resume:
        run.resume()
    while run.step < steps:
        metrics = step_fn(next_batch())
        run.end_step(metrics, validate)   # validate, log, checkpoint, progress bar: as scheduled
    run.finish()
    return run.result()                   # RunResult: the steps and their metrics

`end_step` decides with `should_validate` / `should_log` / `should_checkpoint`; the last
step always logs and checkpoints. Results come back one way, in both tracks: a
`RunResult` whose `history` holds every step's metrics (validation's under `val/`).
A kill at any point resumes to the same result: every registered state is
restored from the newest complete checkpoint and the metrics lines after it are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from common.checkpoint import Checkpointer, trim_metrics_log
from common.metrics import MetricsLogger, progress

# Seeds of data ranks are `seed + RANK_SEED_STRIDE * dp_rank`: a prime, so no two ranks of
# runs whose seeds differ by less than it share a stream.
RANK_SEED_STRIDE = 7919


def seed_for_rank(seed: int, dp_rank: int) -> int:
    """The seed of data rank `dp_rank`: its pair and cp ranks use the same one, so they
    draw the same timesteps, noise and samples."""
    return seed + RANK_SEED_STRIDE * dp_rank


def build_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over `warmup` steps, cosine to `min_ratio` at `total`.

    Kept instead of `transformers.get_cosine_with_min_lr_schedule_with_warmup`, which is
    the same after warmup but starts at 0 (step / warmup): its first optimizer step is
    spent at lr 0 (`tests/common/test_run.py` shows the difference)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress_ = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                       min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, min_ratio))


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GeneratorState:
    """A `torch.Generator` as a `Stateful` (its state goes into the checkpoint)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


class Attributes:
    """Named attributes of an object (counters such as skipped steps) as a `Stateful`."""

    def __init__(self, obj: Any, *names: str) -> None:
        self.obj, self.names = obj, names

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self.obj, name) for name in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.names:
            setattr(self.obj, name, state[name])


@dataclass
class RunResult:
    """What a training run hands back. `history` holds `{"step": s, **metrics}` for every
    step this process ran (after a resume: the steps since the checkpoint); validation
    metrics sit in their step's entry under `val/`."""

    run_dir: Path
    steps: int
    history: list[dict]


class TrainingRun:
    """Checkpoints, metrics and progress of one run under `run_dir` (see the module docstring).

    `step` counts finished optimizer steps. `is_main` says whether this rank writes the
    metrics log; every rank takes part in checkpoints (they are collective)."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any = None,
        stateful: dict[str, Stateful] | None = None,
        log_every: int = 1,
        checkpoint_every: int = 0,
        validate_every: int = 0,
        keep_checkpoints: int = 3,
        is_main: bool = True,
        desc: str = "train",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.stateful = dict(stateful or {})
        self.log_every, self.checkpoint_every, self.validate_every = log_every, checkpoint_every, validate_every
        self.is_main = is_main
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep_last=keep_checkpoints)
        self._metrics_log: MetricsLogger | None = None  # opened after a resume has trimmed the file
        self.step = 0
        self.history: list[dict] = []
        self.bar = progress(total=total_steps, desc=desc)

    def resume(self) -> int:
        """Restore every registered state from the newest complete checkpoint; the step it
        was taken at (0 when there is none). Metrics logged after it are dropped."""
        extra: dict[str, Any] = {}
        step = self.checkpointer.load(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      extra=extra)
        self.step = step or 0
        if step is not None:
            for name, obj in self.stateful.items():
                obj.load_state_dict(extra[name])
        if self._metrics_log is not None:
            self._metrics_log.close()
            self._metrics_log = None
        if self.is_main:
            trim_metrics_log(self.run_dir, self.step)
        self.bar.update(self.step - self.bar.n)
        return self.step

    @property
    def metrics_log(self) -> MetricsLogger:
        if self._metrics_log is None:
            self._metrics_log = MetricsLogger(self.run_dir, enabled=self.is_main)
        return self._metrics_log

    def should_log(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return step % self.log_every == 0 or step == self.total_steps

    def should_validate(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return bool(self.validate_every) and step % self.validate_every == 0

    def should_checkpoint(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        every = self.checkpoint_every
        return bool(every and step % every == 0) or step == self.total_steps

    def log(self, metrics: dict[str, float]) -> None:
        self.metrics_log.log(self.step, metrics)

    def end_step(self, metrics: dict[str, float],
                 validate: Callable[[], dict[str, float]] | None = None) -> None:
        """After one optimizer step: count it; validate (`validate()`, its metrics added
        under `val/`), log and checkpoint as scheduled; record it in `history`; move the bar."""
        self.step += 1
        metrics = dict(metrics)
        validated = validate is not None and self.should_validate()
        if validated:
            metrics.update({f"val/{k}": v for k, v in validate().items()})
        self.history.append({"step": self.step, **metrics})
        if self.should_log() or validated:
            self.log(metrics)
        if self.should_checkpoint():
            self.save()
        self.bar.update(1)

    def save(self) -> Path:
        extra = {name: obj.state_dict() for name, obj in self.stateful.items()}
        return self.checkpointer.save(self.step, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, extra=extra)

    def result(self) -> RunResult:
        return RunResult(self.run_dir, self.step, self.history)

    def finish(self) -> None:
        """Close the bar and the metrics log (every rank; safe to call twice)."""
        self.bar.close()
        if self._metrics_log is not None:
            self._metrics_log.close()
