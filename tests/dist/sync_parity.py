"""Run under `deepspeed --num_gpus 2`: train a few ZeRO-3 steps, sync into each rank's vLLM engine, and
record parity, the change from the untrained engine, and sync memory for several bucket sizes.
Each rank writes <out>/rank<r>.json for tests/test_vllm.py to check."""

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(model_path: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    from rft_ds import distributed as D
    from rft_ds.learner import Learner
    from rft_ds.sampling.vllm import VLLMSampler
    from rft_ds.weight_sync import WeightSync, model_logprobs, parity_check

    D.init("gloo", 300)
    rank = D.rank()
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    learner = Learner(model_path, ds)
    tok = AutoTokenizer.from_pretrained(model_path)
    sampler = VLLMSampler(model_path, tok, seed=1 + rank, dtype="float32", max_model_len=128)
    probes = [tok(t)["input_ids"] for t in ("abc say k:", "xyz say q:", "hello say a:")]
    # A prompt's n samples share its whole KV blocks through the prefix cache (sampler.block_size: 32 on CPU)
    from vllm import SamplingParams

    sampler.llm.reset_prefix_cache()
    shared = sampler.llm.generate([{"prompt_token_ids": tok("abc say k: " * 8)["input_ids"]}],
                                  SamplingParams(n=4, max_tokens=2), use_tqdm=False)[0]
    seqs = [p + [30, 31, 32, 33, 34] for p in probes]
    before = sampler.prompt_logprobs(seqs)

    g = torch.Generator().manual_seed(rank)
    for _ in range(4):  # different data per rank: the synced weights must be the all-reduced ones
        x = torch.randint(3, 90, (4, 24), generator=g)
        loss = learner.engine(input_ids=x, labels=x).loss
        learner.engine.backward(loss)
        learner.engine.step()

    # Trained but not yet synced: the engine is stale, and the parity check must say so on every rank.
    try:
        parity_check(learner.module, sampler, probes, 6, 1e-3, tok.pad_token_id, ["abc say k:", "xyz say q:", "hello say a:"])
        stale_error = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        stale_error = f"{type(e).__name__}: {e}"

    total = sum(int(p.ds_numel) * 4 for p in learner.module.parameters())
    memory = []
    for bucket_kb in (16, 64, 256):
        sync = WeightSync(learner.module, sampler, bucket_kb / 1024, torch.float32)
        st = sync.sync()
        memory.append({"bucket_bytes": bucket_kb * 1024, "peak_extra_bytes": st.peak_extra_bytes,
                       "n_buckets": st.n_buckets, "bytes": st.bytes, "seconds": st.seconds})
    after = sampler.prompt_logprobs(seqs)
    model = model_logprobs(learner.module, seqs, tok.pad_token_id)
    worst = parity_check(learner.module, sampler, probes, 6, 1e-3, tok.pad_token_id)
    largest = max(int(p.ds_numel) * 4 for p in learner.module.parameters())
    result = {
        "rank": rank,
        "fused_groups": sampler.fused_groups(),
        "block_size": sampler.llm.llm_engine.vllm_config.cache_config.block_size,
        "prompt_len": len(shared.prompt_token_ids), "cached_tokens": shared.num_cached_tokens,
        "parity_fixed_completion": max(float(np.abs(a - m).max()) for a, m in zip(after, model)),
        "parity_check": worst,
        "change_from_untrained": max(float(np.abs(a - b).max()) for a, b in zip(after, before)),
        "stale_error": stale_error,
        "model_bytes": total, "largest_param_bytes": largest, "memory": memory,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
