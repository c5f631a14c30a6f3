"""Two "nodes" on one box: two Linux network namespaces joined by a bridge, each with its own hostname.

Multi-node launches (Slurm across nodes, DeepSpeed's hostfile launcher) must be tested where ranks reach
each other over a node's own address, not over 127.0.0.1: a bug that hard-codes localhost, or binds the
wrong interface, passes on one node and fails on two. Here each node is a network namespace
(`ip netns`) whose only interface besides `lo` is `eth0`, a veth whose other end sits on a bridge in the
root namespace. The subnet (10.213.7.0/24 by default) exists only on those interfaces and the namespaces
have no default route, so nothing a node sends can leave the box.

What a process started through `Nodes.run`/`Nodes.popen` sees:
  * its node's network: `lo` and `eth0` (IPv4 only; IPv6 is off on eth0 so nothing picks a link-local
    address), `eth0` holding the node's address;
  * its node's hostname (`hostname` prints rftnode1): a UTS namespace per node, kept alive by a bind mount
    under /run/<prefix>/uts/ and joined with nsenter;
  * /etc/hosts naming both nodes: `ip netns exec` bind-mounts /etc/netns/<node>/hosts over /etc/hosts for
    the command, so nothing global changes.

Teardown kills whatever still runs in the namespaces, then deletes namespaces, links, the UTS bind mounts
and /etc/netns/<node>. It runs when the body raises, and `up` first removes what a crashed run left.

What the nodes still share (they are one box): processes (one PID namespace: `pkill -f` on one node, as
DeepSpeed's pdsh kill command does, hits the other node's processes too), the file system (/tmp, /dev/shm,
/run/munge), and users. `ip netns exec` mounts a fresh /sys without /sys/fs/cgroup (see slurm2.py).

Why the own hostname matters: without GLOO_SOCKET_IFNAME, gloo binds to the address the hostname resolves
to. With the box's hostname (127.0.0.1 in /etc/hosts, or unresolvable) each rank advertises 127.0.0.1 and
the cross-node connect fails; with rftnode1 -> 10.213.7.1 it works unset, and GLOO_SOCKET_IFNAME=eth0 works
either way.

By hand:  python -m tests.cluster.netns up|down|status  (as root, from the repository root).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

PREFIX = "rftnode"
SUBNET = "10.213.7.0/24"
IFACE = "eth0"  # the interface name inside every node, as on a real cluster: GLOO_SOCKET_IFNAME=eth0 fits all
ETC_NETNS = Path("/etc/netns")
IP = shutil.which("ip") or "/usr/sbin/ip"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
HOSTNAME = shutil.which("hostname") or "/usr/bin/hostname"
SYSCTL = shutil.which("sysctl") or "/usr/sbin/sysctl"
STEP_TIMEOUT = 30  # seconds for any one ip/nsenter/unshare call


def _sh(*cmd: str, check: bool = True, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _names(prefix: str) -> list[str]:
    return [f"{prefix}1", f"{prefix}2"]


def _bridge(prefix: str) -> str:
    return f"{prefix}br"


def _host_veth(name: str) -> str:
    """The root-namespace end of a node's veth (its other end is eth0 inside the node)."""
    return f"{name}h"


def _state_dir(prefix: str) -> Path:
    return Path("/run") / prefix


def _uts_file(prefix: str, name: str) -> Path:
    return _state_dir(prefix) / "uts" / name


@dataclass
class Nodes:
    """The two nodes as created: names, addresses, and how to run a command on one of them."""

    prefix: str
    names: list[str]
    addrs: dict[str, str]  # node name -> IPv4 address on eth0
    iface: str = IFACE
    subnet: str = SUBNET
    hosts: dict[str, str] = field(default_factory=dict)  # what /etc/hosts says inside the nodes

    def argv(self, node: str, cmd: Sequence[str]) -> list[str]:
        """The command line that runs `cmd` in `node`: its network, its /etc/hosts, its hostname."""
        if node not in self.addrs:
            raise KeyError(f"no node {node!r}; nodes are {self.names}")
        return [IP, "netns", "exec", node, NSENTER, f"--uts={_uts_file(self.prefix, node)}", "--", *cmd]

    def popen(
        self, node: str, cmd: Sequence[str], env: dict[str, str] | None = None, **popen_kwargs
    ) -> subprocess.Popen:
        """Start `cmd` in `node` (env replaces the environment, as with Popen). Teardown kills it if it is
        still running then."""
        return subprocess.Popen(self.argv(node, cmd), env=env, **popen_kwargs)

    def run(
        self, node: str, cmd: Sequence[str], env: dict[str, str] | None = None, **run_kwargs
    ) -> subprocess.CompletedProcess:
        """subprocess.run of `cmd` in `node`; run_kwargs as for subprocess.run (check, timeout, text, ...)."""
        run_kwargs.setdefault("timeout", 300)
        return subprocess.run(self.argv(node, cmd), env=env, **run_kwargs)

    def hostfile(self, slots: int = 1) -> str:
        """A DeepSpeed hostfile naming both nodes."""
        return "".join(f"{n} slots={slots}\n" for n in self.names)


def _owner(prefix: str) -> str | None:
    p = _state_dir(prefix) / "owner"
    return p.read_text().strip() if p.exists() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing_netns() -> set[str]:
    out = _sh(IP, "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link_exists(name: str) -> bool:
    return _sh(IP, "link", "show", "dev", name, check=False).returncode == 0


_ROUTE_TYPES = (
    "unicast",
    "local",
    "broadcast",
    "multicast",
    "throw",
    "unreachable",
    "prohibit",
    "blackhole",
    "nat",
    "anycast",
)


def _collision(subnet: str) -> str | None:
    """A route or address of this box that overlaps `subnet`, if any: the nodes' subnet must be theirs alone."""
    net = ipaddress.ip_network(subnet)
    candidates: list[tuple[str, str]] = []  # (destination or address, the line it came from)
    for line in _sh(IP, "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if words:
            candidates.append((words[0], line))
    for line in _sh(IP, "-4", "-o", "addr", check=False).stdout.splitlines():
        words = line.split()  # 2: eth0    inet 192.0.2.2/24 brd ...
        if len(words) > 3:
            candidates.append((words[3], line))
    for dest, line in candidates:
        if dest == "default":
            continue
        try:
            other = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue
        if other.overlaps(net):
            return " ".join(line.split())
    return None


def skip_reason(prefix: str = PREFIX, subnet: str = SUBNET) -> str | None:
    """None when this machine can host the two nodes, else one line saying why not (for pytest.skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in (IP, NSENTER, UNSHARE, HOSTNAME, SYSCTL):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found"
    owner = _owner(prefix)
    if owner == "manual":
        return f"{prefix} nodes were brought up by hand: `python -m tests.cluster.netns down` first"
    hit = _collision(subnet)
    if hit:
        return f"subnet {subnet} collides with this box's route/address: {hit}"
    probe = f"{prefix}probe{os.getpid()}"
    try:
        r = _sh(IP, "netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"`ip netns add` fails here (unprivileged container?): {r.stderr.strip()}"
        r = _sh(IP, "link", "add", f"{prefix}pv", "type", "veth", "peer", "name", IFACE, "netns", probe, check=False)
        if r.returncode != 0:
            return f"cannot create a veth pair into a namespace: {r.stderr.strip()}"
        r = _sh(IP, "link", "add", f"{prefix}pb", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot create a bridge: {r.stderr.strip()}"
        r = _sh(IP, "netns", "exec", probe, NSENTER, "--version", check=False)  # it mounts a fresh /sys
        if r.returncode != 0:
            return f"`ip netns exec` fails here: {r.stderr.strip()}"
    finally:
        _sh(IP, "link", "del", f"{prefix}pb", check=False)
        _sh(IP, "link", "del", f"{prefix}pv", check=False)
        _sh(IP, "netns", "del", probe, check=False)
    return None


def _kill_netns_procs(name: str, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process in netns `name`; bounded waits. Returns the pids found."""
    found: list[int] = []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        pids = [int(p) for p in _sh(IP, "netns", "pids", name, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        found += [p for p in pids if p not in found]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _sh(IP, "netns", "pids", name, check=False).stdout.split():
                return found
            time.sleep(0.1)
    return found


def down(prefix: str = PREFIX) -> list[str]:
    """Remove everything `up` may have made for `prefix`, as far as it exists; never raises.
    Returns what it removed, for the log."""
    done: list[str] = []
    present = _existing_netns()
    for name in _names(prefix):
        if name in present:
            pids = _kill_netns_procs(name)
            if pids:
                done.append(f"killed {name} pids {pids}")
            if _sh(IP, "netns", "del", name, check=False).returncode == 0:
                done.append(f"netns {name}")
        # Deleting the namespace drops its veth end and so the pair; if a process still holds the namespace,
        # deleting the root end drops the pair anyway.
        if _link_exists(_host_veth(name)) and _sh(IP, "link", "del", _host_veth(name), check=False).returncode == 0:
            done.append(f"link {_host_veth(name)}")
        uts = _uts_file(prefix, name)
        if uts.exists():
            _sh("umount", str(uts), check=False)
            with contextlib.suppress(OSError):
                uts.unlink()
            done.append(f"uts {uts}")
        etc = ETC_NETNS / name
        if etc.exists():
            shutil.rmtree(etc, ignore_errors=True)
            done.append(f"dir {etc}")
    if _link_exists(_bridge(prefix)) and _sh(IP, "link", "del", _bridge(prefix), check=False).returncode == 0:
        done.append(f"link {_bridge(prefix)}")
    if _state_dir(prefix).exists():
        shutil.rmtree(_state_dir(prefix), ignore_errors=True)
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only when empty: then it holds nothing of anyone's
    return done


def _leftovers(prefix: str) -> bool:
    names = _names(prefix)
    return (
        bool(_existing_netns() & set(names))
        or _link_exists(_bridge(prefix))
        or any(_link_exists(_host_veth(n)) for n in names)
        or _state_dir(prefix).exists()
        or any((ETC_NETNS / n).exists() for n in names)
    )


def up(prefix: str = PREFIX, subnet: str = SUBNET, owner: str | None = None) -> Nodes:
    """Create the two nodes. `owner` is recorded so that a later `up` can tell a crashed run's leftovers
    (owner pid gone: removed) from nodes in use (refused). Raises on any failure, after cleaning up."""
    owner = owner or str(os.getpid())
    names = _names(prefix)
    if len(_host_veth(names[-1])) > 15 or len(_bridge(prefix)) > 15:
        raise ValueError(f"prefix {prefix!r} too long for Linux interface names (15 characters)")
    prev = _owner(prefix)
    if prev == "manual" and owner != "manual":
        raise RuntimeError(f"{prefix} nodes were brought up by hand: `python -m tests.cluster.netns down` first")
    if prev and prev.isdigit() and int(prev) != os.getpid() and _pid_alive(int(prev)):
        raise RuntimeError(f"{prefix} nodes are in use by pid {prev}")
    if _leftovers(prefix):
        down(prefix)
    hit = _collision(subnet)
    if hit:
        raise RuntimeError(f"subnet {subnet} collides with this box's route/address: {hit}")
    net = ipaddress.ip_network(subnet)
    addrs = {name: str(net.network_address + i + 1) for i, name in enumerate(names)}
    hosts = {"127.0.0.1": "localhost", "::1": "localhost ip6-localhost ip6-loopback"}
    hosts.update({ip: name for name, ip in addrs.items()})
    try:
        _state_dir(prefix).mkdir(parents=True, exist_ok=True)
        (_state_dir(prefix) / "owner").write_text(owner + "\n")
        br = _bridge(prefix)
        _sh(IP, "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        _sh(SYSCTL, "-qw", f"net.ipv6.conf.{br}.disable_ipv6=1", check=False)
        _sh(IP, "link", "set", br, "up")
        for name in names:
            veth = _host_veth(name)
            _sh(IP, "netns", "add", name)
            # The peer is born inside the namespace, so it may be called eth0 although the root has an eth0.
            _sh(IP, "link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", name)
            _sh(SYSCTL, "-qw", f"net.ipv6.conf.{veth}.disable_ipv6=1", check=False)
            _sh(IP, "link", "set", veth, "master", br, "up")
            _sh(IP, "netns", "exec", name, SYSCTL, "-qw", f"net.ipv6.conf.{IFACE}.disable_ipv6=1", check=False)
            _sh(IP, "-n", name, "addr", "add", f"{addrs[name]}/{net.prefixlen}", "dev", IFACE)
            _sh(IP, "-n", name, "link", "set", "lo", "up")
            _sh(IP, "-n", name, "link", "set", IFACE, "up")
            etc = ETC_NETNS / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("".join(f"{ip} {h}\n" for ip, h in hosts.items()))
            uts = _uts_file(prefix, name)
            uts.parent.mkdir(parents=True, exist_ok=True)
            uts.touch()
            _sh(UNSHARE, f"--uts={uts}", HOSTNAME, name)  # a UTS namespace, kept by a bind mount on `uts`
        _wait_forwarding(names)
    except BaseException:
        down(prefix)
        raise
    return Nodes(prefix=prefix, names=names, addrs=addrs, subnet=subnet, hosts=hosts)


def _wait_forwarding(names: list[str], timeout: float = 10.0) -> None:
    """Bridge ports and both veth ends must be up before the first packet; bounded wait."""
    deadline = time.monotonic() + timeout
    while True:
        ok = all(
            Path(f"/sys/class/net/{_host_veth(n)}/brport/state").read_text().strip() == "3"  # forwarding
            and "LOWER_UP" in _sh(IP, "-n", n, "-br", "link", "show", IFACE).stdout
            for n in names
        )
        if ok:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("node links did not come up: " + _sh(IP, "-br", "link").stdout)
        time.sleep(0.05)


@contextlib.contextmanager
def two_nodes(prefix: str = PREFIX, subnet: str = SUBNET) -> Iterator[Nodes]:
    """The two nodes for the body's duration; torn down even when the body raises."""
    nodes = up(prefix, subnet)
    try:
        yield nodes
    finally:
        down(prefix)


try:
    import pytest
except ImportError:  # the by-hand entry point needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def netns_nodes() -> Iterator[Nodes]:
        """Module-scoped two nodes; skips where the machine cannot make them. Import it into a test module:
        `from tests.cluster.netns import netns_nodes`."""
        reason = skip_reason()
        if reason:
            pytest.skip(reason)
        with two_nodes() as nodes:
            yield nodes


def status(prefix: str = PREFIX) -> str:
    """What exists of the two nodes now, and what runs in them."""
    lines = [f"owner: {_owner(prefix)}"]
    present = _existing_netns()
    for name in _names(prefix):
        if name not in present:
            lines.append(f"{name}: absent")
            continue
        addr = _sh(IP, "-n", name, "-br", "-4", "addr", "show", IFACE, check=False).stdout.strip()
        pids = _sh(IP, "netns", "pids", name, check=False).stdout.split()
        uts = _uts_file(prefix, name)
        host = _sh(NSENTER, f"--uts={uts}", HOSTNAME, check=False).stdout.strip() if uts.exists() else "?"
        lines.append(f"{name}: hostname={host} {addr} pids={pids}")
    br = _bridge(prefix)
    lines.append(f"bridge {br}: {'present' if _link_exists(br) else 'absent'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status"):
        print("usage: python -m tests.cluster.netns up|down|status", file=sys.stderr)
        return 2
    cmd = argv[0]
    if cmd == "up":
        reason = skip_reason()
        if reason and _owner(PREFIX) != "manual":
            print(f"cannot: {reason}", file=sys.stderr)
            return 1
        nodes = up(owner="manual")
        for name in nodes.names:
            print(f"{name} {nodes.addrs[name]}  run: {' '.join(nodes.argv(name, ['bash']))}")
    elif cmd == "down":
        print("\n".join(down()) or "nothing to remove")
    else:
        print(status())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
