"""What reaches the terminal: rft_ds's own lines (rank 0), errors and rft_ds warnings from any rank, and
rank 0's progress bars. Everything else a rank or its children print (vLLM, DeepSpeed, transformers, torch,
their warnings and bars, C++ output) goes to <output_dir>/logs/rank<r>.log.

`redirect` points the process's file descriptors 1 and 2 at the log, so output written below Python
(NCCL, gloo, vLLM's engine process, which inherits them) is caught too, and keeps duplicates of the
terminal's descriptors for `say`, `error` and the bars. The `rft-ds train` command calls it per rank unless
--verbose / train.verbose; the Python API leaves its caller's output alone (then say/error print as usual).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

_out: TextIO | None = None  # the terminal's stdout and stderr, once redirected
_err: TextIO | None = None
log_path: Path | None = None


def redirect(path: Path) -> None:
    """From now on this process's (and its children's) stdout and stderr append to `path`."""
    global _out, _err, log_path
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _out = os.fdopen(os.dup(1), "w", buffering=1)
    _err = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):  # line by line, so the log is current when a rank dies
        stream.reconfigure(line_buffering=True)
    log_path = path
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        shown(message, category, filename, lineno, file, line)  # into the log, as always
        if str(message).startswith("rft_ds"):  # our own (a skipped checkpoint, ...): the terminal too
            print(f"{message}", file=_err, flush=True)

    warnings.showwarning = show


def out() -> TextIO:
    """The terminal's stdout (sys.stdout when nothing is redirected)."""
    return _out or sys.stdout


def err() -> TextIO:
    """The terminal's stderr: progress bars and errors."""
    return _err or sys.stderr


def say(line: str) -> None:
    """One of rft_ds's own lines: on the terminal, and in the log when there is one. The caller decides
    which ranks speak (rank 0, as a rule)."""
    print(line, file=out(), flush=True)
    if _out is not None:
        print(line, file=sys.stdout, flush=True)


def error(line: str) -> None:
    """An error line of any rank: on the terminal's stderr, and in the log."""
    print(line, file=err(), flush=True)
    if _err is not None:
        print(line, file=sys.stderr, flush=True)
