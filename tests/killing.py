"""Stop a training run after a given step, as a kill would: the test-only hook.

`killed_after(3)` makes `common.run.TrainingRun.end_step` raise `Killed` once step 3 has
ended (its log line and any scheduled checkpoint written), so a test can resume from
what a killed process leaves on disk. Production code has no such hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from common.run import TrainingRun


class Killed(BaseException):  # noqa: N818 - a BaseException, like KeyboardInterrupt: no handler catches it
    """Raised by `killed_after` in place of a kill."""


@contextlib.contextmanager
def killed_after(step: int) -> Iterator[None]:
    real = TrainingRun.end_step

    def end_step(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.step >= step:
            raise Killed(f"killed after step {self.step}")

    with mock.patch.object(TrainingRun, "end_step", end_step):
        try:
            yield
        except Killed:
            return
    raise AssertionError(f"the run ended before step {step}: nothing was killed")
