"""Stopping on request, and dying on request.

StopSignals: SIGTERM and SIGUSR1 (what Slurm sends ahead of a time limit or preemption) only set a flag;
the recipe checkpoints at its next safe point (between sampling chunks or optimizer steps, after a sync
or an eval, at an epoch's end) and exits cleanly, so a signal never tears a write.

maybe_corrupt: fault injection for the stale-weight check. With RFT_DS_CORRUPT_SYNC=<k>, the k-th weight
sync of the run (1-based) hands the engine a wrong copy of its first tensor (negated), as a sync or a
wake-up that did not land would. The trained model itself is untouched.

maybe_die: fault injection for the resume and failure tests. With RFT_DS_DIE_AT=<point>:<epoch>[:<n>] (points:
start, sample, generate (inside the sampling call), score, train, sync, checkpoint), rank RFT_DS_DIE_RANK
(default 0) sends itself SIGKILL the n-th time (default: the first) it passes that point in that epoch: no
handler, no cleanup, exactly what a node failure or the OOM killer does. RFT_DS_STOP_AT sends SIGUSR1 instead
(rank RFT_DS_STOP_RANK): the real stop-signal path, at a chosen moment. RFT_DS_RAISE_AT raises a
RuntimeError (rank RFT_DS_RAISE_RANK), as a library's error would; RFT_DS_ABORT_AT calls os.abort (rank
RFT_DS_ABORT_RANK), as an NCCL watchdog or a failed C++ assertion does. Unset, each costs one dict lookup.

maybe_dump_rows: for the tests that read trained rows back. With RFT_DS_DUMP_ROWS=<dir>, each rank writes the
rows it builds (experience.rows_for_rank) beside the completion each came from, as the pool shard holds it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """The flag SIGTERM/SIGUSR1 set. One per process (SIGNALS): launch/train.py installs it before its imports,
    so a signal during start-up (imports, model load, engine start: minutes on a large model) is kept for
    the first safe point instead of killing the rank; rft_ds.train installs it if nobody did."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopSignals:
        if not self.installed:
            self.received = None
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
        from rft_ds import distributed as D

        return D.any_rank(self.received is not None)


SIGNALS = StopSignals()


_passes: dict[tuple[str, int], int] = {}


_FAULTS = (
    ("RFT_DS_DIE_AT", "RFT_DS_DIE_RANK", signal.SIGKILL),
    ("RFT_DS_STOP_AT", "RFT_DS_STOP_RANK", signal.SIGUSR1),
    ("RFT_DS_RAISE_AT", "RFT_DS_RAISE_RANK", None),
    ("RFT_DS_ABORT_AT", "RFT_DS_ABORT_RANK", signal.SIGABRT),
)


def maybe_die(point: str, epoch: int) -> None:
    if not any(var in os.environ for var, _, _ in _FAULTS):
        return
    from rft_ds import distributed as D

    n = _passes[point, epoch] = _passes.get((point, epoch), 0) + 1
    here = {f"{point}:{epoch}:{n}"} | ({f"{point}:{epoch}"} if n == 1 else set())
    for var, rank_var, sig in _FAULTS:
        if os.environ.get(var) in here and str(D.rank()) == os.environ.get(rank_var, "0"):
            if sig is None:
                raise RuntimeError(f"injected failure at {point} in epoch {epoch} ({var})")
            if sig == signal.SIGABRT:
                os.abort()
            os.kill(os.getpid(), sig)


def maybe_corrupt(sync_number: int, first: bool, tensor: Any) -> None:
    if first and os.environ.get("RFT_DS_CORRUPT_SYNC") == str(sync_number):
        tensor.neg_()


_dumps = [0]


def maybe_dump_rows(built: list) -> None:
    """built: (completion token ids, ended by EOS, Row) per row; written to RFT_DS_DUMP_ROWS/rank<r>-<k>.npz."""
    out = os.environ.get("RFT_DS_DUMP_ROWS")
    if not out:
        return
    import numpy as np

    from rft_ds import distributed as D

    _dumps[0] += 1
    arrays = {}
    for i, (tokens, eos, row) in enumerate(built):
        arrays.update(
            {
                f"completion{i}": np.asarray(tokens),
                f"eos{i}": np.asarray(eos),
                f"input_ids{i}": row.input_ids,
                f"labels{i}": row.labels,
            }
        )
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"rank{D.rank()}-{_dumps[0]}.npz"), n=len(built), **arrays)
