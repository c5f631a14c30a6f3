"""What reaches the terminal: rft_ds's own lines (rank 0), an error once (the rank that failed first; rank 0
for an error every rank raised), rft_ds warnings from rank 0, rank 0's progress bars, and one line for a
rank that died without a Python error (a native abort, a segfault, SIGKILL). Everything else a rank or its
children print (vLLM, DeepSpeed, transformers, torch, their warnings and bars, C++ output) goes to
<output_dir>/logs/rank<r>.log.

`redirect` points the process's file descriptors 1 and 2 at the log, so output written below Python
(NCCL, gloo, vLLM's engine process, which inherits them) is caught too, and keeps duplicates of the
terminal's descriptors for `say`, `error` and the bars. The `rft-ds train` command calls it per rank unless
--verbose / train.verbose; the Python API leaves its caller's output alone (then say/error print as usual).

`watch_for_death` starts a small process per rank that outlives it: when the rank ends without saying so
(`ended`), it prints one line on the terminal naming the rank, the cause faulthandler wrote into the log
(an NCCL watchdog's SIGABRT, a segfault) and the log, which holds the rest.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

_out: TextIO | None = None  # the terminal's stdout and stderr, once redirected
_err: TextIO | None = None
log_path: Path | None = None


def redirect(path: Path, main: bool = True) -> None:
    """From now on this process's (and its children's) stdout and stderr append to `path`. rft_ds warnings
    reach the terminal from the main rank only (every rank runs the code that warns)."""
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
        if main and str(message).startswith("rft_ds"):  # our own (a skipped checkpoint, ...): the terminal too
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


_ended: list[int] = []  # the write end of the pipe to this rank's death watcher


_WATCHER = r"""
import ctypes, os, signal, sys
fd, parent, rank, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # waited for below, never delivered
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR2))  # PR_SET_PDEATHSIG: told at once
while os.getppid() == parent:
    signal.sigtimedwait({signal.SIGUSR2}, 0.5)
os.set_blocking(fd, False)
try:
    said = os.read(fd, 1)
except OSError:
    said = b""
if said:
    sys.exit(0)
cause = "no Python error: killed (SIGKILL: the OOM killer, a launcher or a node's end)"
try:
    with open(log, "rb") as f:
        f.seek(max(0, os.path.getsize(log) - 65536))
        for line in f.read().decode(errors="replace").splitlines():
            if line.startswith("Fatal Python error:"):
                cause = line.strip()
except OSError:
    pass
print(f"rft_ds: error (rank {rank}): the process died: {cause}; its last output is in {log}", file=sys.stderr)
"""


def watch_for_death(rank: str) -> None:
    """After `redirect`: faulthandler writes a fatal signal's Python stacks into the log, and a watcher process
    (told by the kernel when its parent ends: PR_SET_PDEATHSIG) prints one line on the terminal if this rank ends
    without calling `ended`. It dies with the rank's process tree when a launcher or srun ends the job."""
    if log_path is None or _ended:
        return
    faulthandler.enable(file=sys.stderr, all_threads=True)
    r, w = os.pipe()
    subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(r), str(os.getpid()), rank, str(log_path)],
        pass_fds=(r,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err(),
        close_fds=True,
    )
    os.close(r)
    _ended.append(w)


def ended() -> None:
    """This rank ends on purpose (its exit code says how): its death watcher stays quiet."""
    if _ended:
        try:
            os.write(_ended[0], b"0")
        except OSError:
            pass
