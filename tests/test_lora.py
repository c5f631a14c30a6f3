"""LoRA (peft) under ZeRO-3: config checks before any model loads, the merged-weight sync plan, and a real
2-rank run with vLLM (parity checked after every sync, the partial ones included), CPU offload and
gradient checkpointing, exported both ways, resumed bit-identically."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rft_ds.config import ConfigError
from rft_ds.lora import LoraSpec, check_lora, hf_name, merged, parse_lora, sync_items, wrap
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "value,needle",
    [
        ({"r": 0}, "model.lora.r must be an int >= 1, got 0"),
        ({"r": 8, "alpha": -1}, "model.lora.alpha must be > 0, got -1"),
        ({"dropout": 1.0}, "model.lora.dropout must be in [0, 1), got 1.0"),
        ({"target_modules": []}, "model.lora.target_modules must be 'all-linear' or a non-empty list"),
        ({"rank": 8}, "unknown config key 'model.lora.rank'"),
        ("yes", "model.lora must be a mapping"),
    ],
)
def test_lora_spec_errors(value, needle):
    with pytest.raises(ConfigError) as e:
        parse_lora(value)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lora_checked_against_the_model_without_weights(tiny_model):
    check_lora(LoraSpec(r=4, target_modules=["q_proj", "v_proj"]), str(tiny_model))
    with pytest.raises(
        ConfigError,
        match=r"model.lora.target_modules: 'qkv' matches no module of .* \(its linear "
        r"layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\)",
    ):
        check_lora(LoraSpec(target_modules=["q_proj", "qkv"]), str(tiny_model))
    with pytest.raises(ConfigError, match="model.lora: peft cannot wrap LlamaForCausalLM"):
        check_lora(LoraSpec(target_modules=["input_layernorm"]), str(tiny_model))  # a norm: not a layer peft adapts


def test_sync_plan_merges_adapters_and_skips_frozen_matrices(tiny_model):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = [n for n, _ in base.named_parameters()]
    model = wrap(base, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # B starts at zero; make the merge visible
    items = sync_items(model)
    assert [i.name for i in items] == plain  # the base model's own names and order, each once
    merged_model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    merged_model.load_state_dict({i.name: merged(i) for i in items}, strict=False)
    ref = wrap(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        LoraSpec(r=4, alpha=8, target_modules=["q_proj", "down_proj"]),
    )
    ref.load_state_dict(model.state_dict())
    ref_sd = ref.merge_and_unload().state_dict()
    for k, v in merged_model.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], rtol=0, atol=1e-6)
    by = {i.name: i for i in items}
    assert by["model.layers.0.self_attn.q_proj.weight"].scale == 2.0
    assert not by["model.layers.0.self_attn.k_proj.weight"].static  # fused with q_proj in vLLM: re-sent
    # another family's fused groups (the engine's packed_modules_mapping): k_proj is nobody's sibling there
    other = {i.name: i for i in sync_items(model, fused=[["w1", "w3"]])}
    assert other["model.layers.0.self_attn.k_proj.weight"].static
    assert by["model.layers.0.self_attn.o_proj.weight"].static  # frozen matrix: first sync only
    assert by["model.embed_tokens.weight"].static
    assert not by["model.layers.0.input_layernorm.weight"].static  # 1-D: re-sent (a few bytes)
    assert (
        hf_name("base_model.model.model.layers.1.mlp.down_proj.base_layer.weight")
        == "model.layers.1.mlp.down_proj.weight"
    )


LORA = [
    "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}",
    "model.gradient_checkpointing=true",
    "train.deepspeed_config=ds_configs/zero3_offload_cpu.json",
    "sampler.parity_check=always",
    "method.n_generations_per_prompt=4",
    "train.save_interval=1",
    "train.keep_last=3",
    "train.eval_interval=3",
    "train.plots=false",
    "train.learning_rate=0.01",
]


def _run(run: Path, *extra: str) -> subprocess.CompletedProcess:
    model, config = f"model.model_path={run.parent / 'model'}", "launch/configs/tiny.yaml"
    args = ["launch/train.py", "--config", config, model, f"train.output_dir={run}"]
    p = run_ranks(2, [*args, *LORA, *extra])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_lora_dropout_does_not_reach_the_stale_check(tiny_model, tmp_path):
    """Issue 31, 5: with model.lora.dropout, a training forward is noisy, but the stale-weight check compares
    log-probs from Learner.probe_diffs, which runs in eval mode: two calls give the same numbers, so the check
    is enforced against a deterministic forward and cannot stop a healthy run."""
    import subprocess
    import sys

    from rft_ds.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1", "--master_port", str(free_port())]
    ds = root / "rft_ds" / "ds_configs" / "zero3_cpu.json"
    p = subprocess.run(
        cmd + ["tests/dist/lora_probe.py", str(tiny_model), str(ds)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "PROBE_EQUAL 1" in p.stdout and "TRAIN_DIFFERS 1" in p.stdout, p.stdout[-2000:]


@pytest.mark.slow
def test_lora_run_exports_and_resumes(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rft_ds.toy import build_tiny_model

    build_tiny_model(tmp_path / "model")
    ref = tmp_path / "ref"
    _run(ref, "train.epochs=3")
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["parity_max_diff"] < 1e-3 for r in rows] == [True, True, True]  # every sync, partial ones too
    assert rows[-1]["stale_logprob_mean_diff"] < 1e-3
    # frozen matrices went with the first sync only: the engine's fill at start, before epoch 0 sampled
    assert rows[0]["sync_bytes"] == rows[1]["sync_bytes"] < rows[0]["sync_bytes_start"]

    # final_model: merged, plain HF; final_adapter: peft; the two agree, and training changed the weights
    final = _weights(ref / "final_model")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    again = PeftModel.from_pretrained(base, ref / "final_adapter").merge_and_unload().state_dict()
    assert max((again[k] - final[k]).abs().max().item() for k in final) < 1e-6
    assert (final["model.layers.0.self_attn.q_proj.weight"] != base_sd["model.layers.0.self_attn.q_proj.weight"]).any()
    assert (final["model.layers.0.self_attn.o_proj.weight"] == base_sd["model.layers.0.self_attn.o_proj.weight"]).all()

    # the checkpoint holds what training changes: adapters (and their optimizer state), no base weights
    ckpt = ref / "checkpoints" / "epoch_00002"
    for rank in (0, 1):
        states = torch.load(
            ckpt / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
        )
        names = [n for shapes in states["param_shapes"] for n in shapes]
        assert len(names) == 12 and all("lora_" in n for n in names) and states["frozen_param_shapes"] is None

    # resumed from the checkpoint after epoch 2 of 3 (a copy of the run): bit-identical to the uninterrupted run
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "final_model")
    p = _run(run, "train.epochs=3", f"train.resume={run / 'checkpoints' / 'epoch_00001'}")
    assert "resumed from" in p.stdout and (run / "final_model").is_dir()
    resumed = _weights(run / "final_model")
    assert all((resumed[k] == final[k]).all() for k in final)

    # rft_ds.export of a LoRA checkpoint: base + the checkpoint's adapters, merged
    out = tmp_path / "export"
    p = subprocess.run(
        [sys.executable, "-m", "rft_ds.export", str(ref), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    exported = _weights(out)
    assert max((exported[k] - final[k]).abs().max().item() for k in final) < 1e-6


class _SleepyEngine:
    """Holds what it was sent, by name; sleep() drops every tensor (zeroes it), as vLLM's level-2 sleep frees
    the weights, and says so (weights_dropped) until the next load."""

    def __init__(self):
        self.held, self.weights_dropped = {}, False

    def load_weights(self, weights):
        for name, t in weights:
            self.held[name] = t.clone()
        self.weights_dropped = False

    def sleep(self):
        for t in self.held.values():
            t.zero_()
        self.weights_dropped = True


def test_lora_sync_after_a_level_2_sleep_sends_every_weight(tiny_model):
    """Issue 31, 1: under LoRA the frozen matrices go on the first sync only; after a sleep that dropped the
    engine's weights, the next sync must send them again, or the engine samples from zeros."""
    from transformers import AutoModelForCausalLM

    from rft_ds.weight_sync import WeightSync

    model = wrap(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), LoraSpec(r=4, alpha=8))
    engine = _SleepyEngine()
    sync = WeightSync(model, engine, 1.0, torch.float32)
    sync.sync()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # "training" moved the adapters
    engine.sleep()
    second = sync.sync()
    want = {i.name: merged(i) for i in sync_items(model)}
    assert sorted(engine.held) == sorted(want)
    for name, t in want.items():
        torch.testing.assert_close(engine.held[name], t, rtol=0, atol=1e-6, msg=name)
    engine.weights_dropped = False  # no sleep: only what changes is sent again
    third = sync.sync()
    assert third.bytes < second.bytes
