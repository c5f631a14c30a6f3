"""Checkpoints and resume: atomic writes, torn checkpoints skipped, kill -9 anywhere -> identical weights."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from rft_ds.checkpoint import STATE_FORMAT, CheckpointError, find_resume, resolve_resume, verify, write_manifest
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ---- fast: the on-disk protocol -------------------------------------------------------------------


def fake_checkpoint(root: Path, epoch: int, world_size: int = 2, position: list | None = None) -> Path:
    tmp = root / f".tmp-epoch_{epoch:05d}"
    (tmp / "ds").mkdir(parents=True)
    (tmp / "ds" / "shard0.pt").write_bytes(os.urandom(4096))
    (tmp / "rft_state.pt").write_bytes(os.urandom(512))
    (tmp / "meta.json").write_text(
        json.dumps(
            {
                "epoch": epoch,
                "world_size": world_size,
                "format": STATE_FORMAT,
                **({"position": position} if position else {}),
            }
        )
    )
    write_manifest(tmp)
    final = root / f"epoch_{epoch:05d}"
    tmp.rename(final)
    (root / "latest").write_text(final.name)
    return final


def test_truncated_checkpoint_is_detected_and_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    c1, c2 = fake_checkpoint(root, 1), fake_checkpoint(root, 2)
    assert verify(c2) is None and find_resume(root) == c2
    shard = c2 / "ds" / "shard0.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # torn on purpose
    assert "shard0.pt is 1000 bytes, manifest says 4096" in verify(c2)
    with pytest.warns(UserWarning, match="skipping checkpoint .*epoch_00002: ds/shard0.pt is 1000 bytes"):
        assert find_resume(root) == c1


def test_corrupted_bytes_fail_the_checksum(tmp_path):
    c = fake_checkpoint(tmp_path, 1)
    data = bytearray((c / "rft_state.pt").read_bytes())
    data[7] ^= 0xFF  # same size, one bit flipped
    (c / "rft_state.pt").write_bytes(bytes(data))
    assert verify(c) == "rft_state.pt fails its checksum"


def test_write_in_progress_is_never_a_candidate(tmp_path):
    root = tmp_path / "checkpoints"
    c1 = fake_checkpoint(root, 1)
    (root / ".tmp-epoch_00002" / "ds").mkdir(parents=True)  # a crash mid-write
    (root / "epoch_00003").mkdir()  # a directory without a manifest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_resume(root) == c1  # `latest` names an intact one: nothing else is looked at
    (root / "latest").unlink()  # no pointer (e.g. lost): newest first, damaged ones skipped with a warning
    with pytest.warns(UserWarning, match="epoch_00003: no manifest"):
        assert find_resume(root) == c1


def test_resume_argument_errors(tmp_path):
    assert resolve_resume(None, tmp_path, 2) is None
    assert resolve_resume("auto", tmp_path, 2) is None  # nothing to resume: a fresh run
    with pytest.raises(CheckpointError, match="--resume /nope: no such checkpoint directory"):
        resolve_resume("/nope", tmp_path, 2)
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="not a complete rft_ds checkpoint: no manifest"):
        resolve_resume(str(tmp_path / "junk"), tmp_path, 2)
    c = fake_checkpoint(tmp_path / "out" / "checkpoints", 4, world_size=2)
    assert resolve_resume(str(c), tmp_path, 2) == c
    assert resolve_resume("auto", tmp_path / "out", 2) == c
    assert resolve_resume(str(tmp_path / "out" / "checkpoints"), tmp_path, 2) == c
    with pytest.raises(
        CheckpointError, match="taken inside a sampling, scoring or training stage by 2 ranks; this run has 4"
    ):
        resolve_resume(str(c), tmp_path / "out", 4)  # a fixture without a position counts as mid-stage
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert resolve_resume("auto", tmp_path / "out", 4) is None
    end = fake_checkpoint(tmp_path / "out" / "checkpoints", 5, world_size=2, position=[6, 0, 0])
    assert resolve_resume("auto", tmp_path / "out", 4) == end  # an epoch's end resumes on any world size
    assert resolve_resume(str(end), tmp_path / "out", 1) == end


def test_resume_inside_sampling_with_other_engine_groups_is_refused(tmp_path):
    """Issue 31, 4: a checkpoint taken inside an epoch holds completions of each engine group's prompts;
    another sampler.tensor_parallel_size deals the prompts to other groups, so it is refused in one line
    (resume_force or not); at an epoch's end any number of groups resumes."""
    from rft_ds.config import ConfigError, RFTRunConfig
    from rft_ds.preflight import check_resume_groups

    def ckpt(name: str, position: list, groups: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "meta.json").write_text(
            json.dumps({"position": position, "shard": {"plan": "interleaved", "groups": groups}})
        )
        return d

    cfg = RFTRunConfig.from_dict({"model": {"model_path": "m"}, "sampler": {"tensor_parallel_size": 2}})
    cfg.train.resume_force = True
    inside = ckpt("inside", [2, "sample", 1], groups=2)  # 2 ranks, one rank per engine
    with pytest.raises(
        ConfigError, match="dealt to 2 engine groups; this run deals them to 1 .*tensor_parallel_size=1"
    ):
        check_resume_groups(inside, cfg, 2)
    check_resume_groups(ckpt("boundary", [3, "sample", 0], groups=2), cfg, 2)  # an epoch's end: fine
    check_resume_groups(ckpt("format3", [2, 3, 0], groups=2), cfg, 2)  # after training (eval): fine
    check_resume_groups(ckpt("same", [2, "train", 4], groups=1), cfg, 2)  # the same groups
    cfg.sampler.backend = "hf"  # one group a rank
    check_resume_groups(inside, cfg, 2)


def test_elastic_positions():
    from rft_ds.checkpoint import elastic

    assert elastic((3, "sample", 0)) and all(elastic((3, s, 0)) for s in ("sync", "eval", "end"))
    assert not elastic((3, "sample", 2)) and not elastic((3, "score", 0)) and not elastic((3, "train", 0))
    # meta.json of state format 3: the stages by number, score not among them
    assert elastic((3, 0, 0)) and elastic((3, 2, 0)) and elastic((3, 3, 0)) and elastic((3, 4, 0))
    assert not elastic((3, 0, 2)) and not elastic((3, 1, 0)) and not elastic((3, 1, 5))


# ---- slow: real runs killed with SIGKILL and resumed ------------------------------------------------

COMMON = [
    "train.epochs=6",
    "train.save_interval=1",
    "train.keep_last=2",
    "method.n_generations_per_prompt=8",
    "train.eval_interval=2",
    "sampler.chunk_prompts=8",
    # the base model's answers replayed as a quarter of each epoch's rows: a resume replays the same
    "data.replay_prompts=rft_ds.toy:eval_prompts",
    "method.replay_share=0.25",
    # 40 of the 64 prompts per grow step from seeded passes, minus the prompts the skip rules leave out: a
    # resume continues the pass and the history
    "data.prompts_per_grow_step=40",
    "method.skip_solved=1",
    "method.skip_hopeless=1",
    "method.skip_retry_after=2",
    "method.pass_score=0.5",
    "selection.drop_solved=true",
]


def _run(run: Path, *extra: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    """Two ranks started without a launcher (tests/ranks.py): this file launches a dozen times."""
    model, config = f"model.model_path={run.parent / 'model'}", "launch/configs/tiny.yaml"
    args = ["launch/train.py", "--config", config, model, f"train.output_dir={run}"]
    return run_ranks(2, [*args, *COMMON, *extra], env=env, timeout=timeout)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            k: v
            for k, v in r.items()
            if not k.startswith("time_") and k != "tokens_per_s_per_device" and not k.endswith("_gb")
        }
        for r in rows
    ]  # wall time and memory differ between runs


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_stop_or_kill_anywhere_then_resume_gives_identical_weights(tmp_path):
    """A model WITH dropout (so the training RNG matters): stopped by SIGUSR1 mid-sampling, between scoring and
    training (the stale check's probes and the pools carried to the train stage) and mid-training,
    SIGKILLed mid-sync and mid-save, resumed each time from what was saved (mid-epoch
    checkpoints included), and the final weights and metrics are those of the uninterrupted run. (This is
    also the reproducibility test: the first epochs of the two runs are independent runs of one seed.)"""
    from rft_ds.toy import build_tiny_model

    build_tiny_model(tmp_path / "model", attention_dropout=0.1)
    ref = tmp_path / "ref"
    p = _run(ref)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    run = tmp_path / "stopped"
    # 1. SIGUSR1 on rank 0 before the 2nd sampling chunk of epoch 2 (a grow step): saved after that chunk
    p = _run(run, env={"RFT_DS_STOP_AT": "sample:2:2"})
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert _latest(run) == "epoch_00002.sample.c000002"
    # 2. resume mid-sampling, SIGUSR1 while scoring epoch 2: saved at the safe point after the score stage, before
    # any step. (A SIGKILL mid-scoring, like the one mid-sync below, loses the stage in flight and writes nothing.)
    p = _run(run, "--resume", "auto", env={"RFT_DS_STOP_AT": "score:2"})
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "at epoch 3/6 (sample 2)" in p.stdout
    assert _latest(run) == "epoch_00002.train.c000000"
    # 3. resume, SIGUSR1 on rank 1 before the 2nd optimizer step of epoch 2: saved after it
    p = _run(run, "train.resume=auto", env={"RFT_DS_STOP_AT": "train:2:2", "RFT_DS_STOP_RANK": "1"})
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert _latest(run) == "epoch_00002.train.c000002"
    # 4. resume with a checkpoint every 2 optimizer steps, SIGKILL at the sync of epoch 3
    p = _run(run, "train.resume=auto", "train.save_every_steps=2", env={"RFT_DS_DIE_AT": "sync:3"})
    assert p.returncode != 0 and _latest(run).startswith("epoch_00003.train.c"), _latest(run)
    # 5. resume, SIGKILL while writing the checkpoint after epoch 4: never loaded, the previous one stays
    p = _run(run, "train.resume=auto", env={"RFT_DS_DIE_AT": "checkpoint:5"})
    assert p.returncode != 0 and _latest(run) == "epoch_00003"
    assert (run / "checkpoints" / ".tmp-epoch_00004").is_dir()
    # 6. resume at that epoch boundary and finish: it trains the rest, it does not stop "successfully" at once
    p = _run(run, "train.resume=auto")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "at epoch 5/6 (sample)" in p.stdout and "epoch 6/6" in p.stdout

    a, b = _weights(ref / "final_model"), _weights(run / "final_model")
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after stop/kill/resume"
    assert _metrics(ref) == _metrics(run)  # the whole history, the resumed epochs included
    grows = [m for m in _metrics(ref) if m["grow_step"]]
    assert grows[0]["prompts_drawn"] == 40 and all(m["prompts_drawn"] <= 40 for m in grows)
    assert sum(m["prompts_skipped_hopeless"] for m in grows) > 0  # the skip rules were at work
    # a quarter of the rows (n_rows + replay_rows), at most the 32 replay prompts
    assert all(m["replay_rows"] == min(32, round(m["n_rows"] / 3)) for m in _metrics(ref))
    saved = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time_checkpoint"] > 0 and r["time_epoch"] >= r["time_checkpoint"] for r in saved)  # (vi)

    # 7. a finished run resumed with nothing left to do says so and trains nothing
    p = _run(run, "train.resume=auto")
    assert p.returncode == 0 and "nothing left to train for train.epochs=6" in p.stdout, p.stdout[-2000:]
    assert len(_metrics(run)) == 6

    # Export: the newest checkpoint -> an HF directory equal to the trained model, that vLLM serves alike.
    out = tmp_path / "export"
    p = subprocess.run(
        [sys.executable, "-m", "rft_ds.export", str(run), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    e = _weights(out)
    assert sorted(e) == sorted(a) and all((e[k] == a[k]).all() for k in a)
    p = subprocess.run(
        [sys.executable, "tests/dist/export_logits.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    diff = float(next(line for line in p.stdout.splitlines() if line.startswith("MAX_ABS_LOGPROB_DIFF")).split()[1])
    assert diff < 1e-4, diff


def _launch(n: int, run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "launch/train.py",
        "--config",
        "launch/configs/tiny.yaml",
        f"model.model_path={run.parent / 'model'}",
        f"train.output_dir={run}",
        "train.save_interval=1",
        "train.keep_last=8",  # epoch_00000 stays, to be verified untouched
        "method.n_generations_per_prompt=4",
        "train.eval_interval=0",
        "train.plots=false",
        "data.replay_prompts=rft_ds.toy:eval_prompts",
        # a budget and a skip rule: the pass position and the prompt history cross the world-size change
        "data.prompts_per_grow_step=48",
        "method.skip_hopeless=1",
        "method.pass_score=0.5",
    ]
    return run_ranks(n, [*args, *extra])


@pytest.mark.slow
def test_elastic_resume_on_another_world_size(tmp_path):
    """A checkpoint written by 2 ranks resumes on 1, and one written by 1 on 2 (DeepSpeed's universal
    checkpoint: weights and Adam state repartitioned; each old rank's pool shard taken over by one new
    rank). The improve epoch after it selects from the same pools exactly as the same-size resume does, and
    the next grow step draws the same prompts (the draw's position and history are in the shared state)."""
    import shutil

    ga = {1: "train.gradient_accumulation_steps=2", 2: "train.gradient_accumulation_steps=1"}
    improve = "method.n_improve_steps=3"  # epoch 0 grows, epochs 1 and 2 train on the same pools

    def resume(n: int, src: Path, dst: Path, epochs: int) -> subprocess.CompletedProcess:
        shutil.copytree(src, dst)
        # the batch settings are fields a resume must not change silently: --resume-force says it is meant
        p = _launch(n, dst, f"train.epochs={epochs}", ga[n], improve, "--resume", "auto", "--resume-force")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p

    def same_end(a: Path, b: Path, at: int = -1) -> dict:
        ma, mb = _metrics(a), _metrics(b)
        assert ma[:at] == mb[:at]  # the restored history
        for key in ("pool_size", "n_selected", "n_rows", "selection_digest", "train_steps", "replay_rows"):
            assert ma[at][key] == mb[at][key], key  # the same pools (every old rank's shard) and selection
        # Which rows make up each optimizer step depends on which rank holds them (rows are trained where
        # their tokens are), so the loss and weights after the resume differ from the same-size resume's.
        assert np.isfinite(mb[at]["train_loss"]) and (b / "final_model").is_dir()
        return mb[at]

    first = tmp_path / "first"
    p = _launch(2, first, "train.epochs=1", ga[2], improve)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resume(2, first, tmp_path / "two", 4)
    p = resume(1, first, tmp_path / "one", 4)  # 2 -> 1
    assert "at epoch 2/4 (sample) on 1 ranks, written by 2" in p.stdout
    assert (tmp_path / "one" / "checkpoints" / ".universal" / "epoch_00000" / "ds").is_dir()
    assert verify(tmp_path / "one" / "checkpoints" / "epoch_00000") is None  # the checkpoint itself untouched
    same_end(tmp_path / "two", tmp_path / "one", at=1)
    # epoch 3 grows: the same draw on 1 rank as on 2 (48 of 64 prompts: the rest of pass 0, then pass 1)
    draw = ("prompts_drawn", "draw_pass", "prompts_skipped_hopeless", "prompts_skipped_solved")
    ma, mb = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [ma[3][k] for k in draw] == [mb[3][k] for k in draw] and ma[3]["draw_pass"] == 1, (ma[3], mb[3])
    assert mb[3]["prompts_skipped_hopeless"] > 0  # epoch 0's failures, remembered across 2 -> 1
    resume(1, tmp_path / "one", tmp_path / "one_more", 5)
    p = resume(2, tmp_path / "one", tmp_path / "two_more", 5)  # 1 -> 2: the new rank 1 has an empty pool shard
    assert "at epoch 5/5 (sample) on 2 ranks, written by 1" in p.stdout
    end = same_end(tmp_path / "one_more", tmp_path / "two_more")
    assert end["rows_moved"] == end["n_rows"] // 2  # rank 0 holds every token: half its rows go to rank 1
