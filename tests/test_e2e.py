"""Real runs: the `deepspeed` launcher, 2 CPU ranks, ZeRO-3 over gloo, the tiny model (slow)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rft_ds.distributed import free_port
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def launch(tmp_path, *overrides, timeout=600, env_extra=None, module=False, launcher=True):
    """2 ranks through the deepspeed launcher, or (launcher=False) started without one (tests/ranks.py), for
    the runs whose subject is not the launcher: ~5-8 s less a run."""
    entry = (
        ["--module", "rft_ds", "train", "launch/configs/tiny.yaml"]
        if module
        else ["launch/train.py", "--config", "launch/configs/tiny.yaml"]
    )
    rest = [f"model.model_path={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    t = time.time()
    if not launcher:
        p = run_ranks(2, [*(["-m", *entry[1:]] if module else entry), *rest], env=env, timeout=timeout)
        return p, time.time() - t
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    p = subprocess.run([*cmd, *entry, *rest], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return p, time.time() - t


# What the console may hold: rft_ds's lines, tqdm bars, and the DeepSpeed launcher's own lines (its runner
# and launch.py processes, which are not ranks)
CONSOLE = re.compile(
    r"\[rft_ds\] |rft_ds: |[\w :/.-]+: +\d+%\||"
    r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\] \[(runner|launch|real_accelerator)\.py:"
)


def foreign_console_lines(out: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", out) if line.strip() and not CONSOLE.match(line.strip())]


def read_metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def check_run(tmp_path, epochs, loss_drop):
    m = read_metrics(tmp_path)
    assert [r["epoch"] for r in m] == list(range(epochs))
    for r in m:  # the metrics contract
        for key in (
            "epoch",
            "grow_step",
            "percentile",
            "n_sampled",
            "n_selected",
            "reward_mean",
            "train_loss",
            "time_sample",
            "time_score",
            "time_select",
            "time_train",
        ):
            assert key in r, key
        assert len(set(r["selection_digest_per_rank"])) == 1, r  # both ranks selected the same
        assert len(set(r["train_steps_per_rank"])) == 1, r  # and ran the same number of steps
    assert [r["grow_step"] for r in m[:4]] == [True, False, True, False]
    assert m[1]["percentile"] == pytest.approx(0.95)
    assert m[0]["n_sampled"] == 64 * 32 and m[1]["n_sampled"] == 0
    assert m[-1]["train_loss"] < m[0]["train_loss"] - loss_drop
    assert "eval_frac_mostly_target" in m[-1]  # metric_fn ran
    assert all(r["peak_rss_gb"] >= r["rss_gb"] > 0.2 for r in m)  # memory of the largest rank, per epoch
    return m


def test_two_rank_zero3_vllm_run_learns(tmp_path):
    p, secs = launch(tmp_path, "train.epochs=14", "train.eval_interval=7", "train.progress=true")  # 0.040 -> 0.354
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # a quiet console: rft_ds's lines and bars; what vLLM, DeepSpeed and transformers print is in each rank's log
    out = p.stdout + p.stderr
    assert foreign_console_lines(out) == [], foreign_console_lines(out)[:20]
    ours = [line for line in p.stdout.splitlines() if line.startswith("[rft_ds]")]
    assert ours[0].startswith("[rft_ds] each rank's full output (vLLM, DeepSpeed, transformers, ...): "), ours[:3]
    assert re.search(r"epoch 1: train: +\d+%\|", p.stderr)
    logs = {r: (tmp_path / "run" / "logs" / f"rank{r}.log").read_text() for r in (0, 1)}
    assert all("Initializing a V1 LLM engine" in text for text in logs.values())  # vLLM's own, per rank
    assert "Setting accelerator to CPU" in logs[1] and "[rft_ds] epoch 14/14" in logs[0]
    m = check_run(tmp_path, 14, loss_drop=0.5)
    before, after = m[0]["eval_reward_mean_initial"], m[-1]["eval_reward_mean"]
    assert after > before + 0.15, (before, after)
    # the colocated engines got the trained weights each epoch, checked against the model on the first sync
    assert all(r["sync_bytes"] > 0 for r in m) and m[0]["parity_max_diff"] < 1e-3
    assert m[0]["time_sync_start"] > 0  # the engine started from dummy weights; the learner's filled it, checked
    # every grow step, the engine's log p of what it sampled equals the learner's first forward (fp32)
    checked = [(r["epoch"], r["stale_logprob_tokens"], r.get("stale_logprob_mean_diff")) for r in m if r["grow_step"]]
    assert checked[0][1] > 100 and all(n == 0 or d < 1e-4 for _, n, d in checked), checked
    assert "stale_logprob_tokens" not in m[1]  # improve steps sample nothing: nothing to compare
    final = tmp_path / "run" / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    print(f"2-rank vLLM run: {secs:.0f}s, eval reward {before:.3f} -> {after:.3f}")


def test_stale_engine_weights_stop_the_run(tmp_path):
    """The parity check runs on the first sync only; a later sync that hands the engine a wrong tensor is
    caught at the next grow step by comparing its sampling log p with the learner's first forward."""
    # the run's third sync: the first fills the engine at start, the third follows epoch 2 (epoch 3 is a grow step)
    env_extra = {"RFT_DS_CORRUPT_SYNC": "3"}
    p, _ = launch(
        tmp_path,
        "train.epochs=3",
        "method.n_generations_per_prompt=8",
        "train.eval_interval=0",
        timeout=400,
        env_extra=env_extra,
        launcher=False,
    )
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("rft_ds: error")]  # every rank's, said once
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("rft_ds: error (all 2 ranks): stale weights: the engine's log-probabilities of")
    assert "> sampler.stale_tolerance 0.001" in out
    m = read_metrics(tmp_path)  # epochs 1 and 2 were logged, the first grow step with a healthy engine
    assert len(m) == 2 and m[0]["stale_logprob_mean_diff"] < 1e-4


def test_two_rank_zero3_hf_sampler_run_learns(tmp_path):
    # under a Slurm job that ends in a day: the first save's estimate is measured at start (every rank probes
    # the disk, one all_reduce) and every safe point checks the deadline; nothing else changes
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": str(int(time.time()) + 86400)}
    p, secs = launch(
        tmp_path, "sampler.backend=hf", "train.epochs=10", "train.eval_interval=10", env_extra=slurm, launcher=False
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = check_run(tmp_path, 10, loss_drop=0.3)
    assert "sync_bytes" not in m[0]  # HF generate runs on the trained module: nothing to hand over
    before, after = m[0]["eval_reward_mean_initial"], m[-1]["eval_reward_mean"]
    assert after > before + 0.05, (before, after)
    print(f"2-rank HF-generate run: {secs:.0f}s, eval reward {before:.3f} -> {after:.3f}")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("method.start_percentile=1.5", "method.start_percentile must be in [0, 1], got 1.5"),
        ("train.dist_backend=nccl", "train.dist_backend=nccl but no CUDA device is visible on this host"),
    ],
)
def test_bad_config_fails_fast_on_every_rank(tmp_path, override, needle):
    # one case through `deepspeed --module rft_ds train CONFIG` (the rft-ds command), one through launch/train.py
    p, secs = launch(tmp_path, override, timeout=120, module="percentile" in override)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("rft_ds: error")]  # one node: its first rank's
    assert len(errors) == 1 and errors[0].startswith(f"rft_ds: error (rank 0): {needle}"), out[-3000:]
    assert "rank1.log" not in out  # rank 1 failed too: its own line, in its log (before the group: none)
    assert not (tmp_path / "model").exists()  # failed before building or loading any model


def test_reward_failure_on_one_rank_stops_every_rank(tmp_path):
    """A second reward term hangs on rank 1 (a verifier stuck on one sample): reward.timeout_s ends it, and
    both ranks stop with rank 1's error (the abandoned call's thread does not keep the process alive)."""
    needle = (
        "scoring failed on rank 1: RewardError: reward term slow_on_rank1 timed out after 5 s (reward.timeout_s) "
        "on a call of"
    )
    p, secs = launch(
        tmp_path,
        "reward.functions=['tests.rewards:slow_on_rank1']",
        "reward.weights=[1, 0.5]",
        "reward.timeout_s=5",
        "train.epochs=2",
        timeout=300,
        launcher=False,
    )
    assert p.returncode != 0
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("rft_ds: error")]
    assert len(errors) == 1 and errors[0].startswith(f"rft_ds: error (all 2 ranks): {needle}"), out[-3000:]


def test_python_api_single_process(tmp_path):
    """trlx's call from outside the checkout, half its prompts chat messages, with two eval sets given in
    Python: each its own reward, pass@k, maj@k, greedy numbers, and best_model/ picked by the named metric."""
    code = f"""
import json, pathlib
import rft_ds
from rft_ds import toy
from transformers import AutoTokenizer
model = toy.ensure_tiny_model({str(tmp_path / "model")!r})
tok = AutoTokenizer.from_pretrained(model)  # a chat template in the toy alphabet, for the chat prompts below
tok.chat_template = "{{% for m in messages %}}{{{{ m['content'] }}}} {{% endfor %}}"
tok.save_pretrained(model)
def starts_with_letter(prompts, completions, messages, **kw):  # the second set's own reward (TRL's signature)
    assert all(m[-1]["content"] == p for m, p in zip(messages, prompts))  # chat prompts: the last user message
    return [float(c.strip()[:1].isalpha()) for c in completions]
chat = lambda rows: [{{**r, "prompt": [{{"role": "user", "content": r["prompt"]}}]}} for r in rows]
sets = [{{"name": "toy", "prompts": toy.eval_prompts(8), "metric_fn": toy.metric_fn, "n_samples": 4, "greedy": True,
          "answer_fn": lambda o: o.strip()[:1] or None, "pass_k": [1, 2, 4], "pass_threshold": 0.5}},
        {{"name": "letter", "prompts": chat(toy.eval_prompts(6, seed=1)), "reward_fn": starts_with_letter,
          "n_samples": 2}}]
res = rft_ds.train(
    reward_fn=toy.reward_fn, prompts=toy.train_prompts(8) + chat(toy.train_prompts(8, seed=1)),
    config={{"model": {{"model_path": {str(tmp_path / "model")!r}, "build": "tiny"}},
            "method": {{"n_generations_per_prompt": 4, "gen_kwargs": {{"max_new_tokens": 8}}, "n_improve_steps": 1,
                       "pool": "latest", "max_per_prompt": 1}},
            "eval": {{"sets": sets}},
            "train": {{"epochs": 2, "output_dir": {str(tmp_path / "run")!r}, "micro_batch_size": 4,
                      "best_metric": "letter/reward_mean"}}}},
    stop_sequences=["."])
h = res.history
assert len(h) == 2 and h[0]["n_sampled"] == h[1]["n_sampled"] == 64, h
assert 0 < h[1]["pool_size"] <= 64  # pool: latest keeps the second grow step's samples only
assert all(r["n_selected"] <= r["n_prompts_kept"] <= 16 for r in h)  # max_per_prompt: one per prompt
for key in ("eval_toy_reward_mean", "eval_toy_pass@1", "eval_toy_pass@4", "eval_toy_maj@4",
            "eval_toy_greedy_reward_mean", "eval_toy_greedy_pass", "eval_toy_frac_mostly_target",
            "eval_letter_reward_mean", "eval_letter_pass@2"):
    assert key in h[-1] and key + "_initial" in h[0], key
r = h[-1]
assert 0 <= r["eval_toy_pass@1"] <= r["eval_toy_pass@2"] <= r["eval_toy_pass@4"] <= 1, r
assert r["eval_letter_reward_mean"] in [i / 12 for i in range(13)]  # 6 prompts x 2 samples, each 0 or 1
best = json.loads((pathlib.Path({str(tmp_path / "run")!r}) / "best_model" / "rft_ds_run.json").read_text())
assert best["metric"] == "eval_letter_reward_mean", best
saved = (pathlib.Path({str(tmp_path / "run")!r}) / "config.yaml").read_text()
assert "<list of 8 prompts, given in Python>" in saved, saved  # summarised, not copied into every checkpoint
print("OK", type(res.model).__name__)
"""
    # from a directory outside the checkout, with the default train.deepspeed_config (auto: the packaged preset)
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "OK LlamaForCausalLM" in p.stdout


def test_restart_from_base_resets_weights_not_pools(tmp_path):
    """method.restart_from_base (ReST-EM): at each grow step after the first the learner is the base model
    again (every weight equal to model.model_path's), while the pools keep growing and the engine samples
    from the latest policy (so the stale-weight check, which compares the two, is skipped there)."""
    code = f"""
import deepspeed, torch
import rft_ds
from rft_ds import run_setup, toy
from transformers import AutoModelForCausalLM
model = toy.ensure_tiny_model({str(tmp_path / "model")!r})
base = AutoModelForCausalLM.from_pretrained(model).state_dict()
seen = []
def gap(module):  # largest |weight - base weight| over the gathered parameters
    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return max((p.detach() - base[n]).abs().max().item() for n, p in params)
real = run_setup.restart_from_base
def spy(s):
    before = gap(s.rt.learner.module)
    real(s)
    seen.append((before, gap(s.rt.learner.module)))
run_setup.restart_from_base = spy
res = rft_ds.train(reward_fn=toy.reward_fn, prompts=toy.train_prompts(16), config={{
    "model": {{"model_path": model}},
    "method": {{"n_generations_per_prompt": 4, "gen_kwargs": {{"max_new_tokens": 8}}, "n_improve_steps": 1,
               "restart_from_base": True}},
    "train": {{"epochs": 3, "output_dir": {str(tmp_path / "run")!r}, "micro_batch_size": 4, "learning_rate": 0.01,
              "eval_interval": 0, "plots": False}}}})
h = res.history
assert len(seen) == 2 and all(before > 1e-3 and after == 0.0 for before, after in seen), seen
assert [r.get("restarted_from_base", False) for r in h] == [False, True, True], h
assert h[0]["pool_size"] < h[1]["pool_size"] < h[2]["pool_size"], [r["pool_size"] for r in h]  # pools kept
assert "stale_logprob_mean_diff" in h[0] and all("stale_logprob_mean_diff" not in r for r in h[1:])
assert all(r["sync_bytes"] > 0 for r in h)  # the engine got each grow step's newly trained weights
print("OK", seen)
"""
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "OK" in p.stdout


def test_long_completions_train_on_whole_rows(tmp_path):
    """Completions of 250-340 tokens (min_new_tokens 250, max_new_tokens 340: about half end by EOS) on 2 ranks
    with train.max_seq_length: auto. Every trained row, read back (RFT_DS_DUMP_ROWS), is its prompt, its whole
    completion as sampled and, where it ended by EOS, the EOS: nothing cut; those cut by max_new_tokens are
    counted (truncated_share). Under sequence parallelism over both ranks (train.sequence_parallel=2), as the
    longest rows would train: each rank gets every row, computes half of each, and the stale-weight check's
    probes pass."""
    import numpy as np

    from rft_ds.toy import build_tiny_model

    build_tiny_model(tmp_path / "model", max_position_embeddings=1024)  # the toy model's 256 positions are too few
    dump = tmp_path / "rows"
    p, secs = launch(
        tmp_path,
        "model.build=null",
        "train.epochs=1",
        "train.eval_interval=0",
        "train.max_seq_length=auto",
        "method.n_generations_per_prompt=4",
        "train.save_final_model=false",
        "train.sequence_parallel=2",
        "method.gen_kwargs={max_new_tokens: 340, min_new_tokens: 250, do_sample: true, temperature: 1.0}",
        timeout=400,
        env_extra={"RFT_DS_DUMP_ROWS": str(dump)},
        launcher=False,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(tmp_path / "model").eos_token_id
    n_rows, ended, longest, tokens = 0, 0, 0, 0
    z, other = (np.load(dump / f"rank{r}-1.npz") for r in (0, 1))
    assert sorted(z[f"input_ids{i}"].tobytes() for i in range(int(z["n"]))) == sorted(
        other[f"input_ids{i}"].tobytes() for i in range(int(other["n"]))
    )  # one group: the same rows
    for i in range(int(z["n"])):
        comp, eos, ids, labels = (z[f"{k}{i}"] for k in ("completion", "eos", "input_ids", "labels"))
        tail = np.r_[comp, [eos_id] if eos else []]
        prompt = len(ids) - len(tail)
        assert 250 <= len(comp) <= 340 and prompt > 0
        assert (ids[prompt:] == tail).all() and (labels[prompt:] == tail).all() and (labels[:prompt] == -100).all()
        n_rows, ended, longest = n_rows + 1, ended + bool(eos), max(longest, len(ids))
        tokens += len(ids)
    m = read_metrics(tmp_path)
    assert n_rows == m[0]["n_rows"] > 0 and 0 < ended < n_rows and longest > 250, (n_rows, ended, longest)
    assert 0 < m[0]["truncated_share"] < 1 and m[0]["train_loss"] > 0
    assert m[0]["trained_tokens"] == tokens  # a group's rows counted once, not once per rank
    assert m[0]["stale_logprob_tokens"] > 0 and m[0]["stale_logprob_mean_diff"] < 1e-3, m[0]  # probes: per rank
    print(
        f"long completions: {secs:.0f}s, {n_rows} rows up to {longest} tokens, {ended} ended by EOS, "
        f"truncated_share {m[0]['truncated_share']:.2f}"
    )


# The toy task in two turns (rft_ds.toy.HintEnv): the environment says the letter after the model's first turn,
# which ends at a space (a stop sequence); only the model's own tokens are trained.
MULTI_TURN = [
    "rollout.env=rft_ds.toy:HintEnv",
    "rollout.max_turns=2",
    "rollout.max_tokens=64",
    "train.max_seq_length=auto",
    'reward.stop_sequences=[" "]',
    "sampler.chunk_prompts=16",
]


def test_two_rank_multi_turn_rollouts_learn_and_resume_mid_rollout(tmp_path):
    """Real vLLM rollouts (2 turns, an environment) under ZeRO-3 with 2 ranks: the model learns to end its first
    turn and answer with the letter the environment gave it; the engine's log p of the model's own tokens of a
    trajectory equals the learner's (the stale-weight check over masked rows). A stop signal during a rollout
    checkpoints after its chunk, and the resumed run trains exactly what the uninterrupted one did."""
    p, secs = launch(tmp_path, *MULTI_TURN, "train.epochs=12", "train.eval_interval=6", launcher=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = read_metrics(tmp_path)
    grows = [r for r in m if r["grow_step"]]
    for r in grows:
        assert r["n_sampled"] == 64 * 32 and r["rollout_failed"] == 0 and r["rollout_env_errors"] == 0, r
        assert r["stale_logprob_tokens"] > 50 and r["stale_logprob_mean_diff"] < 1e-4, r
    assert grows[-1]["rollout_turns_mean"] > grows[0]["rollout_turns_mean"] > 1.5
    before, after = m[0]["eval_reward_mean_initial"], m[-1]["eval_reward_mean"]
    print(f"2-rank multi-turn run: {secs:.0f}s, eval reward {before:.3f} -> {after:.3f}")
    print([(r["epoch"], round(r["reward_mean"], 3), round(r["train_loss"], 3)) for r in m])
    assert after > before + 0.15, (before, after)
    assert m[-1]["eval_rollout_turns_mean"] > 1.9

    # SIGUSR1 as the 2nd chunk's rollout of epoch 3 (a grow step) starts: saved once that chunk is done
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "model").symlink_to(tmp_path / "model")
    p, _ = launch(
        stopped,
        *MULTI_TURN,
        "train.epochs=3",
        "train.eval_interval=0",
        launcher=False,
        env_extra={"RFT_DS_STOP_AT": "generate:2:2"},
    )
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert (stopped / "run" / "checkpoints" / "latest").read_text().strip() == "epoch_00002.sample.c000002"
    p, _ = launch(stopped, *MULTI_TURN, "train.epochs=3", "train.eval_interval=0", "train.resume=auto", launcher=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    keys = ("selection_digest", "train_loss", "reward_mean", "n_rows", "rollout_turns_mean", "stale_logprob_mean_diff")
    again = read_metrics(stopped)
    assert [[r.get(k) for k in keys] for r in again] == [[r.get(k) for k in keys] for r in m[:3]]
