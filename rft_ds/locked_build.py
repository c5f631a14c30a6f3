"""Build something once per file system, whatever number of ranks and nodes ask for it at once.

Every rank calls `build_once` before the process group exists (so no barrier can order them): the first to
take an exclusive lock beside the target builds it into a temporary directory renamed into place; the
others wait on the lock, then find it built. flock(2) is one holder per file on a local file system and,
through the NFSv4/Lustre lock managers, across the nodes that mount a shared one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def exclusive(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold `<path>.lock` exclusively; TimeoutError naming it after timeout_s."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {timeout_s:.0f} s for {lock}: another process is still building "
                        f"{what} (delete the lock file if no such process exists)"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tmp_path(path: str | Path) -> Path:
    """Where a builder writes before its rename into place: `<path>.tmp.<host>.<pid>`. Named by host too: on
    a shared file system whose locks are local to each node, builders on two nodes may share a pid."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def build_once(
    path: str | Path,
    is_built: Callable[[Path], bool],
    build: Callable[[Path], object],
    what: str,
    timeout_s: float = 1800,
) -> Path:
    """`build(path)` unless `is_built(path)`, by one process at a time. `build` must write a temporary
    `<path>.tmp*` and rename it into place; the leftovers of a builder that died (an hour ago or more: on a
    file system whose locks are local to each node another node may be building now) are removed first."""
    path = Path(path)
    if is_built(path):
        return path
    with exclusive(path, timeout_s, what):
        if not is_built(path):
            for stale in path.parent.glob(path.name + ".tmp*"):  # a dead builder's, an hour old at least
                if time.time() - stale.stat().st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                build(path)
            except OSError:
                if not is_built(path):  # flock local to each node (NFS local_lock=flock): another node won
                    raise
    return path
