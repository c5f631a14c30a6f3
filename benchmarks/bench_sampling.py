"""Sampling throughput under ZeRO-3, 2 CPU ranks: trlx's way vs HF num_return_sequences vs colocated vLLM.

    python benchmarks/bench_sampling.py --shape tiny --samples-per-prompt 8 32 --prompts 32 --max-new-tokens 32

(a) trlx: N sequential HF `generate` calls per prompt batch on the ZeRO-3 module (as trlx's RFT trainer).
(b) HF `generate(num_return_sequences=N)` on the ZeRO-3 module (rft_ds's `sampler: hf`).
(c) rft_ds's colocated vLLM engine per rank, `SamplingParams(n=N)` (`sampler: vllm`).
Every completion is forced to exactly max_new_tokens (min = max), so all three do the same work;
completion tokens/s counts both ranks. Engine start-up is reported apart, not in (c)'s time.
"""

import argparse
import sys
import time

import common


def worker(shape: str, ns: list[int], n_prompts: int, max_new: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from rft_ds import distributed as D
    from rft_ds.data import deal_prompts
    from rft_ds.learner import Learner
    from rft_ds.sampling.hf import HFSampler
    from rft_ds.sampling.vllm import VLLMSampler
    from rft_ds.toy import train_prompts

    D.init("gloo", 3600)
    rank, world = D.rank(), D.world_size()
    path = common.model_dir(shape)
    tok = AutoTokenizer.from_pretrained(path)
    learner = Learner(str(path), common.ds_config(world))
    prompts = [tok(p["prompt"])["input_ids"] for p in train_prompts(n_prompts)]
    mine = [prompts[i] for i in deal_prompts(len(prompts), rank, world)]
    gk = {"max_new_tokens": max_new, "min_new_tokens": max_new, "do_sample": True, "temperature": 1.0}
    hf = HFSampler(learner.module, tok, batch_size=len(mine))
    t = time.perf_counter()
    vllm = VLLMSampler(str(path), tok, seed=rank, dtype="float32", max_model_len=64 + max_new)
    engine_start = time.perf_counter() - t

    def timed(fn) -> tuple[float, int]:
        D.barrier()
        t = time.perf_counter()
        tokens = fn()
        D.barrier()
        dt = torch.tensor([time.perf_counter() - t])
        total = torch.tensor([tokens])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(total)
        return float(dt), int(total)

    def trlx_way(n):  # N separate generate calls, one sample each
        return sum(len(c[0].token_ids) for _ in range(n) for c in hf.generate(mine, 1, gk, seed=rank))

    def hf_nrs(n):
        return sum(len(c.token_ids) for cs in hf.generate(mine, n, gk, seed=rank) for c in cs)

    def vllm_n(n):
        return sum(len(c.token_ids) for cs in vllm.generate(mine, n, gk, seed=rank) for c in cs)

    vllm_n(1)  # warm-up: first-call allocations
    rows = []
    for n in ns:
        r = {
            "shape": shape,
            "n": n,
            "prompts": n_prompts,
            "max_new_tokens": max_new,
            "vllm_engine_start_s": engine_start,
        }
        for name, fn in (("a_trlx_sequential", trlx_way), ("b_hf_num_return_sequences", hf_nrs), ("c_vllm", vllm_n)):
            secs, tokens = timed(lambda: fn(n))
            r[name] = {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs}
        r["c_over_a"] = r["c_vllm"]["tokens_per_s"] / r["a_trlx_sequential"]["tokens_per_s"]
        r["c_over_b"] = r["c_vllm"]["tokens_per_s"] / r["b_hf_num_return_sequences"]["tokens_per_s"]
        rows.append(r)
        if rank == 0:
            print(
                f"[bench] {shape} N={n}: trlx {r['a_trlx_sequential']['tokens_per_s']:.0f} tok/s, "
                f"HF n={n} {r['b_hf_num_return_sequences']['tokens_per_s']:.0f} tok/s, "
                f"vLLM {r['c_vllm']['tokens_per_s']:.0f} tok/s | (c)/(a) {r['c_over_a']:.1f}x, (c)/(b) {r['c_over_b']:.1f}x",
                flush=True,
            )
    common.append_rows(out, rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="+", default=["tiny"], choices=sorted(common.SHAPES))
    ap.add_argument("--samples-per-prompt", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(common.ROOT / "benchmarks" / "sampling.jsonl"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.shape[0], args.samples_per_prompt, args.prompts, args.max_new_tokens, args.out)
        return
    for shape in args.shape:
        common.model_dir(shape)  # build once, before the ranks start
        common.launch(
            "benchmarks/bench_sampling.py",
            "--worker",
            "--shape",
            shape,
            "--samples-per-prompt",
            *map(str, args.samples_per_prompt),
            "--prompts",
            str(args.prompts),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--out",
            args.out,
        )


if __name__ == "__main__":
    sys.exit(main())
