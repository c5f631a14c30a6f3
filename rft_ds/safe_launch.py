"""`python -m rft_ds.safe_launch [deepspeed launcher args] launch/train.py --config CONFIG [overrides]`

The `deepspeed` launcher, made safe to stop. Same arguments as the `deepspeed` command, e.g.
`python -m rft_ds.safe_launch --num_gpus 2 launch/train.py --config launch/configs/tiny.yaml train.epochs=6`.

Why: the ranks stop gracefully on SIGTERM or SIGUSR1 (rft_ds.faults.StopSignals: stop at the next safe
point, checkpoint, exit 3), but the launcher between them and the signal gets in the way. SIGUSR1 (Slurm's
`--signal`, `scancel --signal=USR1`) kills the deepspeed runner and its launch.py at once (the default
action), so nothing waits for the ranks and Slurm ends the step under them; SIGTERM makes launch.py
terminate the ranks, racing their checkpoint.

How: the runner is started with SIGUSR1 ignored. An ignored signal stays ignored across fork and exec, so
the runner and launch.py survive SIGUSR1, while each rank installs its own handler over it when training
starts. Here, each SIGUSR1 and the first SIGTERM are forwarded once, as SIGUSR1, to the ranks (the
processes launch.py started), as soon as all of them have a handler for it (a signal that came earlier is
held, not lost); a second SIGTERM, or SIGINT, terminates everything (SIGTERM, SIGKILL 5 s later). The exit
code is the launcher's: 3 when the ranks checkpointed on a stop signal (requeue and resume). Processes of
the run still alive after the launcher exits are killed (on Linux this process is their subreaper, so it
inherits any that a dying launcher orphans), so no rank outlives this process.

One node only: ranks that a hostfile starts on other hosts are not this process's descendants. Under Slurm
across nodes, use launch/slurm/rft.sbatch (srun starts the ranks and signals them itself).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

GRACE_S = 5.0  # escalation: SIGTERM, then SIGKILL this much later
POLL_S = 0.5


def rank_pids(procs: Iterable[tuple[int, int, list[str]]]) -> set[int]:
    """The ranks among (pid, ppid, cmdline) rows: the children of `deepspeed.launcher.launch`. Not the runner
    or launch.py (their command lines name the script too), nor a rank's own children (a forked one has the
    rank's command line)."""
    rows = list(procs)
    launchers = {pid for pid, _, cmd in rows if "deepspeed.launcher.launch" in cmd}
    return {pid for pid, ppid, _ in rows if ppid in launchers}


def catches(pid: int, sig: int) -> bool:
    """Whether process pid has a handler for sig (SigCgt in /proc/PID/status); True where that is unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError):
        return True
    return bool(mask >> (sig - 1) & 1)


class _Requests:
    """What the signals asked for; the handler only counts, the main loop acts."""

    def __init__(self) -> None:
        self.pending = 0  # stop requests not yet forwarded to the ranks
        self.terms = 0
        self.escalate = False

    def handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT or (signum == signal.SIGTERM and self.terms):
            self.escalate = True
        else:
            self.pending += 1
        if signum == signal.SIGTERM:
            self.terms += 1


def _become_subreaper() -> None:
    """Linux: descendants orphaned by a dying runner or launch.py become this process's children, not init's,
    so they are still found (and killed) at the end, even ones never seen while they ran."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _say(msg: str) -> None:
    print(f"[rft_ds.safe_launch] {msg}", file=sys.stderr, flush=True)


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Still running (is_running also checks the start time, so a reused pid is not ours); zombies are done."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _terminate(procs: list[psutil.Process]) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        procs = _alive(psutil.wait_procs(procs, timeout=wait)[1])
        if not procs:
            return


def _reap(root: psutil.Process, runner: int) -> None:
    """Collect the exit status of orphans inherited as a subreaper (others wait for them to vanish), not the
    runner's (Popen's)."""
    for p in root.children():
        try:
            if p.pid != runner and p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def _tree(root: psutil.Process, runner: int) -> dict[psutil.Process, tuple[int, list[str]]]:
    """The run's processes with their parent and command line; not the runner, which Popen waits for (a psutil
    wait would reap it and lose its exit code)."""
    out = {}
    for p in root.children(recursive=True):
        if p.pid == runner:
            continue
        try:
            out[p] = (p.ppid(), p.cmdline())
        except psutil.Error:  # gone, or a zombie
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    requests = _Requests()
    _become_subreaper()
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, requests.handle)
    # preexec_fn runs in the child before exec; this process has no threads, so it is safe here.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", *argv],
        preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
    )
    root = psutil.Process()
    seen: set[psutil.Process] = set()  # every process of the run ever seen: it may be orphaned later
    while launcher.poll() is None:
        _reap(root, launcher.pid)
        tree = _tree(root, launcher.pid)
        seen.update(tree)
        now = rank_pids((p.pid, ppid, cmd) for p, (ppid, cmd) in tree.items())
        targets = [p for p in tree if p.pid in now]
        if requests.escalate:
            _say("terminating the launcher and the ranks")
            launcher.terminate()
            _terminate(_alive(seen))  # launch.py and the ranks (for which SIGTERM is only a stop request)
            try:
                launcher.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
            break
        if requests.pending and targets and all(catches(p.pid, signal.SIGUSR1) for p in targets):
            requests.pending -= 1
            _say(f"stop requested: SIGUSR1 to ranks {sorted(p.pid for p in targets)}")
            for p in targets:
                try:
                    p.send_signal(signal.SIGUSR1)
                except psutil.Error:
                    pass
        time.sleep(POLL_S)

    rc = launcher.returncode if launcher.returncode >= 0 else 128 - launcher.returncode
    run = _alive(seen | set(_tree(root, launcher.pid)))
    left = _alive(psutil.wait_procs(run, timeout=2.0)[1])  # a moment for processes still exiting
    if left:
        _say(f"killing {len(left)} process(es) that outlived the launcher: {sorted(p.pid for p in left)}")
        _terminate(left)
        if rc == 0:  # the runner says 0 when launch.py itself was killed, its ranks still running
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
