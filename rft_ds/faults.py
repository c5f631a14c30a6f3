"""Stopping on request, and dying on request.

StopSignals: SIGTERM and SIGUSR1 (what Slurm sends ahead of a time limit or preemption) only set a flag;
the recipe checkpoints at the next epoch boundary and exits cleanly, so a signal never tears a write.

maybe_corrupt: fault injection for the stale-weight check. With RFT_DS_CORRUPT_SYNC=<k>, the k-th weight
sync of the run (1-based) hands the engine a wrong copy of its first tensor (negated), as a sync or a
wake-up that did not land would. The trained model itself is untouched.

maybe_die: fault injection for the resume tests. With RFT_DS_DIE_AT=<point>:<epoch> (points: sample,
train, checkpoint), rank RFT_DS_DIE_RANK (default 0) sends itself SIGKILL there: no handler, no
cleanup, exactly what a node failure or the OOM killer does. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from rft_ds import distributed as D

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective: whether any rank got a stop signal."""
        return D.any_rank(self.received is not None)


def maybe_die(point: str, epoch: int) -> None:
    if os.environ.get("RFT_DS_DIE_AT") == f"{point}:{epoch}" and str(D.rank()) == os.environ.get("RFT_DS_DIE_RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_corrupt(sync_number: int, first: bool, tensor: Any) -> None:
    if first and os.environ.get("RFT_DS_CORRUPT_SYNC") == str(sync_number):
        tensor.neg_()
