"""Passwordless ssh between the two nodes of tests.cluster.netns, as DeepSpeed's hostfile launcher needs it.

DeepSpeed's default multi-node launcher is pdsh over ssh: the runner checks `ssh <first host> hostname`,
then runs `pdsh -w host1,host2 ... deepspeed.launcher.launch --node_rank=%n ...`, and plain `ssh` has to
work between the hosts, on port 22 unless --ssh_port says otherwise.

Each node gets its own /etc/ssh: a directory /etc/netns/<node>/ssh, which `ip netns exec` bind-mounts over
/etc/ssh for every command started on the node afterwards. It holds a throwaway host key and client key,
authorized_keys, an sshd_config and an ssh_config (that key, no host-key checking, no known_hosts file),
so nothing outside /etc/netns and nothing of root's ~/.ssh changes. One sshd per node listens on port 22
of the node's own namespace: the root namespace's port 22 is another one.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tests.cluster.netns import ETC_NETNS, Nodes

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it; the Debian service makes it at start


def skip_reason() -> str | None:
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not tool or not Path(tool).exists():
            return "openssh-server/openssh-client not installed (apt-get install openssh-server)"
    return None


def _write_ssh_dir(d: Path, keys: Path, port: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for f in ("host_key", "host_key.pub", "id_ed25519", "id_ed25519.pub"):
        shutil.copy(keys / f, d / f)
    shutil.copy(keys / "id_ed25519.pub", d / "authorized_keys")
    (d / "host_key").chmod(0o600)
    (d / "id_ed25519").chmod(0o600)
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 0.0.0.0
HostKey /etc/ssh/host_key
AuthorizedKeysFile /etc/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
""")
    (d / "ssh_config").write_text(f"""Host *
  Port {port}
  IdentityFile /etc/ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
""")


@contextlib.contextmanager
def ssh_between(nodes: Nodes, port: int = 22, timeout: float = 20.0) -> Iterator[None]:
    """sshd on every node, every node able to `ssh <other node> cmd`; removed on exit."""
    made_privsep = not PRIVSEP_DIR.exists()
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="rftssh"))  # keys (copied into the nodes) and the sshd logs
    try:
        for name in ("host_key", "id_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rftnode-test", "-f", str(tmp / name)],
                check=True,
                timeout=30,
            )
        for name in nodes.names:
            _write_ssh_dir(ETC_NETNS / name / "ssh", tmp, port)
        for name in nodes.names:
            with open(tmp / f"sshd-{name}.log", "w") as log:  # a file, not a pipe: a full pipe would block sshd
                procs.append(
                    nodes.popen(
                        name, [SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"], stdout=subprocess.DEVNULL, stderr=log
                    )
                )
        deadline = time.monotonic() + timeout
        for i, name in enumerate(nodes.names):  # each node reaches the next one by name
            other = nodes.names[(i + 1) % len(nodes.names)]
            while True:
                r = nodes.run(name, ["ssh", other, "true"], capture_output=True, text=True, timeout=timeout)
                if r.returncode == 0:
                    break
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    logs = "".join(f.read_text() for f in tmp.glob("sshd-*.log"))
                    raise RuntimeError(f"ssh {name} -> {other} failed: {r.stderr.strip()}\n{logs}")
                time.sleep(0.2)
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for name in nodes.names:
            shutil.rmtree(ETC_NETNS / name / "ssh", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
