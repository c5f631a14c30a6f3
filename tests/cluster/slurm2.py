"""A two-node Slurm on the two network-namespace nodes of tests.cluster.netns.

Layout, as on a small real cluster: the first node is controller, login node and compute node (slurmctld
and a slurmd); the second node runs a slurmd. Both slurmds listen on the same port, each in its own
namespace, at the node's own address (NodeAddr), and `slurmd -N <node>` names them. Clients (srun, sbatch,
sinfo) must run inside a node: the root namespace has no address on the nodes' subnet.

munged runs in the root namespace (started here only if `munge -n | unmunge` fails, and then stopped
here, by pid): its socket is a file under /run/munge, which processes in every network namespace reach.

cgroup.conf says CgroupPlugin=cgroup/v1 because `ip netns exec` mounts a fresh /sys without
/sys/fs/cgroup: slurmd's default (autodetect) then fails with "No filesystem mounted on /sys/fs/cgroup";
the v1 plugin initialises without looking (nothing here uses cgroups: proctrack/linuxproc, task/none).
Tested with Slurm 22.05 (Debian 12).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tests.cluster.netns import Nodes

CTLD_PORT = 6817  # inside the nodes' namespaces, so no clash with a Slurm in the root namespace
SLURMD_PORT = 6818


def skip_reason() -> str | None:
    """None when the Slurm daemons and munge are installed, else why not."""
    for tool in ("slurmctld", "slurmd", "srun", "sinfo", "scontrol", "munged", "munge", "unmunge"):
        if not shutil.which(tool):
            return f"{tool} not installed (apt-get install slurmctld slurmd munge)"
    return None


@dataclass
class Slurm:
    nodes: Nodes
    conf: Path
    env: dict[str, str]  # the caller's environment plus SLURM_CONF
    login: str  # the node that runs slurmctld and where clients run

    def run(self, cmd: Sequence[str], **run_kwargs) -> subprocess.CompletedProcess:
        """A client command (srun, sbatch, sinfo, ...) on the login node."""
        run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("text", True)
        run_kwargs.setdefault("timeout", 120)
        return self.nodes.run(self.login, cmd, env=self.env, **run_kwargs)


def _munge_works() -> bool:
    r = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=30)
    return r.returncode == 0


def _start_munged() -> int:
    """Start munged as the munge user (creating a key if there is none); returns its pid."""
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    for d in ("/etc/munge", "/var/lib/munge", "/var/log/munge", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, capture_output=True, timeout=30)
    pidfile = Path("/run/munge/munged.pid")
    for _ in range(50):
        if pidfile.exists() and pidfile.read_text().strip().isdigit() and _munge_works():
            return int(pidfile.read_text())
        time.sleep(0.1)
    raise RuntimeError("munged did not come up")


def write_conf(d: Path, nodes: Nodes, cpus: int) -> Path:
    """slurm.conf (+ cgroup.conf) for the two nodes in directory `d`; returns slurm.conf's path."""
    login = nodes.names[0]
    for sub in ["state", "spool", *(f"spool/{n}" for n in nodes.names)]:
        (d / sub).mkdir(parents=True, exist_ok=True)
    node_lines = "".join(
        f"NodeName={n} NodeAddr={nodes.addrs[n]} CPUs={cpus} RealMemory=1000 State=UNKNOWN\n" for n in nodes.names
    )
    conf = d / "slurm.conf"
    # %n in the slurmd paths: both slurmds share this directory and need their own spool, pid and log.
    conf.write_text(f"""ClusterName=rfttwo
SlurmctldHost={login}({nodes.addrs[login]})
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=600
MpiDefault=none
{node_lines}PartitionName=two Nodes={",".join(nodes.names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    return conf


def _daemon_pids(nodes: Nodes) -> list[int]:
    """Slurm daemons still running in the nodes' namespaces."""
    pids = []
    for name in nodes.names:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
        for pid in out.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() in ("slurmctld", "slurmd", "slurmstepd"):
                    pids.append(int(pid))
    return pids


def _log_tails(d: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(d.glob("*.log")))


@contextlib.contextmanager
def slurm_cluster(
    nodes: Nodes, workdir: Path, cpus: int | None = None, env: dict[str, str] | None = None
) -> Iterator[Slurm]:
    """slurmctld + two slurmds on `nodes`, config and logs in `workdir`; all idle on entry, shut down on exit."""
    munged_pid = None if _munge_works() else _start_munged()
    conf = write_conf(workdir, nodes, cpus or os.cpu_count() or 1)
    slurm = Slurm(nodes, conf, {**(env or os.environ), "SLURM_CONF": str(conf)}, nodes.names[0])
    try:
        daemons = [(slurm.login, ["slurmctld"])] + [(name, ["slurmd", "-N", name]) for name in nodes.names]
        for name, cmd in daemons:  # each forks into the background and returns
            r = nodes.run(name, cmd, env=slurm.env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"{cmd[0]} on {name} failed: {r.stderr}\n{_log_tails(workdir)}")
        deadline = time.monotonic() + 60
        while True:
            states = slurm.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
            if states.count("idle") == len(nodes.names):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after 60 s: {states}\n{_log_tails(workdir)}")
            time.sleep(0.5)
        yield slurm
    finally:
        slurm.run(["scontrol", "shutdown"], check=False, timeout=30)
        deadline = time.monotonic() + 15  # they exit within a second or so; netns teardown kills stragglers
        while _daemon_pids(nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        if munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(munged_pid, signal.SIGTERM)
