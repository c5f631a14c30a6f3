"""What multi-node users trip on, on one box: an output directory the nodes do not share (rank 1 sees a
private tmpfs there, as a node-local disk would), and a master address nobody listens on. Each must be
one line on the rank(s) it concerns, before any model loads, within train.dist_timeout_s."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rft_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _rank(
    rank: int,
    port: int,
    out: Path,
    model: Path,
    *extra: str,
    wrap: list[str] | None = None,
    addr: str = "127.0.0.1",
    timeout: int = 20,
) -> subprocess.Popen:
    env = {
        **os.environ,
        "RANK": str(rank),  # one rank on each of two nodes: each the first of its node
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "launch/train.py",
        "--config",
        "launch/configs/tiny.yaml",
        f"model.model_path={model}",
        "model.build=null",
        f"train.output_dir={out}",
        f"train.dist_timeout_s={timeout}",
        *extra,
    ]
    return subprocess.Popen(
        (wrap or []) + cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_output_dir_not_shared_between_nodes(tmp_path, tiny_model):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private mount for one rank needs root and unshare")
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    # rank 1 in its own mount namespace with a tmpfs over the output directory: a node-local disk
    inner = f'mount -t tmpfs tmpfs {out} && exec "$0" "$@"'
    procs = [
        _rank(0, port, out, tiny_model),
        _rank(1, port, out, tiny_model, wrap=["unshare", "-m", "--propagation", "private", "sh", "-c", inner]),
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 1, text[-3000:]
        assert "Learner" not in text and "deepspeed.initialize" not in text  # before any model loads
    lines = [x for text in outs for x in text.splitlines() if x.startswith("rft_ds: error")]
    assert len(lines) == 1, outs  # both ranks raise it; the first to post says it on the terminal
    assert f"train.output_dir {out} is not shared between the nodes: rank" in lines[0], lines
    assert [p.name for p in out.iterdir()] == ["logs"]  # rank 0's marker directory removed again; its log stays


@pytest.mark.slow
def test_unreachable_master_names_address_and_port(tmp_path, tiny_model):
    """Rank 1 alone: nobody listens at MASTER_ADDR:MASTER_PORT (as with a wrong address)."""
    port = free_port()
    t = time.monotonic()
    p = _rank(1, port, tmp_path / "out", tiny_model, timeout=3)
    text = p.communicate(timeout=240)[0]
    took = time.monotonic() - t
    assert p.returncode == 1, text[-3000:]
    line = next(x for x in text.splitlines() if x.startswith("rft_ds: error"))
    assert (
        f"could not join the process group at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within "
        "train.dist_timeout_s=3" in line
    ), line
    assert took < 3 + 60, took  # the timeout, plus imports and start-up
