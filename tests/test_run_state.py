"""The run state's pure parts: the Slurm deadline, the resume config check, dropout detection, seeds."""

from __future__ import annotations

from rft_ds.config import RFTRunConfig, resume_changes
from rft_ds.recipe import deadline_reached
from rft_ds.run_state import STAGES, RunState, advance
from rft_ds.samples import sample_seed
from rft_ds.slurm import job_end_time, parse_end_time


def test_deadline_budget_is_longest_step_plus_last_save_plus_margin():
    end = 10_000.0
    assert not deadline_reached(now=9_000, job_end=end, longest_step_s=300, last_save_s=200, margin_s=120)
    assert deadline_reached(now=9_380, job_end=end, longest_step_s=300, last_save_s=200, margin_s=120)
    assert deadline_reached(now=9_381, job_end=end, longest_step_s=300, last_save_s=200, margin_s=120)
    assert deadline_reached(now=10_500, job_end=end, longest_step_s=0, last_save_s=0, margin_s=0)  # already late


def test_slurm_end_time():
    assert job_end_time({}) is None  # not under Slurm
    assert job_end_time({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1790000000"}) == 1790000000.0
    assert parse_end_time("N/A") is None and parse_end_time("Unknown") is None and parse_end_time("") is None
    import datetime

    assert parse_end_time("2026-11-25T21:00:00\n") == datetime.datetime(2026, 11, 25, 21).timestamp()
    # squeue missing (no Slurm on this machine): None, not an error
    assert job_end_time({"SLURM_JOB_ID": "7"}, squeue="/nonexistent/squeue") is None


def test_resume_changes_lists_the_fields_that_matter():
    base = {"model": {"model_path": "m"}}
    a = RFTRunConfig.from_dict(base).to_dict()
    same = RFTRunConfig.from_dict(
        {
            **base,
            "train": {"epochs": 99, "output_dir": "elsewhere", "save_interval": 2, "eval_interval": 3, "keep_last": 1},
        }
    ).to_dict()
    assert resume_changes(a, same) == []  # more epochs, another output dir, other save/eval cadence: fine
    b = RFTRunConfig.from_dict(
        {
            **base,
            "train": {"seed": 7},
            "method": {"n_generations_per_prompt": 8},
            "selection": {"strategy": "top_k"},
            "data": {"system_prompt": "Be brief."},
        }
    ).to_dict()
    assert resume_changes(a, b) == [
        "data.system_prompt (None -> 'Be brief.')",
        "method.n_generations_per_prompt (32 -> 8)",
        "selection.strategy ('per_prompt' -> 'top_k')",
        "train.seed (1000 -> 7)",
    ]


def test_sampling_chunks_have_their_own_streams():
    seeds = {sample_seed(1000, e, r, stream, c) for e in (0, 1) for r in (0, 1) for stream in (0, 1) for c in (0, 1, 2)}
    assert len(seeds) == 24


def test_run_state_position_orders_stages():
    from rft_ds.checkpoint import checkpoint_name, position_of

    st = RunState(run_id="x", prompts_digest="d", epoch=3, stage="train", cursor=12)
    assert st.position() == (3, "train", 12) and checkpoint_name(*st.position()) == "epoch_00003.train.c000012"
    later = RunState(run_id="x", prompts_digest="d", epoch=3, stage="eval").position()
    assert position_of(checkpoint_name(*later)) > position_of(checkpoint_name(*st.position()))
    assert position_of(checkpoint_name(4, "sample", 0)) == (4, 0, 0) and checkpoint_name(4) == "epoch_00003"
    # state format 3 numbered the stages without score: its names still order among the new ones
    assert position_of("epoch_00003.s1.c000012") == position_of("epoch_00003.train.c000012")
    assert (
        position_of("epoch_00003.s0.c000002")
        < position_of("epoch_00003.score.c000000")
        < position_of("epoch_00003.s1.c000001")
    )
    # a stage number no format had is not a checkpoint's name (listing and pruning skip it), nor elastic
    assert position_of("epoch_00001.s7.c000001") is None and position_of("epoch_00001.bogus.c000001") is None
    from rft_ds.run_state import elastic

    assert not elastic((3, 7, 0)) and not elastic((3, "bogus", 0))
    assert not {"local", "pool", "table"} & set(st.shared())  # per rank, or rebuilt from every rank's pool


def test_stages_advance_in_table_order():
    """The loop's order is STAGES; after the last stage, the next epoch starts with an empty record."""
    st = RunState(run_id="x", prompts_digest="d", epoch=2, record={"a": 1}, local={"b": 2})
    seen = []
    for _ in STAGES:
        seen.append(st.stage)
        st.cursor = 5
        advance(st)
    assert tuple(seen) == STAGES == ("sample", "score", "train", "sync", "eval", "end")
    assert (st.epoch, st.stage, st.cursor, st.record, st.local) == (3, "sample", 0, {}, {})


def test_every_stage_has_its_function():
    from rft_ds.recipe import STAGE_FNS, Outcome

    assert tuple(STAGE_FNS) == STAGES and {Outcome.DONE, Outcome.STOPPED} == set(Outcome)


def test_cuda_rng_state_is_saved_and_restored():
    """(ii) the GPU's generator is part of the RNG a checkpoint carries (here the fake cuda:0's)."""
    import torch

    from rft_ds.checkpoint import rng_state, set_rng_state
    from tests.fake_cuda import fake_cuda

    with fake_cuda():
        torch.cuda.manual_seed(5)
        saved = rng_state()
        assert "cuda" in saved
        before = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(6)
        assert not torch.equal(torch.cuda.get_rng_state(), before)
        set_rng_state(saved)
        assert torch.equal(torch.cuda.get_rng_state(), before)
    assert "cuda" not in rng_state()  # no GPU: nothing to save


def test_fault_injection_fires_once_at_its_pass(monkeypatch):
    import signal

    from rft_ds import faults

    sent = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(faults, "_passes", {})
    monkeypatch.setenv("RFT_DS_STOP_AT", "train:2:3")
    for _ in range(5):
        faults.maybe_die("train", 2)
        faults.maybe_die("sample", 2)
    assert sent == [signal.SIGUSR1]  # the 3rd pass of train in epoch 2, nothing else (no SIGKILL: DIE_AT unset)
    monkeypatch.setenv("RFT_DS_DIE_AT", "sample:4")
    faults.maybe_die("sample", 4)
    faults.maybe_die("sample", 4)
    assert sent == [signal.SIGUSR1, signal.SIGKILL]


def test_best_model_belongs_to_a_run(tmp_path, capsys):
    """(v) best_model/ says which run wrote it; another run's is never taken for this one's."""
    import json

    from rft_ds.artifacts import best_model_run as _best_model_run
    from rft_ds.artifacts import warn_foreign_best_model as _warn_foreign_best_model

    assert _best_model_run(tmp_path) is None  # none yet
    (tmp_path / "best_model").mkdir()
    assert _best_model_run(tmp_path) is None  # written before run ids existed: unknown
    (tmp_path / "best_model" / "rft_ds_run.json").write_text(json.dumps({"run_id": "abc", "epoch": 3}))
    assert _best_model_run(tmp_path) == "abc"
    _warn_foreign_best_model(tmp_path, "def")
    assert "holds run abc's weights, not this run's (def)" in capsys.readouterr().out


def test_resumed_best_is_decided_once_for_every_rank(tmp_path):
    """Issue 31, 6: whether best_model/ is still this run's decides a save every rank joins, so rank 0 reads
    the mark and every rank takes its answer (here rank 1's view of the directory has no mark at all)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from rft_ds.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    p = subprocess.run(
        cmd + ["tests/dist/best_agree.py", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a == b and a is not None and a["run_id"] == "run1"


def test_the_first_save_before_a_deadline_is_estimated_from_a_measured_write(tmp_path):
    """Before any checkpoint, Slurm's deadline check used 0 s for the save: a run could stop too late for its
    first checkpoint. Now it is this rank's checkpoint bytes over a probe's measured write+fsync+checksum."""
    from types import SimpleNamespace

    import torch

    from rft_ds.checkpoint import own_bytes, save_time_estimate

    module = torch.nn.Linear(10, 10)  # 110 fp32 parameters: 4 bytes as weights, 12 as master copy and Adam's
    module.bias.requires_grad_(False)  # frozen: not in the optimizer's state (LoRA's base)
    assert own_bytes(SimpleNamespace(module=module)) == 100 * (4 + 12)
    probe = 1 << 20
    est = save_time_estimate(tmp_path / "checkpoints", 64 * probe, probe_bytes=probe)
    assert est > 0 and list((tmp_path / "checkpoints").iterdir()) == []  # the probe is gone
    assert save_time_estimate(tmp_path / "checkpoints", 0, probe_bytes=probe) == 0


def test_the_engine_sleeps_before_the_rows_are_exchanged(monkeypatch):
    """GPU sleep mode: the engine's memory must be free before rows_for_rank's all_to_all allocates its buffers
    (under tensor parallelism vLLM holds much of the GPU until it sleeps), not only before training."""
    from types import SimpleNamespace

    from rft_ds import recipe

    calls = []

    class Engine:
        def sleep(self) -> None:
            calls.append("sleep")

    class Exchanged(Exception):
        pass

    def rows_for_rank(*args, **kwargs):
        calls.append("exchange")
        raise Exchanged

    monkeypatch.setattr(recipe, "rows_for_rank", rows_for_rank)
    cfg = RFTRunConfig()
    s = SimpleNamespace(
        cfg=cfg,
        rt=SimpleNamespace(weight_sync=object(), learner=object()),
        sampler=Engine(),
        rollout=None,
        prompts=_store(["ab"]),
        tokenizer=SimpleNamespace(eos_token_id=2),
        max_len=64,
    )
    st = RunState(run_id="r", prompts_digest="d", stage="train")
    try:
        recipe.learn(s, st)
    except Exchanged:
        pass
    assert calls == ["sleep", "exchange"]


def _store(texts: list) -> object:
    from tests.test_failing_together import _store as store

    return store(texts)


def test_engine_defaults_follow_the_device():
    from rft_ds.build import engine_defaults

    assert engine_defaults("auto", "auto", cuda=True) == (False, True)  # CUDA graphs, sleep mode
    assert engine_defaults("auto", "auto", cuda=False) == (True, False)  # vLLM-CPU has neither
    assert engine_defaults(True, False, cuda=True) == (True, False)  # an explicit value wins
    assert RFTRunConfig().train.save_every_minutes == 30  # a periodic checkpoint by default


def test_reward_concurrency_is_a_budget_per_node():
    from rft_ds.distributed import node_share

    assert node_share(8, {"LOCAL_WORLD_SIZE": "8"}) == 1  # 8 ranks on the node: 8 calls in flight from it
    assert node_share(8, {"LOCAL_SIZE": "2"}) == 4  # the deepspeed launcher's name for it
    assert node_share(8, {"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"}) == 2  # srun
    assert node_share(8, {}) == 8 and node_share(3, {"LOCAL_WORLD_SIZE": "8"}) == 1  # one rank; at least 1
