"""Checks that may hang or crash, in worker processes with a hard time limit per check.

A verifier's worst inputs do not fail, they stall: sympy simplifying 9^9^9 loops in C where no signal can
interrupt it, and math-verify's own timeout (signal.alarm) only works in a main thread, so in a thread pool
it is off and every hung check holds its thread for good (veRL PR 5635, TRL PR 5281: scores silently 0, or
a stuck rank). Here each check runs in a worker process: a soft limit (SIGALRM in the worker's main thread)
ends a pure-Python loop, and a worker past the hard limit (soft + grace) is killed with its process group
and replaced. Either way the check's verdict is "timeout", which the verifier scores as a failure and
counts. The workers are plain subprocesses, so this works the same from every reward executor: inline,
thread (the pool is thread-safe) and process (a process-pool worker may start subprocesses, not
multiprocessing children).

Protocol, one JSON line each way: the parent sends {"fn": "module:function", "args": [...], "soft_s": s};
the worker answers {"status": "ok", "value": v} | {"status": "timeout"} | {"status": "error", "value": msg}.
A worker started with --preload imports those modules first and then writes {"status": "ready"}, so an
import's seconds never count against a check.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 120.0  # a worker's start, imports included (a cold disk, a loaded node)


class CheckTimeout(BaseException):
    """Raised in a worker at its soft limit: a BaseException, so a check's own `except Exception` (sympy's,
    math-verify's) cannot swallow it."""


def grace_s(soft_s: float) -> float:
    """How long past the soft limit a worker may stay silent before it is killed."""
    return max(1.0, 0.5 * soft_s)


class Worker:
    """One worker process and its pipes. Not thread-safe: the pool hands a worker to one thread at a time."""

    def __init__(self, preload: Sequence[str], memory_mb: int | None) -> None:
        cmd = [sys.executable, "-m", "rft_ds.verifier", "--preload", ",".join(preload)]
        if memory_mb:
            cmd += ["--memory-mb", str(memory_mb)]
        # its own process group (killed whole) and session (a Ctrl-C at the terminal goes to rft_ds, which
        # then closes the workers' stdin: a worker exits at EOF)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        )
        reply = self._read(START_TIMEOUT_S)
        if reply is None or reply.get("status") != "ready":
            self.kill()
            raise RuntimeError(
                f"a verifier worker did not start (preloading {', '.join(preload) or 'nothing'}): {reply!r}"
            )

    def _read(self, timeout_s: float) -> dict | None:
        """The worker's next line; None when it says nothing within timeout_s; {"status": "died"} at EOF or on
        a line that is not the protocol's. poll, not select: a rank with vLLM and torch may hold more than
        1024 descriptors."""
        poller = select.poll()
        poller.register(self.proc.stdout, select.POLLIN | select.POLLHUP)
        if not poller.poll(timeout_s * 1000):
            return None
        line = self.proc.stdout.readline()
        try:
            return json.loads(line) if line else {"status": "died"}
        except ValueError:
            return {"status": "died"}

    def check(self, fn: str, args: list, soft_s: float) -> tuple[str, Any]:
        """(status, value) of fn(*args): ok, timeout, or error (the check raised, or the worker died: then it
        is killed and must be replaced: alive() says)."""
        try:
            self.proc.stdin.write((json.dumps({"fn": fn, "args": args, "soft_s": soft_s}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return "error", "the verifier worker had died"
        reply = self._read(soft_s + grace_s(soft_s))
        if reply is None:  # silent past the hard limit: a check stuck where no signal reaches
            self.kill()
            return "timeout", None
        if reply["status"] == "died":  # a crash (a segfault in a C extension, an exit)
            self.kill()
            return "error", f"the verifier worker died (exit {self.proc.returncode})"
        return reply["status"], reply.get("value")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the check's own children too
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class VerifierPool:
    """Up to `workers` worker processes, started on demand and kept for the process's life; run() spreads
    checks over them and returns each one's (status, value). Thread-safe."""

    def __init__(self, preload: Sequence[str] = (), workers: int = 2, memory_mb: int | None = 4096) -> None:
        self.preload, self.workers, self.memory_mb = tuple(preload), workers, memory_mb
        self._idle: list[Worker] = []
        self._started = 0  # workers alive or starting
        self._cond = threading.Condition()
        self._all: list[Worker] = []
        atexit.register(self.close)

    def _take(self) -> Worker:
        """An idle worker, or a new one while fewer than `workers` exist; else wait for either (a worker that
        dies frees its place: a waiter then starts the replacement)."""
        with self._cond:
            while not self._idle and self._started >= self.workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._started += 1
        try:
            w = _SPAWNER.submit(Worker, self.preload, self.memory_mb).result()
        except BaseException:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._all.append(w)
        return w

    def _give_back(self, w: Worker) -> None:
        with self._cond:
            if w.alive():
                self._idle.append(w)
            else:  # killed (timeout) or dead: its place is free for a new one
                self._started -= 1
                self._all.remove(w)
            self._cond.notify()

    def check(self, fn: str, args: list, soft_s: float) -> tuple[str, Any]:
        w = self._take()
        try:
            return w.check(fn, args, soft_s)
        finally:
            self._give_back(w)

    def run(self, fn: str, args: Sequence[list], soft_s: float) -> list[tuple[str, Any]]:
        """fn(*a) for each a of args, at most `workers` at once; results in order."""
        if len(args) <= 1 or self.workers == 1:
            return [self.check(fn, list(a), soft_s) for a in args]
        with ThreadPoolExecutor(min(self.workers, len(args))) as ex:
            return list(ex.map(lambda a: self.check(fn, list(a), soft_s), args))

    def close(self) -> None:
        with self._cond:
            workers, self._all, self._idle = self._all, [], []
            self._started = 0
        for w in workers:
            w.kill()


# Workers are started from this one long-lived thread: a worker's parent-death signal follows the thread that
# started it, and a pool's check threads come and go.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="rft_ds-verifier-spawner")
_POOLS: dict[tuple, VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def pool(preload: Sequence[str], workers: int, memory_mb: int | None = 4096) -> VerifierPool:
    """This process's pool for these settings (made once; a process-executor worker makes its own)."""
    key = (os.getpid(), tuple(preload), workers, memory_mb)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = VerifierPool(preload, workers, memory_mb)
        return _POOLS[key]


# ---- the worker process ----


def _resolve(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _on_alarm(signum: int, frame: Any) -> None:
    raise CheckTimeout()


def serve(preload: Sequence[str], memory_mb: int | None, out: Any) -> None:
    """The worker's loop: one check per line of stdin until EOF, each reply a line on `out`."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with its rank, even mid-check
    if os.getppid() == 1:  # the rank was gone before the line above
        os._exit(0)
    if memory_mb:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a runaway expansion fails, the node does not
    for module in preload:
        importlib.import_module(module)
    out.write(json.dumps({"status": "ready"}) + "\n")
    out.flush()
    signal.signal(signal.SIGALRM, _on_alarm)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            fn = _resolve(req["fn"])
            signal.setitimer(signal.ITIMER_REAL, float(req["soft_s"]))
            try:
                reply = {"status": "ok", "value": fn(*req["args"])}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CheckTimeout:
            reply = {"status": "timeout"}
        except MemoryError:
            reply = {"status": "error", "value": "MemoryError: past the verifier's memory limit"}
        except Exception as e:  # noqa: BLE001 - any failure of the check is its verdict
            reply = {"status": "error", "value": f"{type(e).__name__}: {str(e)[:200]}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--preload", default="")
    ap.add_argument("--memory-mb", type=int, default=None)
    a = ap.parse_args()
    # the protocol gets its own descriptor; fd 1 becomes stderr, so a check's prints (Python's or a C
    # library's) never reach the parent's pipe
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    serve([m for m in a.preload.split(",") if m], a.memory_mb, protocol)
