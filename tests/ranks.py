"""Start the ranks of a run the way torchrun or srun does: one process per rank, each told its place by
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, with no launcher process.

For the tests whose subject is the run (checkpoints, stop and resume, elastic resume), not the launcher: they
launch many times, and the deepspeed launcher's two Python processes (its runner and launch.py, each importing
torch) cost ~5 s a launch on the 2-core CPU box. The deepspeed launcher itself is what test_e2e,
test_launch_signals and the cluster tests run.

Like deepspeed's launch.py, the first rank to exit non-zero gives its exit code to the launch, and the others
get SIGTERM (a stop request to rft_ds: a rank already stopping finishes its checkpoint), then SIGKILL 30 s later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rft_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PLACE = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_ranks(n: int, args: list[str], env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """`python *args` (a script and its arguments: launch/train.py --config ...) as n ranks on this host; stdout
    and stderr are the ranks', rank 0's first."""
    base = {k: v for k, v in os.environ.items() if k not in PLACE and not k.startswith("SLURM_")}
    port = str(free_port())
    with tempfile.TemporaryDirectory() as tmp:
        procs, files = [], []
        for r in range(n):
            out, err = open(Path(tmp) / f"{r}.out", "w+"), open(Path(tmp) / f"{r}.err", "w+")  # noqa: SIM115
            files.append((out, err))
            place = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=ROOT,
                    stdout=out,
                    stderr=err,
                    env={
                        **base,
                        **place,
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port,
                        "HF_HUB_OFFLINE": "1",
                        **(env or {}),
                    },
                )
            )
        code = _wait(procs, time.monotonic() + timeout)
        outs = []
        for out, err in files:
            out.seek(0), err.seek(0)
            outs.append((out.read(), err.read()))
            out.close(), err.close()
    if code is None:
        raise subprocess.TimeoutExpired(args, timeout, "".join(o for o, _ in outs), "".join(e for _, e in outs))
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in outs), "".join(e for _, e in outs))


def _wait(procs: list[subprocess.Popen], deadline: float) -> int | None:
    """The launch's exit code (None past the deadline, every rank then killed)."""
    code, kill_at = 0, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and kill_at is None:
            code, kill_at = failed[0], now + 30
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        if now > deadline or (kill_at is not None and now > kill_at):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return None if now > deadline else code
        time.sleep(0.05)
    failed = [p.returncode for p in procs if p.returncode != 0]
    return code or (failed[0] if failed else 0)
