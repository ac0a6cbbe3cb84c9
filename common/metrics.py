"""Training telemetry: metrics.jsonl + tensorboard, progress bars, peak memory.

Only rank 0 writes logs and draws progress bars; every rank can measure its own peak
memory. On CUDA the peak is `max_memory_allocated`; on the CPU it is the process's
high-water mark (VmHWM), reset before the step by trimming malloc's free lists and
writing 5 to /proc/self/clear_refs (the method measured in shared/ENVIRONMENT.md;
set MALLOC_MMAP_THRESHOLD_=65536 in the environment for repeatable numbers).
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from common.distributed import is_main_process


class MetricsLogger:
    """Append `{"step": s, ...}` lines to RUN/metrics.jsonl and scalars to tensorboard."""

    def __init__(self, run_dir: str | Path, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = is_main_process() if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but logging must not kill a run
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory() -> None:
    """Start a new peak-memory window for this process."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def current_memory_mb() -> float:
    """Memory in use now: CUDA allocated, or the process's resident set (VmRSS)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return _proc_status_kb("VmRSS") / 1024


def peak_memory_mb() -> float:
    """Peak since `reset_peak_memory`: CUDA max allocated, or VmHWM on the CPU (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status_kb("VmHWM") / 1024


def _proc_status_kb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def progress(iterable=None, total: int | None = None, desc: str = "", **kwargs) -> tqdm:
    """A tqdm bar drawn on rank 0 only."""
    return tqdm(iterable, total=total, desc=desc, disable=not is_main_process(), dynamic_ncols=True, **kwargs)
