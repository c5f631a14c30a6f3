"""A completion's program run against its tests in a throwaway sandbox process.

What it contains, and how (`python -m rft_ds.sandbox` is the launcher: it sets everything up in the child
and then execs the program, so the parent, with its threads, never runs code between fork and exec):
- time: a wall-clock timeout, after which the parent kills it, and RLIMIT_CPU;
- memory, file size, processes: RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC (an allocation of 10 GB fails, a
  fork bomb stops at the limit);
- files: a temporary directory of its own as working directory, HOME and TMPDIR, removed afterwards.
  As root the program runs as an unprivileged uid of its own (one of UIDS from UID_BASE, held by one run at
  a time on the machine through a lock file), so it can write nowhere but its home and the world-writable
  directories (its files there are removed after the run), `rm -rf ~` empties its own home, and
  RLIMIT_NPROC counts its processes alone;
- network: as root, a new network namespace with no interface up (connecting anywhere fails). Not root: the
  network is the host's, said in the README; user namespaces are not assumed;
- leftovers: the launcher is the program's subreaper: after the run it kills every process of the uid (as
  root: kill(-1) from that uid) and every orphan it inherited (a setsid daemon), and reaps them all (a
  zombie would keep counting against the uid's process limit).

It contains what models write by accident (loops, bombs, allocations, deletes, connections, daemons) and
shallow reward hacks (`sys.exit(0)` before the tests: the verdict needs the harness's token on stdout); a
program that searches the harness's frames for the token can forge a pass, and it is not a boundary against
kernel exploits (use a VM or gVisor for hostile users).
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


UIDS = 4096  # uids UID_BASE ... UID_BASE + UIDS - 1, each held by one run at a time on the machine
_LOCKS = os.path.join(tempfile.gettempdir(), "rft_ds-sandbox-uids")


def _claim_uid() -> tuple[int, int]:
    """(uid, a descriptor holding its lock): a uid no other run on this machine uses now, whatever process
    or rank runs it (an flock on a file per uid; a crashed holder's lock goes with it). Tried from a random
    start: concurrent runs rarely probe the same uids."""
    import fcntl

    os.makedirs(_LOCKS, mode=0o700, exist_ok=True)
    start = secrets.randbelow(UIDS)
    while True:
        for k in range(UIDS):
            uid = UID_BASE + (start + k) % UIDS
            fd = os.open(os.path.join(_LOCKS, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if running_as(uid):  # a run whose launcher was killed left something: not this one
                os.close(fd)
                continue
            return uid, fd
        time.sleep(0.1)


def running_as(uid: int) -> list[int]:
    """The live processes whose real uid is `uid` (from /proc/PID/status: a process made non-dumpable shows its
    /proc entry as root's; a zombie is dead, it waits for a parent that may never reap it)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            if int(status["Uid"].split()[0]) == uid and not status["State"].strip().startswith("Z"):
                out.append(int(pid))
        except (OSError, KeyError, ValueError):
            pass  # gone meanwhile
    return out


def run(program: str, limits: Limits = Limits(), stdin: str = "") -> Outcome:
    """Run `program` (Python source) in a sandbox; passed when it exits 0 *and* prints `stdin`'s first line
    (a token only the harness knows: code_tests sends a fresh one), else failed, or timeout."""
    root = os.geteuid() == 0
    uid, lock = _claim_uid() if root else (None, None)
    base = None
    t0 = time.monotonic()
    try:
        base = tempfile.mkdtemp(prefix="rft_ds-sandbox-")  # the program's home inside, its output beside it
        home = os.path.join(base, "home")
        os.mkdir(home)
        with open(os.path.join(home, "main.py"), "w") as f:
            f.write(program)
        if root:
            os.chmod(base, 0o711)  # the uid may pass through to its home, not list or touch the output
            os.chown(home, uid, uid)
            os.chmod(home, 0o700)
        out_path = os.path.join(base, "out")  # written through the inherited descriptor (RLIMIT_FSIZE applies)
        cmd = [
            sys.executable,
            "-m",
            "rft_ds.sandbox",
            "--dir",
            home,
            "--cpu",
            str(limits.cpu_s),
            "--memory-mb",
            str(limits.memory_mb),
            "--file-mb",
            str(limits.file_mb),
            "--processes",
            str(limits.processes),
        ]
        if root:
            cmd += ["--uid", str(uid)]
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=home,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
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
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
        if lock is not None:
            os.close(lock)  # the uid is free again (the launcher left nothing of it running)


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
    except Exception as e:  # noqa: BLE001 - whatever it is, the child must not return into the launcher
        print(f"rft_ds sandbox: cannot set up: {e}", file=sys.stderr, flush=True)
    os._exit(SETUP_FAILED)


def _clear(uid: int | None, pgid: int) -> None:
    """Kill everything of the run. As root: kill(-1) from a child that takes the uid (it reaches every process
    of the uid, however it hid: another session, a /proc entry made root's by PR_SET_DUMPABLE; Linux spares
    the sender), until /proc shows none of the uid alive (not kill's ESRCH: a sandboxed kernel may answer 0
    with nothing to signal), then the uid's files in the shared temporary directories. Then, either way,
    every child left to this subreaper (what escaped the process group)."""
    if uid is not None:
        for _ in range(1000):  # a fork bomb forks while it is being killed: again until none is left
            pid = os.fork()  # this launcher is single-threaded: fork is safe here
            if pid == 0:
                try:
                    os.setgid(uid)
                    os.setuid(uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            _reap_all(block=False)  # the killed orphans are ours: reaped, they stop counting
            if not running_as(uid):
                break
        _remove_files_of(uid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:  # children of this subreaper: the program's orphans, wherever their group
        mine = _children()
        if not mine:
            return
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap_all(block=False)
        time.sleep(0.01)


def _children() -> list[int]:
    me, out = os.getpid(), []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit():
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == me and fields[0] != "Z":
                    out.append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _remove_files_of(uid: int) -> None:
    """What the uid left in the directories every user may write (top level: where a program puts them)."""
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


def _reap_all(block: bool = True) -> None:
    """Wait for every child left: as a subreaper, the run's orphans are ours (no zombie keeps its uid's
    process count, which would starve the uid's next run)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
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
        print(
            "rft_ds sandbox: cannot set up: no Python interpreter the sandbox's uid may run (this one lies in a "
            "private directory, and there is no /usr/bin/python3)",
            file=sys.stderr,
            flush=True,
        )
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
        _WAITING[0] = False  # from here a SIGTERM changes nothing: everything is cleared anyway
    except _Stopped:
        stopped = True
    _WAITING[0] = False
    _clear(a.uid, child)
    _reap_all(block=False)
    os._exit(124 if stopped else (code if code is not None and code >= 0 else 1))


PR_SET_CHILD_SUBREAPER = 36


class _Stopped(Exception):
    pass


_WAITING = [True]


def _stop(signum: int, frame: Any) -> None:
    if _WAITING[0]:
        raise _Stopped()  # raised, not flagged: a flag would leave waitpid waiting (PEP 475 retries it)


if __name__ == "__main__":
    _launch(sys.argv[1:])
