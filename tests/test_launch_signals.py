"""rft_ds.safe_launch: stop signals reach the ranks through the deepspeed launcher; exit 3, a checkpoint, no orphans."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rft_ds.distributed import free_port
from rft_ds.safe_launch import _Requests, catches, rank_pids

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


# ---- fast: the pure parts ---------------------------------------------------------------------------


def test_ranks_are_the_children_of_launch_py():
    script = ["launch/train.py", "--config", "c.yaml"]
    rows = [
        (10, 1, ["python", "-m", "rft_ds.safe_launch", "--num_gpus", "2", *script]),
        (11, 10, ["python", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", *script]),  # names the script
        (12, 11, ["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", *script]),  # so does it
        (13, 12, ["python", "-u", "launch/train.py", "--local_rank=0", "--config", "c.yaml"]),
        (14, 12, ["numactl", "-C", "0-3", "python", "-u", "launch/train.py", "--local_rank=1"]),  # bound to cores
        (15, 13, ["python", "-u", "launch/train.py", "--local_rank=0", "--config", "c.yaml"]),  # a rank's fork
        (16, 13, ["python", "-B", "-c", "from multiprocessing.resource_tracker import main;main(41)"]),
    ]
    assert rank_pids(rows) == {13, 14}
    assert rank_pids(rows[:3]) == set()  # before launch.py has started them


def test_catches_reads_the_signal_disposition():
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        assert not catches(os.getpid(), signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, lambda *a: None)
        assert catches(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_each_stop_signal_is_one_request_and_a_second_sigterm_escalates():
    r = _Requests()
    r.handle(signal.SIGUSR1, None)
    r.handle(signal.SIGUSR1, None)
    r.handle(signal.SIGTERM, None)
    assert (r.pending, r.escalate) == (3, False)
    r.handle(signal.SIGTERM, None)
    assert (r.pending, r.escalate) == (3, True)
    r = _Requests()
    r.handle(signal.SIGINT, None)
    assert (r.pending, r.escalate) == (0, True)


# ---- slow: the deepspeed launcher with stand-in ranks (no model; seconds) ----------------------------

FAKE_RANK = """
import signal, sys, time
stop = []
time.sleep(float(sys.argv[-1]))  # start-up before the handlers exist (imports, config)
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # like StopSignals: only a request
print("handlers installed", flush=True)
while not stop:
    time.sleep(0.1)
time.sleep(0.5)  # "checkpoint"
print("stop signal received", flush=True)
sys.exit(3)
"""


def _start(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rft_ds.safe_launch", "--num_gpus", "2", "--master_port", str(free_port()), *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV
    )


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _ranks(tree: list[psutil.Process]) -> list[psutil.Process]:
    pids = rank_pids((p.pid, p.ppid(), p.cmdline()) for p in tree)
    return [p for p in tree if p.pid in pids]


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_for(proc: subprocess.Popen, text: str, lines: list[str], times: int = 1) -> None:
    """Read the output until `text` has appeared `times` times in all of it: two ranks writing at once can
    put both on one line."""
    for line in proc.stdout:
        lines.append(line)
        if "".join(lines).count(text) >= times:
            return
    pytest.fail(f"no {text!r} in the output:\n{''.join(lines)[-3000:]}")


def _cleanup(proc: subprocess.Popen, tree: list[psutil.Process]) -> None:
    for p in _running(tree):
        p.kill()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_signal_before_the_ranks_handle_it_is_held_then_forwarded_once(tmp_path):
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    proc = _start(str(tmp_path / "rank.py"), "4")
    tree = []
    try:
        deadline = time.time() + 120
        while len(_ranks(tree)) < 2 and time.time() < deadline:  # ranks started, handlers not yet installed
            time.sleep(0.2)
            tree = _tree(proc)
        assert not any(catches(p.pid, signal.SIGUSR1) for p in _ranks(tree))
        proc.send_signal(signal.SIGUSR1)  # would be lost: the ranks still ignore SIGUSR1
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 3, out[-3000:]
        assert out.count("stop signal received") == 2 and out.count("[rft_ds.safe_launch] stop requested") == 1
        assert not _running(tree)
    finally:
        _cleanup(proc, tree)


@pytest.mark.slow
def test_second_sigterm_terminates_everything(tmp_path):
    (tmp_path / "rank.py").write_text(FAKE_RANK.replace("while not stop:", "while True:"))  # never finishes a stop
    proc = _start(str(tmp_path / "rank.py"), "0")
    lines, tree = [], []
    try:
        _wait_for(proc, "handlers installed", lines, times=2)
        tree = _tree(proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert proc.poll() is None and len(_running(_ranks(tree))) == 2  # a stop request: the ranks go on
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM and time.time() - t0 < 20, out[-3000:]
        assert "[rft_ds.safe_launch] terminating" in out and not _running(tree)
    finally:
        _cleanup(proc, tree)


@pytest.mark.slow
def test_ranks_orphaned_by_a_killed_launcher_are_killed(tmp_path):
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    proc = _start(str(tmp_path / "rank.py"), "0")
    lines, tree = [], []
    try:
        _wait_for(proc, "handlers installed", lines, times=2)
        tree = _tree(proc)
        next(p for p in tree if "deepspeed.launcher.launch" in p.cmdline()).kill()  # the runner then exits 0
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1, out[-3000:]
        assert "outlived the launcher" in out and not _running(tree)
    finally:
        _cleanup(proc, tree)


# ---- slow: real 2-rank tiny runs, stopped at epoch 2 --------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch") / "model"  # the first run builds it, the others reuse it


def _send(proc: subprocess.Popen, how: str) -> None:
    if how == "usr1":
        os.kill(proc.pid, signal.SIGUSR1)
    elif how == "usr1-group":  # everyone: the runner and launch.py must survive it, as with Slurm's --signal
        os.killpg(proc.pid, signal.SIGUSR1)
    else:
        os.kill(proc.pid, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["usr1-group", "term"])  # to the wrapper alone: the fake-rank tests above
def test_stop_signal_through_the_launcher_checkpoints_and_exits_3(tmp_path, model_dir, how):
    run = tmp_path / "run"
    proc = _start(
        "launch/train.py",
        "--config",
        "launch/configs/tiny.yaml",
        f"model.model_path={model_dir}",
        f"train.output_dir={run}",
        "train.epochs=40",
        "train.save_interval=0",
        "method.n_generations_per_prompt=8",
        "train.eval_interval=0",
    )
    lines, tree = [], []
    try:
        _wait_for(proc, "epoch 2/40", lines)
        tree = _tree(proc)
        assert len(_ranks(tree)) == 2
        _send(proc, how)
        out, _ = proc.communicate(timeout=300)
        text = "".join(lines) + out
        assert proc.returncode == 3, text[-3000:]
        assert "stop signal received" in text
        assert text.count("[rft_ds.safe_launch] stop requested") == 1
        latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        assert (latest / "manifest.json").is_file()
        assert not (run / "final_model").exists()
        assert not _running(tree), [p.cmdline() for p in _running(tree)]
    finally:
        _cleanup(proc, tree)
