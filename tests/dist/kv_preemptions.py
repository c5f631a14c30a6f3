"""Run with plain `python` (a process group of one): a vLLM engine on CPU whose KV budget is the least
kv_cache_budget accepts for n samples of the worst prompt, then generate one request, two, and one again.
Writes <out>: the engine's KV blocks, the blocks asked for, and each call's preemptions, for tests/test_vllm.py."""

import json
import sys
from pathlib import Path


def main(model_path: str, out: str) -> None:
    from transformers import AutoTokenizer

    from rft_ds import distributed as D
    from rft_ds.sampling.vllm import VLLMSampler, kv_blocks_needed, kv_bytes_per_token, kv_cache_budget

    D.init("gloo", 300)
    n, prompt_len, new, max_len, block = 8, 31, 216, 256, 32  # 31: no whole block for the samples to share
    per_token = kv_bytes_per_token(model_path, "float32")
    blocks = kv_blocks_needed(block, max_len, n, prompt_len, new)
    budget = kv_cache_budget(blocks * block * per_token, per_token, block, max_len, n, prompt_len, new)
    sampler = VLLMSampler(model_path, AutoTokenizer.from_pretrained(model_path), seed=0, dtype="float32",
                          max_model_len=max_len, kv_cache_memory_bytes=budget)
    prompt = list(range(5, 5 + prompt_len))
    result = {"engine_blocks": sampler.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, "blocks": blocks}
    for name, prompts in (("one", [prompt]), ("two", [prompt, prompt[::-1]]), ("one_again", [prompt[::-1]])):
        comps = sampler.generate(prompts, n, {"max_new_tokens": new, "min_new_tokens": new}, seed=1)
        lengths = sorted({len(c.token_ids) for cs in comps for c in cs})
        result[name] = {"preemptions": sampler.last_preemptions, "lengths": lengths}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
