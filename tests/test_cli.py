"""The `rft-ds` command: `check` finds every bad input the run refuses before a model loads (the cases of
test_bad_inputs.py), lists several problems at once and writes nothing; `runs` prints a run's epoch
table; the installed script is on the venv's PATH."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rft_ds import cli
from tests.test_bad_inputs import CASES, copy_model
from tests.test_bad_inputs import env as no_model_load  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(no_model_load, monkeypatch):
    """test_bad_inputs' guard (a model load or process group start fails the test), run from the checkout."""
    monkeypatch.chdir(ROOT)
    return no_model_load


def run_check(capsys, *args):
    rc = cli.main(["check", "launch/configs/tiny.yaml", *args])
    out = capsys.readouterr()
    problems = [line for line in out.err.splitlines() if line.startswith("rft_ds: problem: ")]
    return rc, problems, out.out


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_finds_each_bad_input(case, env, capsys):
    tmp, model = env
    make, needle = CASES[case]
    rc, problems, _ = run_check(
        capsys, f"model.model_path={model}", "model.build=null", f"train.output_dir={tmp / 'out'}", *make(tmp, model)
    )
    assert rc == 1 and any(needle in p for p in problems), problems
    assert not (tmp / "out").exists()  # check writes nothing


def test_check_lists_every_problem_and_passes_a_good_config(env, capsys):
    tmp, model = env
    rc, problems, out = run_check(
        capsys, f"model.model_path={model}", "model.build=null", f"train.output_dir={tmp / 'o'}"
    )
    assert rc == 0 and problems == [] and "ok for 2 rank(s)" in out
    rc, problems, _ = run_check(
        capsys,
        f"model.model_path={model}",
        "model.build=null",
        "reward.reward_fn=nowhere:f",
        f"data.prompts={tmp / 'missing.jsonl'}",
        f"train.deepspeed_config={tmp / 'none.json'}",
        "sampler.tensor_parallel_size=3",
    )
    assert rc == 1 and len(problems) == 4, problems
    starts = [
        "sampler.tensor_parallel_size=3",
        "reward.reward_fn: cannot import",
        "prompts: file not found",
        "train.deepspeed_config: file not found",
    ]
    assert all(p[len("rft_ds: problem: ") :].startswith(s) for p, s in zip(problems, starts)), problems
    # a model that model.build makes at start is a note, not a problem
    rc, problems, out = run_check(capsys, f"model.model_path={tmp / 'later'}", "model.build=tiny")
    assert rc == 0 and "model.build=tiny makes it when the run starts" in out
    assert not (tmp / "later").exists()


def test_runs_prints_the_epoch_table(tmp_path, capsys):
    recs = [
        {
            "epoch": 0,
            "grow_step": True,
            "percentile": 0.7,
            "n_sampled": 2048,
            "n_selected": 118,
            "pool_size": 1943,
            "reward_mean": 0.061,
            "train_loss": 0.528,
            "time_epoch": 154.7,
            "eval_add_greedy_pass_initial": 0.125,
            "eval_add_reward_mean_initial": 0.1,
        },
        {
            "epoch": 1,
            "grow_step": False,
            "percentile": 0.95,
            "n_sampled": 0,
            "n_selected": 118,
            "pool_size": 1943,
            "reward_mean": 0.061,
            "train_loss": 0.445,
            "time_epoch": 43.8,
            "eval_add_greedy_pass": 0.609,
            "eval_add_reward_mean": 0.5,
            "eval_add_maj@4": 0.6,
            "eval_add_reward_numeric_mean": 0.5,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli.main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "epoch",
        "step",
        "p",
        "sampled",
        "kept",
        "reward",
        "loss",
        "add_greedy_pass",
        "add_reward_mean",
        "time_s",
    ]
    assert lines[1].split() == ["before", "0.125", "0.100"]
    assert lines[2].split() == ["1", "grow", "0.700", "2048", "118/1943", "0.061", "0.528", "-", "-", "154.7"]
    assert lines[3].split() == ["2", "improve", "0.950", "0", "118/1943", "0.061", "0.445", "0.609", "0.500", "43.8"]
    assert cli.main(["runs", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_rft_ds_is_installed_on_the_venv_path(tmp_path):
    exe = Path(sys.executable).parent / "rft-ds"
    assert exe.is_file(), "pip install -e . puts rft-ds beside the venv's python"
    p = subprocess.run(
        [str(exe), "check", str(ROOT / "launch/configs/tiny.yaml"), "train.epochs=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WORLD_SIZE": "1"},
    )
    assert p.returncode == 1 and p.stderr.strip() == "rft_ds: problem: train.epochs must be >= 1, got 0", p.stderr
    p = subprocess.run([sys.executable, "-m", "rft_ds", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "{train,check,export,plot,runs}" in p.stdout


@pytest.mark.slow
def test_a_library_error_reaches_the_quiet_console_with_the_log_path(tmp_path, tiny_model):
    """Weights transformers cannot read: the error is raised inside a library after the console went quiet;
    its first line and the log's path reach the terminal, the traceback is in the log."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "rft-ds"),
            "train",
            str(ROOT / "launch/configs/tiny.yaml"),
            f"model.model_path={model}",
            "model.build=null",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
            "HF_HUB_OFFLINE": "1",
        },
    )
    log = tmp_path / "run" / "logs" / "rank0.log"
    errors = [line for line in p.stderr.splitlines() if line.startswith("rft_ds: error")]
    assert p.returncode == 1 and len(errors) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert errors[0].startswith("rft_ds: error (rank 0): ") and errors[0].endswith(f"(traceback in {log})"), errors
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in p.stderr
    assert p.stdout.startswith("[rft_ds] each rank's full output"), p.stdout[:500]


def remote_code_model(tiny_model: Path, dst: Path) -> Path:
    """The tiny Llama as a model with its own code (auto_map): what model.trust_remote_code is for."""
    shutil.copytree(tiny_model, dst)
    (dst / "configuration_rfttoy.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass RftToyConfig(LlamaConfig):\n    model_type = 'rft_toy'\n"
    )
    (dst / "modeling_rfttoy.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_rfttoy import RftToyConfig\n\n\n"
        "class RftToyForCausalLM(LlamaForCausalLM):\n    config_class = RftToyConfig\n"
    )
    c = json.loads((dst / "config.json").read_text())
    c.update(
        model_type="rft_toy",
        architectures=["RftToyForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_rfttoy.RftToyConfig",
            "AutoModelForCausalLM": "modeling_rfttoy.RftToyForCausalLM",
        },
    )
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_check_asks_for_trust_remote_code(env, capsys):
    tmp, model = env
    remote = remote_code_model(model, tmp / "remote")
    rc, problems, _ = run_check(capsys, f"model.model_path={remote}", "model.build=null", "sampler.backend=hf")
    assert rc == 1 and problems == [
        f"rft_ds: problem: model.model_path {remote}: model type 'rft_toy' comes with its own "
        "code (modeling_rfttoy.RftToyForCausalLM); set model.trust_remote_code: true to run it"
    ]
    rc, problems, _ = run_check(
        capsys,
        f"model.model_path={remote}",
        "model.build=null",
        "sampler.backend=hf",
        "model.trust_remote_code=true",
        "model.lora={r: 4}",
    )
    assert rc == 0, problems


@pytest.mark.slow
def test_a_model_with_its_own_code_trains_with_trust_remote_code(tmp_path, tiny_model):
    """One rank, the HF sampler: tokenizer, learner and final_model load and save the model's own classes."""
    remote = remote_code_model(tiny_model, tmp_path / "remote")
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "rft-ds"),
            "train",
            str(ROOT / "launch/configs/tiny.yaml"),
            f"model.model_path={remote}",
            "model.build=null",
            "model.trust_remote_code=true",
            "sampler.backend=hf",
            "train.epochs=1",
            "method.n_generations_per_prompt=2",
            "train.eval_interval=0",
            "train.plots=false",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
            "HF_HUB_OFFLINE": "1",
        },
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    final = tmp_path / "run" / "final_model"
    saved = json.loads((final / "config.json").read_text())
    assert saved["model_type"] == "rft_toy" and saved["architectures"] == ["RftToyForCausalLM"], saved


def test_check_for_gpu_nodes_from_a_cpu_host(env, capsys):
    """--device cuda checks a GPU job from a login node: NCCL and a head size only vLLM on CPU refuses are fine
    there; --device cpu (or this CPU host) refuses both."""
    tmp, model = env
    hd = copy_model(model, tmp / "hd", edit_config=lambda c: c.update(head_dim=24))
    args = [f"model.model_path={hd}", "model.build=null", "train.dist_backend=nccl"]
    rc, problems, out = run_check(capsys, *args, "--device", "cuda")
    assert rc == 0, problems
    # the defaults that follow the device, as the GPU run will have them
    assert (
        "rft_ds: note: on CUDA: sampler.enforce_eager=false (CUDA graphs), sampler.enable_sleep_mode=true, "
        "train.save_every_minutes=30, model.gradient_checkpointing=auto"
    ) in out.splitlines(), out
    rc, problems, out = run_check(capsys, *args, "--device", "cpu")
    assert rc == 1 and len(problems) == 2 and "nccl" in problems[0] and "head_dim 24" in problems[1], problems
    assert "rft_ds: note: on CPU: sampler.enforce_eager=true, sampler.enable_sleep_mode=false" in out, out


@pytest.mark.parametrize("config", ["math.yaml", "reasoning_gym.yaml", "reasoning.yaml"])
def test_example_configs_pass_check(config, env, capsys):
    """The example configs for verifiers (launch/configs/) pass every check before model load: their
    reasoning-gym prompts generate, math-verify reads their references, the reward terms get their metadata
    (on the tiny model: its 256 positions take 16 new tokens)."""
    tmp, model = env
    rc = cli.main(
        [
            "check",
            f"launch/configs/{config}",
            f"model.model_path={model}",
            "model.build=null",
            f"train.output_dir={tmp / 'out'}",
            "method.gen_kwargs.max_new_tokens=16",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]


def test_code_example_config_passes_check(env, capsys):
    """launch/configs/code.yaml: HumanEval's split loads, every prompt has its tests (code_tests' start-up
    check). The tiny tokenizer spells code in many more tokens than SmolLM2's, so its model gets 8192
    positions here and the prompt limit is raised to match."""
    tmp, model = env
    big = copy_model(model, tmp / "long_model", edit_config=lambda c: c.update(max_position_embeddings=8192))
    rc = cli.main(
        [
            "check",
            "launch/configs/code.yaml",
            f"model.model_path={big}",
            "model.build=null",
            f"train.output_dir={tmp / 'out'}",
            "method.gen_kwargs.max_new_tokens=16",
            "data.max_prompt_length=4096",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]


def test_progress_bars_follow_the_terminal_not_the_log(tmp_path):
    """Issue 31, 10: under `rft-ds train` stderr is the rank's log by the time the recipe asks whether to draw
    bars; train.progress: null must ask the terminal's stderr (here a pty), and say no when it is a file."""
    import os
    import pty
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from rft_ds import console, progress; "
        "console.redirect(Path(sys.argv[1])); print('BARS', int(progress.enabled(None, True)), file=console.out())"
    )
    leader, follower = pty.openpty()
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "rank0.log")],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        timeout=120,
    )
    os.close(follower)
    os.close(leader)
    assert p.returncode == 0 and "BARS 1" in p.stdout, p.stdout
    with open(tmp_path / "stderr.txt", "w") as f:  # not a terminal: no bars
        p = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "rank0.log")],
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            timeout=120,
        )
    assert p.returncode == 0 and "BARS 0" in p.stdout, p.stdout


def test_a_model_whose_forward_takes_no_logits_to_keep_trains(tiny_model, tmp_path):
    """Issue 31, 9: a model with its own code whose forward has neither logits_to_keep nor **kwargs trains:
    the learner sees it from the signature, keeps the chunked head off (saying why) and slices full logits;
    its label log-probs equal transformers' own class's on the same weights."""
    from rft_ds.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1", "--master_port", str(free_port())]
    ds = root / "rft_ds" / "ds_configs" / "zero3_cpu.json"
    p = subprocess.run(
        cmd + ["tests/dist/no_logits_to_keep.py", str(tiny_model), str(ds), str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "HEAD_OFF its forward takes no logits_to_keep" in p.stdout, p.stdout[-2000:]
    diff = float(next(line for line in p.stdout.splitlines() if line.startswith("MAX_DIFF")).split()[1])
    assert diff < 1e-5, diff
