"""A rank that fails where the others cannot see it: they leave within seconds (not the process-group
timeout), and the terminal shows one line for it, naming the rank, the cause and the log."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def test_a_rank_waiting_in_a_collective_leaves_when_a_peer_posts_its_failure():
    t0 = time.monotonic()
    p = run_ranks(2, ["tests/dist/peer_watch.py", "posted", "2"], timeout=100)
    secs = time.monotonic() - t0
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "the barrier returned" not in p.stdout
    assert (
        "rft_ds: rank 0 stops: rank 1: RuntimeError: CUDA out of memory (injected); it was waiting in a collective"
        in p.stderr
    ), p.stderr[-2000:]
    assert secs < 60, f"rank 0 left after {secs:.0f} s: it waited for the process-group timeout (120 s)"


def test_a_rank_stuck_after_its_own_failure_leaves_and_says_its_error():
    t0 = time.monotonic()
    p = run_ranks(2, ["tests/dist/peer_watch.py", "own"], timeout=100)
    assert p.returncode == 1 and time.monotonic() - t0 < 40, p.stdout[-2000:] + p.stderr[-2000:]
    line = (
        "rft_ds: error (rank 1): RuntimeError: CUDA out of memory (injected) (the other ranks were not at that point)"
    )
    assert line in p.stderr.splitlines(), p.stderr[-2000:]


def test_ranks_wait_for_rank_0s_long_work_on_the_store_not_in_a_collective():
    """A metric_fn that runs longer than the process-group timeout on rank 0: the others wait on the store."""
    p = run_ranks(2, ["tests/dist/peer_watch.py", "release"], timeout=100)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "rank 0 passed the barrier" in p.stdout and "rank 1 passed the barrier" in p.stdout


def test_metric_fn_is_bounded_by_the_reward_timeout():
    from types import SimpleNamespace

    from rft_ds.evaluation import _run_metric_fn
    from rft_ds.reward_terms import RewardError

    data = SimpleNamespace(texts=["1+1=", "2+2="], metadata=[{"answer": "2"}, {"answer": "4"}])

    def ev(fn):
        return SimpleNamespace(spec=SimpleNamespace(name="eval"), prompts=data, metric_fn=fn)

    gathered = [([1], ["4"]), ([0], ["2"])]  # rank 0's and rank 1's outputs: metric_fn sees them in prompt order
    seen = _run_metric_fn(ev(lambda outputs, answer, **kw: {"acc": float(outputs == answer)}), gathered, 5.0)
    assert seen == {"acc": 1.0}
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"metric_fn of eval set eval timed out after 0.3 s \(reward.timeout_s\)"):
        _run_metric_fn(ev(lambda **kw: time.sleep(30)), gathered, 0.3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(RewardError, match="must return a dict, got list"):
        _run_metric_fn(ev(lambda **kw: [1]), gathered, None)


@pytest.mark.parametrize(
    "fault,cause",
    [
        ("RFT_DS_ABORT_AT", "Fatal Python error: Aborted"),
        ("RFT_DS_DIE_AT", "no Python error: killed (SIGKILL"),
    ],
)
def test_a_rank_that_dies_without_a_python_error_is_named_on_the_terminal(tmp_path, fault, cause):
    """A native abort (an NCCL watchdog's SIGABRT, a failed C++ check) or a SIGKILL leaves no Python error to
    report, and the rank's stderr is its log: its death watcher says it, with faulthandler's cause."""
    run = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            "launch/configs/tiny.yaml",
            f"model.model_path={tmp_path / 'model'}",
            f"train.output_dir={run}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, fault: "start:0", "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode < 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = run / "logs" / "rank0.log"
    line = f"rft_ds: error (rank 0): the process died: {cause}"
    errors = [x for x in p.stderr.splitlines() if x.startswith("rft_ds: error")]
    assert len(errors) == 1 and errors[0].startswith(line) and errors[0].endswith(f"its last output is in {log}"), (
        p.stderr[-2000:]
    )
    if fault == "RFT_DS_ABORT_AT":  # the Python stacks are in the log
        assert "Fatal Python error: Aborted" in log.read_text() and "File " in log.read_text()


def test_an_engine_error_while_sampling_is_every_ranks_error(monkeypatch):
    """vLLM's generate is local work: a rank whose engine raises must not leave the others in the next
    collective, so the sampling call runs inside all_ranks_or_fail and every rank raises the failing rank's
    error (with one process: rank 0's), named by stage."""
    from types import SimpleNamespace

    from rft_ds import recipe
    from rft_ds.config import RFTRunConfig
    from rft_ds.distributed import RankError
    from rft_ds.run_state import RunState

    class Engine:
        last_preemptions = 0

        def generate(self, *args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    cfg = RFTRunConfig()
    s = SimpleNamespace(
        cfg=cfg,
        rt=SimpleNamespace(weight_sync=None),
        sampler=Engine(),
        rollout=None,
        prompts=_store(["ab"]),
        group=0,
        n_groups=1,
        show=False,
    )
    with pytest.raises(RankError, match=r"^sampling failed on rank 0: RuntimeError: CUDA error: an illegal memory"):
        recipe.sample(s, RunState(run_id="r", prompts_digest="d"))


def _store(texts: list) -> object:
    """Training prompts as a run holds them (prompt_store), each tokenized to [5, 6]."""
    from rft_ds.prompt_store import ListRows, PromptStore

    store = PromptStore(ListRows(texts), "prompts", "prompt", None)
    store.set_format(lambda text, add_special_tokens: {"input_ids": [5, 6]}, 8, False, None)
    return store


@pytest.mark.slow
@pytest.mark.parametrize(
    "point,said",
    [
        # between a training step's collectives: rank 1 posts its error; rank 0, in the step's first all-gather,
        # loses its peer and logs why without a second line on the terminal
        ("train", "rft_ds: error (rank 1): RuntimeError: injected failure at train in epoch 0 (RFT_DS_RAISE_AT)"),
    ],
)
def test_an_error_on_one_rank_stops_every_rank_and_is_said_once(tmp_path, point, said):
    from tests.test_e2e import launch

    p, secs = launch(
        tmp_path,
        "sampler.backend=hf",  # the cheaper start
        "train.dist_timeout_s=300",
        timeout=300,
        env_extra={"RFT_DS_RAISE_AT": f"{point}:0", "RFT_DS_RAISE_RANK": "1"},
        launcher=False,
    )
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("rft_ds: error")]
    assert p.returncode == 1 and len(errors) == 1 and errors[0].startswith(said), out[-3000:]
    log0 = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "injected failure" in log0  # rank 0's own account of why it stopped, in its log
    print(f"{point}: both ranks ended {secs:.0f} s after the launch")


@pytest.mark.slow
def test_a_checkpoint_write_failing_on_one_rank_stops_every_rank_and_keeps_the_previous_one(tmp_path):
    """Rank 1's disk fills up inside DeepSpeed's save_checkpoint (its optimizer shard), while rank 0 writes
    its files and waits in DeepSpeed's closing barrier: both stop within seconds with rank 1's error, and
    `latest` still names the previous checkpoint, complete."""
    from rft_ds.checkpoint import verify

    run = tmp_path / "run"
    t0 = time.monotonic()
    p = run_ranks(
        2,
        [
            "tests/dist/write_fails.py",
            "--config",
            "launch/configs/tiny.yaml",
            f"model.model_path={tmp_path / 'model'}",
            f"train.output_dir={run}",
            "sampler.backend=hf",
            "method.n_generations_per_prompt=4",
            "train.epochs=3",
            "train.save_interval=1",
            "train.eval_interval=0",
            "train.save_best_model=false",
            "train.dist_timeout_s=300",
        ],
        env={"RFT_DS_TEST_FAIL_RANK": "1", "RFT_DS_TEST_FAIL_AT": "2"},
        timeout=280,
    )
    secs = time.monotonic() - t0
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("rft_ds: error")]
    assert p.returncode == 1 and len(errors) == 1, out[-3000:]
    assert (
        errors[0].startswith(
            "rft_ds: error (all 2 ranks): checkpoint write (the previous checkpoint is intact) failed on rank 1: "
        )
        and "No space left on device" in errors[0]
    ), errors
    root = run / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert latest == "epoch_00000" and verify(root / latest) is None, latest  # the first save, complete
    assert not (root / "epoch_00001").exists()
    print(f"a failed write on rank 1 ended both ranks; the launch took {secs:.0f} s")
