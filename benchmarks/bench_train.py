"""Training throughput on the SmolLM2 demo's rows, old settings and new, one after another in one command.

    python benchmarks/bench_train.py [--steps 8] [--nproc 2] [--setting NAME]

For each setting (all, or --setting's alone) a fresh launch (deepspeed launcher, gloo, ZeRO-3) first
measures the machine's matmul peak with the threads it trains with (2048^2 torch matmuls, fp32 and bf16,
all ranks at once as in training), then trains the same rows for --steps optimizer steps: the demo's
chat-template prompts of 2-digit additions, each with two right answers ("The answer is N." and "The sum
of these two numbers is N.", EOS after each; stand-ins for the demo's sampled answers, ~10 tokens, two per
problem as its method.max_per_prompt keeps), a problem's two rows in one micro-batch:

  old        fp32, the LM head and loss over every position (HF's loss), torch's default threads per rank,
             ZeRO-3 fetching per module, torch's unfused AdamW
  new-fp32   fp32, logits only at label positions, threads shared between the node's ranks, each
             transformer block one ZeRO-3 fetch (model.zero3_block_fetch), fused AdamW (the CPU presets)
  new-bf16   the same in bf16 compute with fp32 master weights (DeepSpeed's bf16 config)
  bf16-m32   new-bf16 with micro-batches of 32 rows (the others: 16)
  bf16-m32-shared  bf16-m32 with a problem's two rows as one sequence, its prompt computed once (train.share_prompt)

It prints, per setting: label tokens and all tokens trained per second (over ranks), model FLOPs
utilisation against the peak of that dtype measured in the same launch (6 x body params x tokens + 6 x head
params x the positions the head ran on), the step time split into forward, backward and optimizer (ZeRO-3's gathers
are inside forward and backward), and each rank's RSS after it. Needs the demo model
(python -m rft_ds.smollm2 .cache/smollm2-135m-instruct, or make demo once).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

import common

MODEL = common.ROOT / ".cache" / "smollm2-135m-instruct"


def matmul_peak(dtype, seconds: float = 3.0) -> float:
    """GFLOP/s of 2048^2 matmuls in this process's threads."""
    import torch

    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def demo_rows(tokenizer, n: int):
    """The demo's training rows: its prompts (chat template) with their correct answers."""
    from rft_ds.arith import train_prompts
    from rft_ds.data import tokenize
    from rft_ds.experience import build_row

    items = train_prompts(n)
    recs = tokenize([x["prompt"] for x in items], [{} for _ in items], tokenizer, 256, "prompts", True, None)
    return [
        [
            build_row(
                r.token_ids,
                tokenizer(answer.format(x["answer"]), add_special_tokens=False)["input_ids"],
                True,
                tokenizer.eos_token_id,
                512,
            )
            for answer in ("The answer is {}.", "The sum of these two numbers is {}.")
        ]
        for r, x in zip(recs, items)
    ]


def run_setting(name: str, rows, steps: int, world: int, threads: int, mb: int = 16) -> dict:
    import numpy as np
    import torch

    from rft_ds import distributed as D
    from rft_ds.experience import collate, label_tokens, layout, sequence_lengths
    from rft_ds.learner import Learner, label_logprobs, label_positions

    torch.set_num_threads(threads)
    ds = common.ds_config(world, micro=mb)
    ds["bf16"] = {"enabled": "bf16" in name}
    ds["optimizer"]["params"]["fused"] = name != "old"
    learner = Learner(str(MODEL), ds, block_fetch=name != "old", share_prompt="shared" in name, max_seq_length=96)
    engine = learner.engine
    engine.train()
    mine = [row for pair in rows[D.rank() :: world] for row in pair]  # a problem's rows next to each other
    micro = [np.arange(i * mb, (i + 1) * mb) % len(mine) for i in range(steps)]
    total = D.all_reduce(torch.from_numpy(label_tokens(mine, micro, 1)), "sum").tolist()
    fwd = bwd = opt = 0.0
    n_tok = n_lab = n_head = 0
    for k, idx in enumerate(micro):
        t0 = time.perf_counter()  # packing is inside the timed forward: the learner does it every micro-batch
        if "shared" in name:  # as the learner lays a micro-batch out (packed where that pays)
            batch = {key: torch.from_numpy(v) for key, v in layout([mine[i] for i in idx], 0, learner.pack)[0].items()}
        else:
            batch = {key: torch.from_numpy(v) for key, v in collate([mine[i] for i in idx], 0).items()}
        if name == "old":
            out = engine(**batch, use_cache=False)
            loss = out.loss
            n_head += int(batch["input_ids"].numel())
        else:
            keep = label_positions(batch["labels"])
            out = engine(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=keep,
                position_ids=batch.get("position_ids"),
                use_cache=False,
            )
            logp, _ = label_logprobs(out.logits, batch["labels"], keep)
            loss = -logp.sum() * world / max(total[k], 1)
            n_head += len(keep) * batch["input_ids"].shape[0]  # sequences: packed rows share one
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if k:  # the first step warms up (allocations, DeepSpeed's first gathers)
            fwd, bwd, opt = fwd + t1 - t0, bwd + t2 - t1, opt + t3 - t2
            n_tok += sum(sequence_lengths([mine[i] for i in idx], learner.pack)[0])  # computed, padding not
            n_lab += int((batch["labels"][:, 1:] != -100).sum())
    params = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in learner.module.named_parameters()}
    head = learner.module.config.vocab_size * learner.module.config.hidden_size
    body = sum(params.values()) - head  # tied embeddings: the head's weights are the embedding's
    out = dict(
        setting=name,
        threads=threads,
        seconds=fwd + bwd + opt,
        forward=fwd,
        backward=bwd,
        optimizer=opt,
        tokens=n_tok,
        label_tokens=n_lab,
        flops=6 * body * n_tok + 6 * head * n_head,
        rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )
    del learner, engine
    gc.collect()
    return out


SETTINGS = (
    ("old", "default", 16),
    ("new-fp32", "shared", 16),
    ("new-bf16", "shared", 16),
    ("bf16-m32", "shared", 32),
    ("bf16-m32-shared", "shared", 32),
)


def rank_main(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from rft_ds import distributed as D

    D.init("gloo", 1800)
    world = D.world_size()
    shared = D.threads_per_rank(os.environ, len(os.sched_getaffinity(0)))
    default = len(os.sched_getaffinity(0))  # what torch took per rank before threads were shared
    torch.set_num_threads(shared)
    D.barrier()
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = demo_rows(AutoTokenizer.from_pretrained(MODEL), 16 * args.steps * world)  # 2 rows each
    name, threads, mb = next(s for s in SETTINGS if s[0] == args.setting)
    D.barrier()
    results = [
        dict(run_setting(name, rows, args.steps, world, default if threads == "default" else shared, mb), peak=peak)
    ]
    per_rank = D.all_gather_object(results)
    if D.is_main():
        print("RESULT " + json.dumps(per_rank), flush=True)
    D.barrier()
    torch.distributed.destroy_process_group()  # gloo can abort at interpreter exit with a live group


def report(per_rank: list[dict], args) -> None:
    world = len(per_rank)
    peak = {k: sum(r[0]["peak"][k] for r in per_rank) for k in ("fp32", "bf16")}  # GFLOP/s, all ranks at once
    print(
        f"\n{world} ranks; matmul peak (2048^2, the ranks' threads, all ranks at once; first launch, each MFU uses "
        f"its own): fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s in all\n"
    )
    print(
        f"{'setting':>15} {'thr':>3} {'label tok/s':>11} {'tok/s':>7} {'MFU':>6} {'step s':>7} {'fwd':>6} {'bwd':>6} "
        f"{'opt':>6} {'RSS GB (per rank)':>18}"
    )
    base, first = None, per_rank[0][0]["setting"]
    for i, name in enumerate(r["setting"] for r in per_rank[0]):
        rs = [p[i] for p in per_rank]
        wall = max(r["seconds"] for r in rs)
        lab, tok, flops = (sum(r[k] for r in rs) for k in ("label_tokens", "tokens", "flops"))
        own_peak = sum(r["peak"]["bf16" if "bf16" in name else "fp32"] for r in rs)  # this launch's
        mfu = flops / wall / 1e9 / own_peak
        steps = args.steps - 1
        base = base or lab / wall
        rss = " / ".join(f"{r['rss_gb']:.2f}" for r in rs)
        print(
            f"{name:>15} {rs[0]['threads']:>3} {lab / wall:>11.1f} {tok / wall:>7.0f} {mfu:>6.2f} {wall / steps:>7.2f} "
            f"{max(r['forward'] for r in rs) / steps:>6.2f} {max(r['backward'] for r in rs) / steps:>6.2f} "
            f"{max(r['optimizer'] for r in rs) / steps:>6.2f} {rss:>18}   ({lab / wall / base:.2f}x {first})"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--setting", default=None, help="one setting (each runs in its own processes)")
    args = ap.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if "RANK" in os.environ:
        return rank_main(args)
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} missing: python -m rft_ds.smollm2 {MODEL}")
    per_setting = []  # each setting in fresh processes: nothing left over from the one before
    for name in [args.setting] if args.setting else [s[0] for s in SETTINGS]:
        p = common.launch_captured(__file__, [*sys.argv[1:], "--setting", name], args.nproc)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.exit(f"benchmark ranks failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        per_setting.append(json.loads(line[len("RESULT ") :]))
    # one list per rank, the settings in order, each with the matmul peak measured in its own launch
    report([[ps[r][0] for ps in per_setting] for r in range(args.nproc)], args)


if __name__ == "__main__":
    main()
