"""Resumable, atomic checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `ROOT/step_000123/` holding the model and optimizer through
DCP (each rank writes its own shards, so FSDP2 states never gather on one rank), and
one small file per rank with the scheduler, the caller's `extra` state (data position,
counters) and every RNG state. It is written under a temporary name and renamed when
complete, so a run killed mid-write leaves nothing that `latest()` would pick. Only the
newest `keep_last` checkpoints are kept.
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{9})$")
COMPLETE_MARKER = "complete.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
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
        torch.save(local, tmp / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": world}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()
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
        """Restore the state in place; return its step, or None if there is none to load."""
        path = self.latest() if which == "latest" else Path(which)
        if path is None:
            return None
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER})")
        state = self._model_optim_state(model, optimizer)
        if state:
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
            elif model is not None:
                set_model_state_dict(model, state["model"])
        local_file = path / f"rank_{_rank():05d}.pt"
        if not local_file.is_file():
            saved = json.loads((path / COMPLETE_MARKER).read_text())["world_size"]
            raise FileNotFoundError(
                f"{path}: no state for rank {_rank()} (saved with {saved} ranks); "
                "resume with the same number of ranks"
            )
        local = torch.load(local_file, weights_only=False)
        if scheduler is not None and local["scheduler"] is not None:
            scheduler.load_state_dict(local["scheduler"])
        if extra is not None:
            extra.clear()
            extra.update(local["extra"])
        set_rng_state(local["rng"])
        logger.info("resumed from %s (step %d)", path, local["step"])
        return int(local["step"])

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
