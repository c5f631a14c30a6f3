"""Slurm's environment -> torch.distributed's, for `srun` with one task per device.

srun starts every task itself (no deepspeed launcher): each task reads its rank from SLURM_PROCID, its
local rank from SLURM_LOCALID, the world size from SLURM_NTASKS, and uses the first host of the job's
node list as the rendezvous master. Pure functions, tested without Slurm.
"""

from __future__ import annotations

import re
from typing import Mapping

DEFAULT_PORT = 29500


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu-[01-03,07],cpu1' -> ['gpu-01', 'gpu-02', 'gpu-03', 'gpu-07', 'cpu1'] (zero padding kept)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {r!r} in node list {nodelist!r}")
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def torch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT a task started by srun should use.

    Values already set win (a wrapper may have chosen them); MASTER_PORT defaults to a port derived from
    the job id, so two jobs sharing a first node do not collide."""
    if "SLURM_PROCID" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_PROCID is set but no SLURM_JOB_NODELIST: cannot pick a master host")
    job = env.get("SLURM_JOB_ID", "0")
    derived = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS", "1"),
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": str(DEFAULT_PORT + int(job) % 10000 if job.isdigit() else DEFAULT_PORT),
    }
    return {k: env.get(k, v) for k, v in derived.items()}


def job_end_time(env: Mapping[str, str], squeue: str = "squeue") -> float | None:
    """When Slurm ends this job (seconds since the epoch), or None outside Slurm or without a time limit.
    SLURM_JOB_END_TIME where Slurm sets it, else `squeue -o %e` (one call, at start-up, on rank 0)."""
    import subprocess

    if "SLURM_JOB_ID" not in env:
        return None
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    try:
        out = subprocess.run(
            [squeue, "-h", "-j", env["SLURM_JOB_ID"], "-o", "%e"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_end_time(out)


def parse_end_time(text: str) -> float | None:
    """squeue's %e ('2026-11-25T21:00:00', local time; 'N/A' or 'Unknown' without a limit) -> epoch seconds."""
    import datetime

    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None
