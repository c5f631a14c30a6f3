"""build_once: many processes (ranks on several nodes of one file system) ask at once; one builds."""

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from rft_ds.locked_build import build_once, exclusive


def _build(path: Path) -> None:
    with open(path.parent / "builds.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir()
    time.sleep(0.5)  # long enough that every other process arrives while this one builds
    (tmp / "done").write_text("x")
    tmp.rename(path)


def _ask(path: str) -> None:
    build_once(Path(path), lambda p: (p / "done").exists(), _build, "a test model")


def test_many_processes_build_once(tmp_path):
    target = tmp_path / "model"
    (tmp_path / "model.tmp999").mkdir()  # what a builder killed mid-way left behind, two hours ago
    os.utime(tmp_path / "model.tmp999", (time.time() - 7200, time.time() - 7200))
    procs = [mp.get_context("spawn").Process(target=_ask, args=(str(target),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert (target / "done").exists() and not list(tmp_path.glob("model.tmp*"))


def test_lock_wait_is_bounded(tmp_path):
    with exclusive(tmp_path / "m", 5, "m"):
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            with pytest.raises(TimeoutError, match=r"waited 1 s for .*m\.lock: another process is still building x"):
                pool.apply(_hold, (str(tmp_path / "m"),))


def _hold(path: str) -> None:
    with exclusive(Path(path), 1, "x"):
        pass


def test_builders_on_two_nodes_never_share_a_temporary_directory(monkeypatch, tmp_path):
    """Issue 31, 16: with flock local to each node, builders on two nodes may run at once, and may share a
    pid: the temporary directory is named by host and pid, and still matches the stale-leftover pattern."""
    import os
    import socket

    from rft_ds.locked_build import tmp_path as where

    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    a = where(tmp_path / "model")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    b = where(tmp_path / "model")
    assert a != b and a.name == f"model.tmp.node-a.{os.getpid()}" and b.name == f"model.tmp.node-b.{os.getpid()}"
    a.mkdir()
    assert list(tmp_path.glob("model.tmp*")) == [a]  # build_once's pattern for a dead builder's leftovers
