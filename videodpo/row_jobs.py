"""What the two manifest jobs (`build-pairs`, `precompute`) share: each rank works its
share of the rows, a row that fails is logged, counted and skipped (it never stops the
job), and at the end the counts are summed over ranks while rank 0 merges the ranks'
outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.distributed import all_reduce_values, barrier, is_main_process, rank_and_world
from common.errors import ConfigError, DataError
from common.metrics import progress
from videodpo.data.manifest import ManifestRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowCounts:
    """A job's rows over all ranks: done now, skipped (done by an earlier run), failed."""

    done: int = 0
    skipped: int = 0
    failed: int = 0

    def report(self, job: str, verb: str, where: str) -> int:
        """Print the one summary line (main process) and return the exit code: 1 when a
        row failed."""
        if is_main_process():
            print(f"{job}: {self.done} rows {verb}, {self.skipped} skipped (done before), "
                  f"{self.failed} failed; {where}")
        return 1 if self.failed else 0


def check_job_config(cfg: Any, job: str) -> None:
    """What both jobs' configs need before anything loads: a manifest and a model, and
    `height` with `width` (both or neither)."""
    if not cfg.manifest or not cfg.model:
        raise ConfigError(f"{job} needs config keys 'manifest' and 'model'")
    if (cfg.height is None) != (cfg.width is None):
        raise ConfigError("config keys 'height' and 'width' go together: set both or neither")


def work_rows(rows: Sequence[ManifestRow], work: Callable[[ManifestRow], None], manifest: Path,
              desc: str) -> tuple[int, int]:
    """`work(row)` for each row; a row whose data is bad (DataError) or that the model
    refuses (ValueError, RuntimeError) is logged with the manifest and row number and
    skipped. Returns (rows done, rows failed)."""
    done = failed = 0
    for row in progress(rows, desc=desc):
        try:
            work(row)
        except (DataError, ValueError, RuntimeError) as err:
            failed += 1
            logger.warning("%s: row %d failed: %s", manifest, row.index, err)
            continue
        done += 1
    return done, failed


def finish_rows(counts: RowCounts, merge: Callable[[], object]) -> RowCounts:
    """`counts` summed over all ranks, after rank 0 has run `merge()` (the others wait)."""
    rank, _ = rank_and_world()
    totals = all_reduce_values(torch.tensor([counts.done, counts.skipped, counts.failed]))
    barrier()
    if rank == 0:
        merge()
    barrier()
    return RowCounts(*(int(c) for c in totals))
