"""Slurm environment -> rank/master mapping (pure; no Slurm needed)."""

import pytest

from rft_ds.slurm import expand_nodelist, torch_env


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node1", ["node1"]),
        ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
        ("gpu-[08-10]", ["gpu-08", "gpu-09", "gpu-10"]),
        ("a[1-2],b7,c[9]", ["a1", "a2", "b7", "c9"]),
        ("rack1-n[001-002]-ib", ["rack1-n001-ib", "rack1-n002-ib"]),
        ("localhost", ["localhost"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_bad_range():
    with pytest.raises(ValueError, match="bad range '5-3'"):
        expand_nodelist("n[5-3]")


def test_torch_env_multi_node():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu-[01-03,07]",
    }
    assert torch_env(env) == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu-01",
        "MASTER_PORT": str(29500 + 123456 % 10000),
    }


def test_explicit_values_win_and_no_slurm_means_nothing():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "MASTER_PORT": "4000",
        "MASTER_ADDR": "10.0.0.9",
    }
    out = torch_env(env)
    assert out["MASTER_PORT"] == "4000" and out["MASTER_ADDR"] == "10.0.0.9" and out["LOCAL_RANK"] == "0"
    assert torch_env({"RANK": "0"}) == {}
    with pytest.raises(ValueError, match="no SLURM_JOB_NODELIST"):
        torch_env({"SLURM_PROCID": "0"})


@pytest.mark.slow
def test_tasks_with_only_slurm_variables_form_the_group_and_train(tmp_path):
    """Two tasks started the way srun starts them: no RANK/WORLD_SIZE/MASTER_*, only SLURM_* variables
    (srun itself is not involved here; a real Slurm runs the batch script in the multi-node tests)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    procs = []
    for r in range(2):
        env = {
            **base,
            "SLURM_PROCID": str(r),
            "SLURM_LOCALID": str(r),
            "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": str(os.getpid()),
            "HF_HUB_OFFLINE": "1",
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "launch/train.py",
                    "--config",
                    "launch/configs/tiny.yaml",
                    f"model.model_path={tmp_path / 'model'}",
                    f"train.output_dir={tmp_path / 'run'}",
                    "train.epochs=2",
                    "method.n_generations_per_prompt=4",
                    "train.eval_interval=0",
                ],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    m = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and len(m[0]["selection_digest_per_rank"]) == 2
