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
