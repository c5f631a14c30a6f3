"""Launchers across the two namespace nodes, before any rft_ds run: srun -N2 under a two-node Slurm, and
ssh/pdsh between the nodes (what DeepSpeed's hostfile launcher uses; test_two_nodes.py runs rft_ds with it)."""

import os
import shutil

import pytest

from tests.cluster import slurm2, sshd
from tests.cluster.netns import netns_nodes  # noqa: F401  (the fixture)
from tests.cluster.packages import installed


@pytest.fixture(scope="module")
def slurm(netns_nodes, tmp_path_factory):
    installed(slurm2.skip_reason, "slurmd", "slurmctld", "munge")  # before the check: a fresh machine has none
    with slurm2.slurm_cluster(netns_nodes, tmp_path_factory.mktemp("slurm2")) as s:
        yield s


@pytest.fixture(scope="module")
def ssh(netns_nodes):
    installed(sshd.skip_reason, "openssh-server", "openssh-client")
    with sshd.ssh_between(netns_nodes):
        yield netns_nodes


def test_srun_runs_one_task_on_each_node(slurm):
    r = slurm.run(["srun", "-N2", "-l", "sh", "-c", "echo $(hostname) $(hostname -i) $SLURM_NODEID"], check=True)
    assert sorted(r.stdout.splitlines()) == ["0: rftnode1 10.213.7.1 0", "1: rftnode2 10.213.7.2 1"], r.stdout


def test_ssh_and_pdsh_reach_the_other_node(ssh):
    r = ssh.run("rftnode1", ["ssh", "rftnode2", "hostname; hostname -I"], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["rftnode2", "10.213.7.2"]
    installed(lambda: None if shutil.which("pdsh") else "pdsh not installed", "pdsh")
    r = ssh.run(
        "rftnode2",
        ["pdsh", "-S", "-w", "rftnode1,rftnode2", "hostname"],
        capture_output=True,
        text=True,
        env={**os.environ, "PDSH_RCMD_TYPE": "ssh"},
        check=True,
    )
    assert sorted(r.stdout.splitlines()) == ["rftnode1: rftnode1", "rftnode2: rftnode2"]
