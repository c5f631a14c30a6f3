"""File helpers with no rft_ds imports: whatever writes a directory that must never be seen half-written
(checkpoints, best_model/, final_model/, the LoRA adapter, an export) uses these."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing_dir(out: str | Path) -> Iterator[Path]:
    """Write a directory into the yielded `<out>.tmp`, then put it at `out`. The old `out` is moved aside
    and removed only after the rename, so at every moment `out` is a whole directory (old or new) or,
    briefly, absent with the old one intact beside it as `<out>.old`. A failed write leaves `out` as it was."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
