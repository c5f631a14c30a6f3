"""launch/slurm/rft.sbatch under a real Slurm (slurmctld + slurmd + munge on localhost, Debian packages).

The fixture installs the packages if missing, writes a one-node slurm.conf on free ports, starts the
daemons it needs and stops what it started. Then: one uninterrupted job; one job sent SIGUSR1 mid-run
(what --signal does before a time limit), which must checkpoint, exit 3, requeue itself, resume and end
with weights bit-identical to the uninterrupted job's."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rft_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(*cmd, check=True, env=None, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root")
    if not shutil.which("slurmctld"):
        _sh("apt-get", "update", "-qq", timeout=600)
        _sh("apt-get", "install", "-y", "-qq", "slurmd", "slurmctld", "munge", timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    started = []
    if _sh("bash", "-c", "munge -n | unmunge", check=False).returncode != 0:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        for d in ("/etc/munge", "/var/lib/munge", "/var/log/munge", "/run/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        _sh("runuser", "-u", "munge", "--", "munged")
        started.append("munged")
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=rftdstest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=600
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _sh("slurmctld", env=env)
    _sh("slurmd", env=env)
    for _ in range(60):
        if "idle" in _sh("sinfo", "-h", "-o", "%T", env=env, check=False).stdout:
            break
        time.sleep(1)
    else:
        pytest.fail("slurmd never became idle: " + (d / "slurmd.log").read_text()[-2000:])
    yield env
    _sh("scontrol", "shutdown", env=env, check=False)
    if "munged" in started:
        _sh("pkill", "-x", "munged", check=False)


def _job_state(env, job):
    out = _sh("scontrol", "show", "job", job, env=env, check=False).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), int(fields.get("Restarts", "0"))


def _submit(env, run: Path, *overrides) -> str:
    out = _sh("sbatch", "--parsable", "--ntasks=2", f"--output={run}.log", "launch/slurm/rft.sbatch",
              "launch/configs/tiny.yaml", f"model.model_path={run.parent / 'model'}", f"train.output_dir={run}",
              "train.epochs=8", "train.save_interval=1", "method.n_generations_per_prompt=8", "train.eval_interval=3",
              "sampler.chunk_prompts=4",  # 8 sampling chunks per rank on grow steps: most of an epoch is stop-safe
              *overrides, env={**env, "RFT_DS_PYTHON": os.environ.get("RFT_DS_PYTHON", os.sys.executable),
                               "RFT_DS_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}).stdout
    return out.strip().split(";")[0]


def _wait(env, job, run: Path, timeout=600):
    t = time.time()
    while time.time() - t < timeout:
        state, restarts = _job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, restarts
        time.sleep(2)
    pytest.fail(f"job {job} still {state} after {timeout}s: " + Path(f"{run}.log").read_text()[-3000:])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "final_model" / "model.safetensors")


def test_sbatch_runs_and_a_signalled_job_requeues_and_resumes_identically(slurm, tmp_path):
    ref = tmp_path / "ref"
    job = _submit(slurm, ref)
    state, restarts = _wait(slurm, job, ref)
    log = Path(f"{ref}.log").read_text()
    assert state == "COMPLETED" and restarts == 0, log[-3000:]
    assert len((ref / "metrics.jsonl").read_text().splitlines()) == 8
    assert (ref / "checkpoints" / "latest").read_text().strip() == "epoch_00007"
    assert "(2 tasks)" in log

    run = tmp_path / "pre"
    job = _submit(slurm, run)
    metrics = run / "metrics.jsonl"
    t = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() - t < 300, Path(f"{run}.log").read_text()[-3000:]
        time.sleep(0.2)
    _sh("scancel", "--signal=USR1", job, env=slurm)  # to the tasks, as --signal=USR1@... does: now in epoch 3
    # Slurm holds a requeued job for 120 s before it is eligible; an admin may start it at once.
    t = time.time()
    while _job_state(slurm, job) != ("PENDING", 1):
        assert time.time() - t < 300 and _job_state(slurm, job)[0] != "COMPLETED", Path(f"{run}.log").read_text()[-3000:]
        time.sleep(0.5)
    # Only once the previous run has left the node: a launch in the same second as the requeue finds the
    # job's credential revoked (the race Slurm's own 120 s hold avoids).
    t = time.time()
    while "idle" not in _sh("sinfo", "-h", "-o", "%T", env=slurm).stdout:
        assert time.time() - t < 120
        time.sleep(0.5)
    time.sleep(5)
    _sh("scontrol", "update", f"JobId={job}", "StartTime=now", env=slurm)
    state, restarts = _wait(slurm, job, run)
    log = Path(f"{run}.log").read_text()
    assert state == "COMPLETED" and restarts >= 1, log[-3000:]
    assert "checkpointed on a stop signal; requeueing" in log
    assert f"resumed from {run / 'checkpoints' / 'epoch_00002.s'}" in log, log[-3000:]  # stopped inside epoch 3
    a, b = _weights(ref), _weights(run)
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
