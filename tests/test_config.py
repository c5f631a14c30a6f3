"""Config errors: one line, naming the field, raised before any model or process group exists."""

import json
import sys

import pytest

from rft_ds.config import ConfigError, RFTConfig, RFTRunConfig, apply_override
from rft_ds.learner import fill_ds_config, load_ds_config

BASE = {"model": {"model_path": "some/dir"}}


def load(extra=None, overrides=None):
    d = json.loads(json.dumps(BASE))
    for k, v in (extra or {}).items():
        d.setdefault(k, {}).update(v)
    return RFTRunConfig.from_dict(d, overrides)


def test_rftconfig_is_the_seed_contract():
    c = RFTConfig()
    assert [f for f in RFTConfig.__dataclass_fields__][:5] == [
        "gen_kwargs",
        "start_percentile",
        "end_percentile",
        "n_improve_steps",
        "n_generations_per_prompt",
    ]
    assert (c.start_percentile, c.end_percentile, c.n_improve_steps, c.n_generations_per_prompt) == (0.7, 0.95, 4, 32)
    # rft_ds's additions default to trlx's behaviour: the pools keep every grow step, no cap per prompt
    assert [f for f in RFTConfig.__dataclass_fields__][5:] == [
        "pool",
        "max_per_prompt",
        "restart_from_base",
        "overlong",
        "replay_share",
        "skip_solved",
        "skip_hopeless",
        "skip_retry_after",
        "pass_score",
    ]
    assert (c.pool, c.max_per_prompt, c.restart_from_base, c.overlong, c.replay_share) == (
        "accumulate",
        None,
        False,
        "keep",
        0.1,
    )
    assert (c.skip_solved, c.skip_hopeless, c.skip_retry_after, c.pass_score) == (None,) * 4  # no prompt skipped
    assert RFTConfig({"max_new_tokens": 8}, 0.5, 0.9, 2, 4).n_generations_per_prompt == 4  # trlx's positional order


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {model_path: m}\nmethod: {n_generations_per_prompt: 4}\n")
    cfg = RFTRunConfig.load_yaml(
        p,
        [
            "method.n_generations_per_prompt=8",
            "train.epochs=6",
            "method.gen_kwargs.temperature=0.7",
            "selection.min_score=0.5",
        ],
    )
    assert cfg.method.n_generations_per_prompt == 8 and cfg.train.epochs == 6
    assert cfg.method.gen_kwargs["temperature"] == 0.7 and cfg.method.gen_kwargs["max_new_tokens"] == 32
    assert cfg.selection.min_score == 0.5


def test_shipped_configs_load():
    cfg = RFTRunConfig.load_yaml("launch/configs/tiny.yaml")
    assert cfg.model.build == "tiny" and cfg.method.n_generations_per_prompt >= 1


@pytest.mark.parametrize(
    "extra,overrides,needle",
    [
        ({}, ["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        ({}, ["methd.n_improve_steps=3"], "unknown config key 'methd'"),
        ({}, ["method.n_generations_per_prompt=abc"], "method.n_generations_per_prompt must be int, got str"),
        ({}, ["method.n_generations_per_prompt=2.5"], "method.n_generations_per_prompt must be int"),
        ({}, ["train.learning_rate=fast"], "train.learning_rate must be float"),
        ({}, ["selection.dedup=3"], "selection.dedup must be bool"),
        ({}, ["method.start_percentile=1.5"], "method.start_percentile must be in [0, 1], got 1.5"),
        ({}, ["method.end_percentile=-0.1"], "method.end_percentile must be in [0, 1]"),
        ({}, ["method.start_percentile=0.9", "method.end_percentile=0.8"], "must be <= method.end_percentile"),
        ({}, ["method.n_improve_steps=0"], "method.n_improve_steps must be >= 1, got 0"),
        ({}, ["method.n_generations_per_prompt=0"], "method.n_generations_per_prompt must be >= 1, got 0"),
        (
            {},
            ["method.gen_kwargs.max_tokens=5"],
            "unknown method.gen_kwargs key 'max_tokens' (did you mean 'max_new_tokens'?)",
        ),
        ({}, ["method.gen_kwargs.num_return_sequences=4"], "set method.n_generations_per_prompt"),
        ({}, ["method.gen_kwargs.top_p=0"], "method.gen_kwargs.top_p must be in (0, 1]"),
        ({}, ["method.gen_kwargs.temperature=0"], "temperature must be > 0"),
        ({}, ["method.gen_kwargs={max_new_tokens: null}"], "method.gen_kwargs.max_new_tokens must be int"),
        ({}, ["train.eval_gen_kwargs={max_new_tokens: 0}"], "train.eval_gen_kwargs.max_new_tokens must be >= 1"),
        ({}, ["selection.strategy=best"], "selection.strategy must be one of per_prompt, global, top_k"),
        ({}, ["selection.top_k=0"], "selection.top_k must be >= 1"),
        ({}, ["method.pool=newest"], "method.pool must be accumulate | latest | window:K (K >= 1), got 'newest'"),
        ({}, ["method.pool=window:0"], "method.pool must be accumulate | latest | window:K (K >= 1), got 'window:0'"),
        ({}, ["method.max_per_prompt=0"], "method.max_per_prompt must be null or an int >= 1, got 0"),
        ({}, ["method.max_per_prompt=two"], "method.max_per_prompt must be int, got str 'two'"),
        ({}, ["data.shard=random"], "data.shard must be 'interleaved' or 'contiguous', got 'random'"),
        ({}, ["model.model_path=''"], "model.model_path is required"),
        ({}, ["sampler.backend=tgi"], "sampler.backend must be"),
        ({}, ["train.epochs=0"], "train.epochs must be >= 1"),
        ({}, ["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
        ({}, ["train.learning_rate=0"], "train.learning_rate must be > 0"),
        ({}, ["train.learning_rate=.nan"], "train.learning_rate must be a finite number"),
        ({}, ["reward.reward_fn=no_colon"], "reward.reward_fn must look like 'module:function'"),
        ({}, ["reward.stop_sequences=['']"], "reward.stop_sequences must be a list of non-empty strings"),
        ({}, ["train.seed=-1"], "train.seed must be >= 0"),
        ({}, ["train.dist_backend=mpi"], "train.dist_backend must be"),
        (
            {},
            ["train.max_seq_length=20"],
            "train.max_seq_length (20) cannot hold a completion of "
            "method.gen_kwargs.max_new_tokens (32) with its prompt and EOS",
        ),
        ({}, ["train.max_seq_length=long"], "train.max_seq_length must be auto or an int >= 2"),
        ({}, ["train.logprob_chunk=-1"], "train.logprob_chunk must be an int >= 0"),
        ({}, ["model.gradient_checkpointing=sometimes"], "model.gradient_checkpointing must be auto, true or false"),
        ({}, ["method.overlong=trim"], "method.overlong must be keep or drop"),
        ({}, ["train.sequence_parallel=0"], "train.sequence_parallel must be an int >= 1, got 0"),
        (
            {},
            ["train.sequence_parallel=2", "sampler.backend=hf"],
            "train.sequence_parallel > 1 needs sampler.backend: vllm",
        ),
        ({}, ["train.sequence_parallel=2", "model.trust_remote_code=true"], "needs transformers' own model code"),
        ({"method": "notamapping"}, None, "method must be a mapping"),
    ],
)
def test_config_errors(extra, overrides, needle):
    d = json.loads(json.dumps(BASE))
    d.update(extra)
    with pytest.raises(ConfigError) as e:
        RFTRunConfig.from_dict(d, overrides)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "train.epochs")


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        RFTRunConfig.load_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RFTRunConfig.load_yaml(p)


def test_errors_before_any_model_load():
    # Config errors come from pure code: neither torch nor deepspeed gets imported to raise them.
    import subprocess

    code = (
        "import sys; from rft_ds.config import RFTRunConfig, ConfigError\n"
        "try:\n RFTRunConfig.from_dict({'model': {'model_path': 'x'}, 'method': {'start_percentile': 2}})\n"
        "except ConfigError: pass\n"
        "print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ---- DeepSpeed JSON -------------------------------------------------------------------------------


def ds(**zero):
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, **zero},
    }


def test_fill_auto_values():
    cfg = load(
        overrides=[
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=3",
            "train.learning_rate=0.01",
            "train.warmup_steps=7",
        ]
    )
    out = fill_ds_config(ds(), cfg.train, world_size=2)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (
        4,
        3,
        24,
    )
    assert out["optimizer"]["params"]["lr"] == 0.01
    assert out["scheduler"]["params"] == {"warmup_max_lr": 0.01, "warmup_num_steps": 7}
    assert "scheduler" not in fill_ds_config(ds(), load().train, 1)  # warmup_steps=0: constant LR


def test_ds_batch_sizes_inconsistent_with_world_size():
    cfg = load(overrides=["train.micro_batch_size=4"])
    bad = {**ds(), "train_batch_size": 16}
    with pytest.raises(ConfigError, match=r"train_batch_size=16 must equal .* world size \(3\) = 12"):
        fill_ds_config(bad, cfg.train, world_size=3)
    with pytest.raises(ConfigError, match="train.micro_batch_size=4 contradicts deepspeed config"):
        fill_ds_config({**ds(), "train_micro_batch_size_per_gpu": 2}, cfg.train, world_size=1)


def test_ds_requires_zero3_and_no_unfillable_auto():
    cfg = load()
    with pytest.raises(ConfigError, match="zero_optimization.stage must be 3"):
        fill_ds_config({**ds(), "zero_optimization": {"stage": 2}}, cfg.train, 1)
    with pytest.raises(ConfigError, match="cannot fill: zero_optimization.reduce_bucket_size"):
        fill_ds_config(ds(reduce_bucket_size="auto"), cfg.train, 1)


def test_shipped_ds_configs_fill():
    cfg = load()
    for path in (
        "ds_configs/zero3_cpu.json",
        "ds_configs/zero3_cpu_bf16.json",
        "ds_configs/zero3_gpu.json",
        "zero3_offload_cpu.json",
        "auto",
    ):
        out = fill_ds_config(load_ds_config(path), cfg.train, 2)
        assert out["zero_optimization"]["stage"] == 3


def test_presets_and_yaml_relative_inputs_from_any_directory(tmp_path, monkeypatch):
    """The DeepSpeed presets ship in the package; a YAML config's inputs may be relative to its own directory."""
    from rft_ds.learner import PRESETS, resolve_ds_config

    monkeypatch.chdir(tmp_path)  # not the checkout
    assert resolve_ds_config("auto", cuda=False) == PRESETS / "zero3_cpu.json"
    assert resolve_ds_config("auto", cuda=True) == PRESETS / "zero3_gpu.json"
    assert resolve_ds_config("ds_configs/zero3_cpu_bf16.json") == PRESETS / "zero3_cpu_bf16.json"
    with pytest.raises(
        ConfigError, match=r"file not found: elsewhere/zero3_cpu.json \(or auto, or a preset: zero3_cpu.json"
    ):
        resolve_ds_config("elsewhere/zero3_cpu.json")  # another directory's file is not silently a preset
    assert RFTRunConfig().train.deepspeed_config == "auto"

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "p.jsonl").write_text('{"prompt": "a"}\n')
    (project / "my_ds.json").write_text("{}")
    (project / "run.yaml").write_text(
        "data: {prompts: data/p.jsonl, eval_prompts: rft_ds.toy:eval_prompts}\n"
        "model: {model_path: .cache/m}\ntrain: {deepspeed_config: my_ds.json, output_dir: out}\n"
    )
    cfg = RFTRunConfig.load_yaml(project / "run.yaml")
    assert cfg.data.prompts == str(project / "data" / "p.jsonl")
    assert cfg.train.deepspeed_config == str(project / "my_ds.json")
    assert cfg.data.eval_prompts == "rft_ds.toy:eval_prompts"  # not a path
    assert cfg.model.model_path == ".cache/m" and cfg.train.output_dir == "out"  # nothing there: as written
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.jsonl").write_text('{"prompt": "b"}\n')
    assert RFTRunConfig.load_yaml(project / "run.yaml").data.prompts == "data/p.jsonl"  # the working dir's first


def test_invalid_ds_json(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_ds_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_ds_config(tmp_path / "missing.json")


def test_prompts_given_as_objects_are_summarised_not_copied():
    cfg = RFTRunConfig.from_dict(
        {"model": {"model_path": "m"}, "data": {"prompts": ["a", "b"], "eval_prompts": "e.jsonl"}}
    )
    d = cfg.to_dict()
    assert d["data"]["prompts"] == "<list of 2 prompts, given in Python>" and d["data"]["eval_prompts"] == "e.jsonl"
    assert cfg.data.prompts == ["a", "b"]  # the config itself is untouched


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads 1e-3 as a string; the config takes it as the number everyone means."""
    cfg = RFTRunConfig.from_dict({"model": {"model_path": "m"}}, ["train.learning_rate=1e-3"])
    assert cfg.train.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="train.learning_rate must be float, got str 'fast'"):
        RFTRunConfig.from_dict({"model": {"model_path": "m"}}, ["train.learning_rate=fast"])


def test_a_pathlib_path_is_taken_where_a_path_goes():
    from pathlib import Path

    from rft_ds.config import RFTRunConfig

    cfg = RFTRunConfig.from_dict({"model": {"model_path": Path("/models/m")}, "train": {"output_dir": Path("out")}})
    assert cfg.model.model_path == "/models/m" and cfg.train.output_dir == "out"


def test_one_training_dtype_decides_engine_dtype_and_tolerances():
    """Issue 31, 3: the DeepSpeed config's precision is read in one place (learner.training_dtype); an fp16 run
    gets a float16 engine under sampler.dtype auto; the tolerances are half-precision ones when either the
    engine or the learner is half precision; an explicit tolerance wins."""
    import torch

    from rft_ds.build import tolerances
    from rft_ds.learner import training_dtype
    from rft_ds.preflight import engine_dtype

    fp16, bf16, fp32 = {"fp16": {"enabled": True}}, {"bf16": {"enabled": True}}, {}
    assert [training_dtype(c) for c in (fp16, bf16, fp32)] == [torch.float16, torch.bfloat16, torch.float32]
    assert [engine_dtype("auto", c) for c in (fp16, bf16, fp32)] == [torch.float16, torch.bfloat16, torch.float32]
    assert engine_dtype("float32", bf16) == torch.float32
    assert tolerances(torch.float32, torch.float32, None, None) == (1e-3, 1e-3)
    assert tolerances(torch.float32, torch.bfloat16, None, None) == (0.5, 0.1)  # fp32 engine, bf16 learner
    assert tolerances(torch.float16, torch.float32, None, None) == (0.5, 0.1)
    assert tolerances(None, torch.float32, None, None) == (1e-3, 1e-3)  # the hf sampler: the module itself
    assert tolerances(torch.bfloat16, torch.bfloat16, 0.2, 0.05) == (0.2, 0.05)
