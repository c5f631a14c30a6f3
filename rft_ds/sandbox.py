"""A completion's program run against its tests in a throwaway sandbox process.

What it contains, and how (`python -m rft_ds.sandbox` is the launcher: it sets everything up in the child
and then execs the program, so the parent, with its threads, never runs code between fork and exec):
- time: a wall-clock timeout, after which the parent kills it, and RLIMIT_CPU;
- memory, file size, processes: RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC (an allocation of 10 GB fails, a
  fork bomb stops at the limit);
- files: a temporary directory of its own as working directory, HOME and TMPDIR, removed afterwards.
  As root the program runs as an unprivileged uid of its own (UID_BASE + slot, one per concurrent run), so
  it can write nowhere else (`rm -rf ~` empties its own home) and RLIMIT_NPROC counts its processes alone;
- network: as root, a new network namespace with no interface up (connecting anywhere fails). Not root: the
  network is the host's, said in the README; user namespaces are not assumed;
- leftovers: as root, after the run every process of its uid is killed (kill(-1) from that uid), so a child
  that left the process group (setsid, a daemon) dies too; not root, its process group is killed.

It contains what models write by accident or by reward hacking within Python (loops, bombs, allocations,
deletes, `sys.exit(0)` before the tests: the verdict needs the harness's own token on stdout, which the
program never sees); it is not a boundary against kernel exploits (use a VM or gVisor for hostile users).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

UID_BASE = 61000  # as root, run k runs as uid UID_BASE + k (no passwd entry needed)
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, the whole run
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write (its stdout goes to a file: capped too)
    processes: int = 32  # processes and threads of its uid (as root; else of the user: see README)


@dataclass(frozen=True)
class Outcome:
    status: str  # passed | failed | timeout | error (the sandbox itself could not run it)
    output: str  # the tail of its stdout + stderr
    seconds: float


_slots = threading.Semaphore(64)
_free: list[int] = list(range(64))
_free_lock = threading.Lock()


def _take_slot() -> int:
    _slots.acquire()
    with _free_lock:
        return _free.pop()


def _give_slot(k: int) -> None:
    with _free_lock:
        _free.append(k)
    _slots.release()


def running_as(uid: int) -> list[int]:
    """The live processes of `uid` (a zombie is dead: it waits for a parent that may never reap it)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        out.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return out


def run(program: str, limits: Limits = Limits(), stdin: str = "") -> Outcome:
    """Run `program` (Python source) in a sandbox; passed when it exits 0 *and* prints `stdin`'s first line
    (a token only the harness knows: code_tests sends a fresh one), else failed, or timeout."""
    root = os.geteuid() == 0
    slot = _take_slot()
    uid = UID_BASE + slot
    base = tempfile.mkdtemp(prefix="rft_ds-sandbox-")  # the program's home inside, its output beside it
    home = os.path.join(base, "home")
    os.mkdir(home)
    t0 = time.monotonic()
    try:
        with open(os.path.join(home, "main.py"), "w") as f:
            f.write(program)
        if root:
            os.chmod(base, 0o711)  # the uid may pass through to its home, not list or touch the output
            os.chown(home, uid, uid)
            os.chmod(home, 0o700)
        out_path = os.path.join(base, "out")  # written through the inherited descriptor (RLIMIT_FSIZE applies)
        cmd = [sys.executable, "-m", "rft_ds.sandbox", "--dir", home, "--cpu", str(limits.cpu_s), "--memory-mb",
               str(limits.memory_mb), "--file-mb", str(limits.file_mb), "--processes", str(limits.processes)]
        if root:
            cmd += ["--uid", str(uid)]
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=home,
                                    start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home,
                                                                 "PYTHONPATH": os.pathsep.join(sys.path)})
            try:
                proc.communicate(stdin.encode(), timeout=limits.timeout_s)
                status = None
            except subprocess.TimeoutExpired:
                status = "timeout"
                proc.terminate()  # the launcher kills and reaps everything of the run, then exits
                try:
                    proc.wait(KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - 4096))
            tail = f.read().decode("utf-8", "replace")
        if status is None:
            if proc.returncode == SETUP_FAILED:
                status = "error"  # the launcher could not set the sandbox up
            else:
                token = stdin.splitlines()[0] if stdin else None
                status = "passed" if proc.returncode == 0 and (token is None or token in tail) else "failed"
        return Outcome(status, tail[-2000:], time.monotonic() - t0)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        _give_slot(slot)


KILL_GRACE_S = 10.0  # how long the launcher may take to clear a run out after its timeout
SETUP_FAILED = 125


# ---- the launcher: a subreaper that runs the program as its child, then kills and reaps what is left ----

def interpreter(other_uid: bool) -> str | None:
    """The Python that runs the program: this one, or, for another uid, this one if every directory above it
    lets others in (pyenv under /root does not), else the system's /usr/bin/python3 (the program needs the
    standard library alone)."""
    here = os.path.realpath(sys.executable)
    if not other_uid or all(os.stat(d).st_mode & 0o001 for d in _parents(here)):
        return here
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None


def _parents(path: str) -> list[str]:
    out = []
    while True:
        path = os.path.dirname(path)
        out.append(path)
        if path == "/":
            return out


def _child(a: Any, python: str) -> None:
    """In the forked child: no network, limits, no privileges, then the program. Never returns."""
    import resource

    try:
        if a.uid is not None:  # root: no network, then no privileges
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        os.setpgid(0, 0)
        resource.setrlimit(resource.RLIMIT_CPU, (a.cpu, a.cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (a.memory_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (a.file_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (a.processes,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if a.uid is not None:
            os.setgroups([])
            os.setgid(a.uid)
            os.setuid(a.uid)
        # -I: isolated (no user site, no PYTHON* variables); -S: no site-packages either: the standard library
        os.execv(python, [python, "-I", "-S", "main.py"])
    except OSError as e:
        print(f"rft_ds sandbox: cannot set up: {e}", file=sys.stderr, flush=True)
    os._exit(SETUP_FAILED)


def _clear(uid: int | None, pgid: int) -> None:
    """Kill everything of the run: as root every process of its uid (kill(-1) from a child that takes the uid:
    Linux spares the sender), repeated while a fork bomb still forks; else its process group."""
    for _ in range(50):
        if uid is None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if not running_as(uid):
            return
        pid = os.fork()  # this launcher is single-threaded: fork is safe here
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.01)


def _reap_all() -> None:
    """Wait for every child left: as a subreaper, the run's orphans are ours (no zombie keeps its uid's
    process count, which would starve the slot's next run)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _launch(args: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    for name in ("--cpu", "--memory-mb", "--file-mb", "--processes", "--uid"):
        ap.add_argument(name, type=int, default=None)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args(args)
    python = interpreter(a.uid is not None)  # looked up with the launcher's own rights
    if python is None:
        print("rft_ds sandbox: cannot set up: no Python interpreter the sandbox's uid may run (this one lies in a "
              "private directory, and there is no /usr/bin/python3)", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGTERM, _stop)  # the parent's timeout
    os.chdir(a.dir)
    child = os.fork()
    if child == 0:
        _child(a, python)
    code, stopped = None, False
    try:
        while code is None:  # reap orphans as they come; the run ends with the program itself
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
    except _Stopped:
        stopped = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _clear(a.uid, child)
    _reap_all()
    os._exit(124 if stopped else (code if code is not None and code >= 0 else 1))


PR_SET_CHILD_SUBREAPER = 36


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped()  # raised, not flagged: a flag would leave waitpid waiting (PEP 475 retries it)


if __name__ == "__main__":
    _launch(sys.argv[1:])
