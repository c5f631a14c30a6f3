"""Faults on real processes: a rank SIGKILLed without a launcher to clean up, and a disk that fills up
during a checkpoint (a real tmpfs, a real ENOSPC)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rft_ds.checkpoint import verify
from rft_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _spawn(tmp_path, overrides, env_extra):
    """Two ranks started directly, as srun starts tasks: nobody kills the survivors for us."""
    port, procs = free_port(), []
    for r in range(2):
        env = {
            **os.environ,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "HF_HUB_OFFLINE": "1",
            **env_extra,
        }
        cmd = [
            sys.executable,
            "launch/train.py",
            "--config",
            "launch/configs/tiny.yaml",
            f"model.model_path={tmp_path / 'model'}",
            f"train.output_dir={tmp_path / 'run'}",
            "method.n_generations_per_prompt=8",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def _finish(procs, timeout):
    outs, ends = [], []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        ends.append(time.time())
    return outs


def test_lost_rank_makes_the_others_exit_with_its_name(tmp_path):
    procs = _spawn(tmp_path, ["train.dist_timeout_s=60"], {"RFT_DS_DIE_AT": "train:1", "RFT_DS_DIE_RANK": "1"})
    t0 = time.time()
    out1, _ = procs[1].communicate(timeout=300)
    died = time.time()
    out0, _ = procs[0].communicate(timeout=120)  # bounded: within the process-group timeout, not forever
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1, out0[-3000:]
    assert time.time() - died < 60 + 30, "the survivor must not outlive the process-group timeout"
    lines = [line for line in out0.splitlines() if line.startswith("rft_ds: error")]
    assert len(lines) == 1 and "rft_ds: error (rank 0): lost contact with rank 1 during a collective" in lines[0], out0[
        -2000:
    ]
    print(f"rank 1 killed after {died - t0:.0f}s; rank 0 exited {time.time() - died:.1f}s later")


def test_disk_full_during_checkpoint_keeps_previous_one(tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = mnt / "run"
        procs = _spawn(
            tmp_path,
            [
                f"train.output_dir={run}",
                "train.save_interval=1",
                "train.keep_last=5",
                "train.save_best_model=false",
                "train.eval_interval=0",
                "train.epochs=6",
                "train.dist_timeout_s=60",
            ],
            {},
        )
        outs = _finish(procs, timeout=400)
        for r, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 1, out[-3000:]
            errors = [line for line in out.splitlines() if line.startswith("rft_ds: error")]
            assert len(errors) == (1 if r == 0 else 0), out[-3000:]  # every rank's error, said once by rank 0
        assert (
            "rft_ds: error (all 2 ranks): checkpoint write (the previous checkpoint is intact) failed on rank"
            in (errors := [line for line in outs[0].splitlines() if line.startswith("rft_ds: error")])[0]
        )
        assert "MiB free on" in errors[0]  # the cause is visible, whatever the writer's own message
        root = run / "checkpoints"
        latest = (root / "latest").read_text().strip()
        assert latest.startswith("epoch_") and verify(root / latest) is None  # still complete and loadable
        assert int(latest.split("_")[1]) < 5  # the disk filled up before the run could finish
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
