"""Long rows: the memory and speed of one training step at 512 / 2k / 8k label tokens per row, with the label
log-probs through the chunked LM head (train.logprob_chunk, rft_ds.logprobs) and without (every label
position's logits at once, as before), and with gradient checkpointing; side by side in one command.

    python benchmarks/bench_long.py [--tokens 512,2048,8192] [--vocab 49152,128256] [--layers 4] [--out FILE]

Each setting is a fresh launch (deepspeed launcher, 1 CPU rank, ZeRO-3, bf16 compute with fp32 master weights,
fused AdamW) of a random-init Llama of SmolLM2-135M's width (hidden 576, 9 heads of 64, 3 KV heads, MLP 1536,
tied embeddings) with --layers of its 30 layers (the LM head's share of memory is what changes; fewer layers
keep an 8k-token step in minutes on 2 cores) and a 49k (SmolLM2's) or 128k (Llama 3's) vocabulary. A micro-batch
is one row: a 64-token prompt and T completion tokens, all labels. Three steps: the first builds the optimizer
state; then the peak RSS is reset (/proc/self/clear_refs) and the next two steps are measured: the transient is
the peak RSS of the step minus the RSS before it (memory that lives only during the step: activations, logits,
gradients), and label tokens/s over those two steps. Prints a table and the ratios plain / chunked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common

SETTINGS = {  # name: (logprob_chunk, gradient checkpointing)
    "plain": (0, False),
    "chunked": (1024, False),
    "chunked+gc": (1024, True),
}


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from rft_ds import distributed as D
    from rft_ds.experience import build_row
    from rft_ds.learner import Learner

    D.init("gloo", 600)
    torch.set_num_threads(args.threads)
    chunk, gc = SETTINGS[args.setting]
    ds = common.ds_config(1, micro=1)
    ds["bf16"] = {"enabled": True}
    ds["optimizer"]["params"]["fused"] = True
    learner = Learner(args.model, ds, checkpoint_above=0 if gc else None, logprob_chunk=chunk, share_prompt=False,
                      max_seq_length=64 + args.tokens)
    rng = np.random.default_rng(0)
    vocab = learner.module.config.vocab_size
    row = build_row(rng.integers(3, vocab, 64).tolist(), rng.integers(3, vocab, args.tokens - 1).tolist(), True, 2,
                    64 + args.tokens)
    labels = int((row.labels[1:] != -100).sum())

    def step() -> None:
        learner.train_step([row], [np.array([0])], pad_id=0, step_tokens=labels, world_size=1,
                           checkpoint=[gc])

    step()  # the optimizer state is built here
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    took = (time.perf_counter() - t0) / 2
    peak = rss_kb("VmHWM")
    result = {"setting": args.setting, "vocab": vocab, "tokens": args.tokens, "layers": args.layers,
              "label_tokens": labels, "step_s": round(took, 3), "label_tok_s": round(labels / took, 1),
              "rss_before_gb": round(before / 2**20, 3), "transient_gb": round((peak - before) / 2**20, 3),
              "head": learner.head is not None}
    print("RESULT " + json.dumps(result), flush=True)


def model_for(vocab: int, layers: int) -> Path:
    from rft_ds.toy import build_tiny_model

    path = common.ROOT / ".cache" / f"bench-long-v{vocab}-l{layers}"
    if not (path / "config.json").exists():
        build_tiny_model(path, hidden_size=576, num_layers=layers, num_heads=9, head_dim=64, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=16384)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--vocab", default="49152,128256")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the JSON results here")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--setting")
    ap.add_argument("--local_rank", type=int, default=0)
    args, _ = ap.parse_known_args()
    if args.worker:
        args.tokens = int(args.tokens)
        return worker(args)
    results = []
    for vocab in map(int, args.vocab.split(",")):
        model = model_for(vocab, args.layers)
        for tokens in map(int, args.tokens.split(",")):
            for setting in args.settings.split(","):
                p = common.launch_captured(__file__, ["--worker", "--model", str(model), "--setting", setting,
                                                      "--tokens", str(tokens), "--layers", str(args.layers),
                                                      "--threads", str(args.threads)], nproc=1)
                found = [json.loads(line.split("RESULT ", 1)[1]) for line in p.stdout.splitlines() if "RESULT {" in line]
                if p.returncode or not found:
                    r = {"setting": setting, "vocab": vocab, "tokens": tokens, "error": f"exit {p.returncode}: " +
                         (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
                else:
                    r = found[0]
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{'vocab':>7} {'tokens':>6} {'setting':>11} {'step s':>7} {'label tok/s':>11} {'transient GB':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['vocab']:>7} {r['tokens']:>6} {r['setting']:>11}  {r['error']}")
        else:
            print(f"{r['vocab']:>7} {r['tokens']:>6} {r['setting']:>11} {r['step_s']:>7.2f} {r['label_tok_s']:>11.1f} "
                  f"{r['transient_gb']:>12.3f}")
    print("\nplain / chunked: transient memory (higher = chunking saves more), chunked / plain: label tokens/s")
    by = {(r["vocab"], r["tokens"], r["setting"]): r for r in results if "error" not in r}
    for (vocab, tokens, setting), r in by.items():
        if setting == "plain" and (vocab, tokens, "chunked") in by:
            c = by[(vocab, tokens, "chunked")]
            print(f"  vocab {vocab:>6} x {tokens:>5} tokens: memory {r['transient_gb'] / max(c['transient_gb'], 1e-3):5.2f}x "
                  f"less, speed {c['label_tok_s'] / r['label_tok_s']:.3f}")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({"bench": "bench_long", **r}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
