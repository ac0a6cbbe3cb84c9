"""Resumable, atomic checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `ROOT/step_000123/` holding the model and optimizer through
DCP (each rank writes its own shards, so FSDP2 states never gather on one rank), and
one small file per rank with the scheduler, the caller's `extra` state (data position,
counters) and every RNG state. It is written under a temporary name and renamed when
complete, so a run killed mid-write leaves nothing that `latest()` would pick. Only the
newest `keep_last` checkpoints are kept.

Resuming never goes wrong quietly: a complete checkpoint that fails to load (corrupt
files, a different model size) is reported by path and the previous complete one is
tried, which is said too; when none loads, `CheckpointError` lists why each failed.
`trim_metrics_log` drops the log lines a resumed run will write again.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from common.distributed import any_rank, barrier, rank, world_size
from common.errors import UserError
from common.io import replace_path, write_text_atomic

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{9})$")
COMPLETE_MARKER = "complete.json"


class CheckpointError(UserError):
    """No checkpoint of a run could be loaded; the message names each path and why."""


def _short(err: BaseException) -> str:
    """An exception as one line (DCP's CheckpointException carries per-rank tracebacks:
    keep the last `SomeError: message` line of them)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    text = causes[-1] if causes else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text[:300]}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save and restore training state under `root`; see the module docstring."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def step_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def save(
        self,
        step: int,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the state at `step` (a collective: every rank calls it)."""
        final = self.root / f"step_{step:09d}"
        tmp = self.root / f".tmp_step_{step:09d}"
        if rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        start = time.perf_counter()
        state = self._model_optim_state(model, optimizer)
        if state:
            dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        local = {
            "step": step,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra or {},
            "rng": rng_state(),
        }
        torch.save(local, tmp / f"rank_{rank():05d}.pt")
        barrier()
        if rank() == 0:
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": world_size()}))
            replace_path(tmp, final)
            self._prune()
        barrier()
        logger.info("checkpoint saved: %s (%.2fs)", final, time.perf_counter() - start)
        return final

    def load(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
        which: str | Path = "latest",
    ) -> int | None:
        """Restore the state in place; return its step, or None if there is none to load.

        With `which="latest"`, a checkpoint that fails to load on any rank is reported and
        the previous complete one is tried (all ranks move on together)."""
        if which != "latest":
            path = Path(which)
            if not (path / COMPLETE_MARKER).is_file():
                raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER})")
            candidates = [path]
        else:
            candidates = self.step_dirs()[::-1]
        if not candidates:
            return None
        reasons = []
        for i, path in enumerate(candidates):
            error = None
            try:  # rank-local state first, so a rank that cannot read it never enters DCP alone
                local = self._read_local(path)
            except Exception as err:  # noqa: BLE001 - any failure: report it, try the previous one
                error = _short(err)
            if not any_rank(error is not None):
                try:
                    self._restore(path, local, model, optimizer, scheduler, extra)
                except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP raises on all ranks
                    error = _short(err)
                if not any_rank(error is not None):
                    if reasons:
                        logger.warning("resumed from the previous complete checkpoint %s", path)
                    logger.info("resumed from %s (step %d)", path, local["step"])
                    return int(local["step"])
            reasons.append(f"{path}: {error or 'failed on another rank'}")
            nxt = f"; trying the previous one, {candidates[i + 1]}" if i + 1 < len(candidates) else ""
            logger.warning("checkpoint %s failed to load (%s)%s", path, error or "on another rank", nxt)
        raise CheckpointError("no checkpoint could be loaded: " + " | ".join(reasons))

    def _read_local(self, path: Path) -> dict[str, Any]:
        local_file = path / f"rank_{rank():05d}.pt"
        if not local_file.is_file():
            saved = json.loads((path / COMPLETE_MARKER).read_text())["world_size"]
            raise CheckpointError(
                f"{path}: no state for rank {rank()} (saved with {saved} ranks); "
                "resume with the same number of ranks"
            )
        return torch.load(local_file, weights_only=False)

    def _restore(self, path: Path, local: dict[str, Any], model, optimizer, scheduler, extra) -> None:
        state = self._model_optim_state(model, optimizer)
        if state:
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
            elif model is not None:
                set_model_state_dict(model, state["model"])
        if scheduler is not None and local["scheduler"] is not None:
            scheduler.load_state_dict(local["scheduler"])
        if extra is not None:
            extra.clear()
            extra.update(local["extra"])
        set_rng_state(local["rng"])

    @staticmethod
    def _model_optim_state(model, optimizer) -> dict[str, Any]:
        if model is None:
            return {}
        options = StateDictOptions(full_state_dict=False)
        if optimizer is None:
            return {"model": get_model_state_dict(model, options=options)}
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        return {"model": model_sd, "optimizer": optim_sd}

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.step_dirs()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def trim_metrics_log(run_dir: str | Path, step: int, name: str = "metrics.jsonl") -> int:
    """Drop the lines of `run_dir/name` logged after `step` (a resumed run logs them again);
    returns how many went. Rank 0 only; the file is replaced atomically."""
    path = Path(run_dir) / name
    if rank() != 0 or not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            logged = step + 1  # a line cut by the kill
        if isinstance(logged, (int, float)) and logged > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped
