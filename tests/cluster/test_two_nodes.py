"""rft_ds on two nodes: the tiny config with one rank per node, over the nodes' own addresses.

Two network-namespace nodes (tests/cluster/netns.py) share this box's file system, so train.output_dir is
shared as on a cluster with NFS. One reference run on one node (the deepspeed launcher, 2 ranks); then on
two nodes: a Slurm job (sbatch --nodes=2 --ntasks-per-node=1 launch/slurm/rft.sbatch), the same job sent
SIGUSR1 mid-run (checkpoint, exit 3, requeue, resume on the two nodes), and DeepSpeed's hostfile launcher
(pdsh over ssh). Each ends with the reference's eval rewards and bit-identical final weights.

Threads: every rank runs with OMP_NUM_THREADS=1 in every launch here, so that the float sums of a
one-node run and a two-node run are the same sums (a rank's thread count changes its matmul reductions).
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import slurm2, sshd
from tests.cluster.netns import netns_nodes  # noqa: F401  (the fixture)
from tests.cluster.packages import installed as _installed
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# one run's settings: long enough to stop inside epoch 3 of 5, short enough for CI
RUN = [
    "train.epochs=5",
    "train.save_interval=1",
    "method.n_generations_per_prompt=8",
    "train.eval_interval=2",
    "sampler.chunk_prompts=4",
    "train.plots=false",
]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def slurm(netns_nodes, tmp_path_factory):
    _installed(slurm2.skip_reason, "slurmd", "slurmctld", "munge")
    with slurm2.slurm_cluster(netns_nodes, tmp_path_factory.mktemp("slurm2")) as s:
        yield s


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny model (built once) and the one-node reference run."""
    from rft_ds.toy import ensure_tiny_model

    d = tmp_path_factory.mktemp("two_nodes")
    ensure_tiny_model(d / "model", seed=1000)
    ref = d / "ref"
    # two ranks on this host without a launcher (tests/ranks.py): the launchers are the two-node runs' subject
    args = ["launch/train.py", "--config", "launch/configs/tiny.yaml", f"model.model_path={d / 'model'}"]
    p = run_ranks(2, [*args, f"train.output_dir={ref}", *RUN], env=ENV, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d


def _weights(run: Path):
    from safetensors.torch import load_file

    return load_file(run / "final_model" / "model.safetensors")


def _evals(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r.get("eval_reward_mean"), r["selection_digest"]) for r in rows]


def _same_as_reference(work: Path, run: Path) -> None:
    assert _evals(run) == _evals(work / "ref")
    a, b = _weights(work / "ref"), _weights(run)
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a), "final weights differ"


def _submit(slurm, run: Path, model: Path) -> str:
    env = {**slurm.env, **ENV, "RFT_DS_PYTHON": sys.executable, "RFT_DS_ROOT": str(ROOT)}
    r = slurm.nodes.run(
        slurm.login,
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--output={run}.log",
            "launch/slurm/rft.sbatch",
            "launch/configs/tiny.yaml",
            f"model.model_path={model}",
            f"train.output_dir={run}",
            *RUN,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return r.stdout.strip().split(";")[0]


def _job(slurm, job: str) -> tuple[str | None, int]:
    out = slurm.run(["scontrol", "show", "job", job], check=False).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), int(fields.get("Restarts", "0"))


def _wait(slurm, job: str, run: Path, timeout: float = 600) -> tuple[str, int]:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        state, restarts = _job(slurm, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, restarts
        time.sleep(2)
    pytest.fail(f"job {job} still {state} after {timeout:.0f} s: " + Path(f"{run}.log").read_text()[-3000:])


def test_slurm_job_on_two_nodes_equals_one_node(slurm, work):
    run = work / "slurm"
    state, restarts = _wait(slurm, _submit(slurm, run, work / "model"), run)
    log = Path(f"{run}.log").read_text()
    assert state == "COMPLETED" and restarts == 0, log[-3000:]
    assert "on rftnode[1-2] (2 tasks)" in log, log[-3000:]
    _same_as_reference(work, run)


def test_preempted_slurm_job_requeues_and_resumes_on_two_nodes(slurm, work):
    run = work / "preempted"
    job = _submit(slurm, run, work / "model")
    metrics = run / "metrics.jsonl"
    t = time.monotonic()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() - t < 300, Path(f"{run}.log").read_text()[-3000:]
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", job], check=True)  # to both tasks, as --signal=USR1@... does
    t = time.monotonic()
    while _job(slurm, job) != ("PENDING", 1):  # requeued by rft.sbatch after the ranks exit 3
        assert time.monotonic() - t < 300 and _job(slurm, job)[0] != "COMPLETED", Path(f"{run}.log").read_text()[-3000:]
        time.sleep(0.5)
    t = time.monotonic()  # both nodes free again before the requeued job may start (its credential)
    while slurm.run(["sinfo", "-h", "-N", "-o", "%T"], check=True).stdout.split().count("idle") < 2:
        assert time.monotonic() - t < 120
        time.sleep(0.5)
    time.sleep(5)
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    state, restarts = _wait(slurm, job, run)
    log = Path(f"{run}.log").read_text()
    assert state == "COMPLETED" and restarts >= 1, log[-3000:]
    assert "checkpointed on a stop signal; requeueing" in log
    assert f"resumed from {run / 'checkpoints' / 'epoch_00002.'}" in log, log[-3000:]  # stopped inside epoch 3
    _same_as_reference(work, run)


def test_deepspeed_hostfile_launch_on_two_nodes(netns_nodes, work, tmp_path):
    _installed(
        lambda: sshd.skip_reason() or (None if shutil.which("pdsh") else "pdsh not installed"),
        "openssh-server",
        "openssh-client",
        "pdsh",
    )
    nodes = netns_nodes
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(nodes.hostfile(slots=1))
    # The pdsh launcher exports only a few variables to the other node (PYTHON*, MLFLOW*, ...): the rest goes
    # in a .deepspeed_env file (DS_ENV_FILE names it), as the README says.
    env_file = tmp_path / "ds_env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    run = work / "hostfile"
    with sshd.ssh_between(nodes):
        r = nodes.run(
            nodes.names[0],
            [
                str(Path(sys.executable).parent / "deepspeed"),
                "--hostfile",
                str(hostfile),
                "--master_port",
                "29632",
                "launch/train.py",
                "--config",
                "launch/configs/tiny.yaml",
                f"model.model_path={work / 'model'}",
                f"train.output_dir={run}",
                *RUN,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **ENV, "DS_ENV_FILE": str(env_file), "PDSH_RCMD_TYPE": "ssh"},
        )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "rftnode1: [rft_ds] epoch 5/5" in out, out[-3000:]  # rank 0 on the first node
    _same_as_reference(work, run)
