"""The two-node emulation itself: each node has its own hostname and address, ranks on the two nodes meet
over those addresses, and teardown leaves nothing behind, even when the body raises."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import netns
from tests.cluster.netns import netns_nodes  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]


def test_each_node_has_its_own_hostname_address_and_hosts(netns_nodes):
    for name in netns_nodes.names:
        out = netns_nodes.run(
            name,
            ["sh", "-c", "hostname; hostname -i; getent hosts rftnode1 rftnode2"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[:2] == [name, netns_nodes.addrs[name]]
        assert out[2:] == [netns_nodes.addrs["rftnode1"], "rftnode1", netns_nodes.addrs["rftnode2"], "rftnode2"]
        links = netns_nodes.run(name, ["ip", "-br", "-4", "addr"], capture_output=True, text=True).stdout
        assert {line.split()[0].split("@")[0] for line in links.splitlines()} == {"lo", "eth0"}


def test_gloo_all_reduce_between_the_nodes(netns_nodes):
    """MASTER_ADDR is the first node's name; no GLOO_SOCKET_IFNAME: gloo finds each node's address from its
    hostname, which is what the nodes' own hostnames are for (with the box's hostname it binds 127.0.0.1)."""
    procs = []
    for rank, name in enumerate(netns_nodes.names):
        env = {
            "PATH": os.environ["PATH"],
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "rftnode1",
            "MASTER_PORT": "29555",
            "PROBE_TIMEOUT": "60",
        }
        procs.append(
            netns_nodes.popen(
                name,
                [sys.executable, "-m", "tests.cluster.gloo_allreduce"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank=0 host=rftnode1 sum=3" in outs[0] and "rank=1 host=rftnode2 sum=3" in outs[1], outs


def _nothing_left(prefix: str) -> list[str]:
    left = [n for n in netns._existing_netns() if n.startswith(prefix)]
    left += [
        line
        for line in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith(prefix)
    ]
    left += [
        str(p)
        for p in (Path("/etc/netns") / f"{prefix}1", Path("/etc/netns") / f"{prefix}2", Path("/run") / prefix)
        if p.exists()
    ]
    return left


def test_teardown_after_a_failing_body_leaves_nothing():
    reason = netns.skip_reason("rftfail", "10.213.8.0/24")
    if reason:
        pytest.skip(reason)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    )
    procs: list[subprocess.Popen] = []
    with pytest.raises(RuntimeError, match="the body failed"):
        with netns.two_nodes("rftfail", "10.213.8.0/24") as nodes:
            procs.append(nodes.popen("rftfail1", ["sleep", "300"]))
            procs.append(nodes.popen("rftfail2", [sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True))
            assert procs[1].stdout.readline() == "up\n"  # SIGTERM is ignored from here on: teardown must SIGKILL
            raise RuntimeError("the body failed")
    t = time.monotonic()
    for p in procs:
        p.wait(timeout=5)
    assert time.monotonic() - t < 5
    assert _nothing_left("rftfail") == []
