"""Long rows: the memory and speed of one training step at 512 / 2k / 8k label tokens per row, with the label
log-probs through the chunked LM head (train.logprob_chunk, rft_ds.logprobs) and without (every label
position's logits at once, as before), and with gradient checkpointing; side by side in one command.

    python benchmarks/bench_long.py [--tokens 512,2048,8192] [--vocab 49152,128256] [--layers 2] [--out FILE]

Each setting is a fresh launch (deepspeed launcher, 1 CPU rank, ZeRO-3, bf16 compute with fp32 master weights,
fused AdamW) of a random-init Llama of SmolLM2-135M's width (hidden 576, 9 heads of 64, 3 KV heads, MLP 1536,
tied embeddings) with --layers (default 2) of its 30 layers (the LM head's share of memory is what changes; fewer layers
keep an 8k-token step in minutes on 2 cores) and a 49k (SmolLM2's) or 128k (Llama 3's) vocabulary. A micro-batch
is one row: a 64-token prompt and T completion tokens, all labels. Two steps: the first builds the optimizer
state; then the peak RSS is reset (/proc/self/clear_refs) and the second step is measured: the transient is
its peak RSS minus the RSS before it (memory that lives only during the step: activations, logits, gradients),
and its label tokens/s. Prints a table and the ratios plain / chunked.

    python benchmarks/bench_long.py --grow [--new-tokens 2048] [--n 8] [--prompts 32]

A grow step of the tiny model (the toy task, 2 ranks, ZeRO-3, a colocated vLLM engine per rank) whose
completions are 90-100 % of --new-tokens long (min_new_tokens): sampled tokens/s, peak RSS per rank, and the
bytes per sampled token of a checkpoint written after its first optimizer step (the pool shard holds every
completion sampled: method.pool accumulate) in each rank's state file.

    python benchmarks/bench_long.py --sp [--tokens 4096,16384] [--layers 2]

Sequence parallelism (train.sequence_parallel): one row of T label tokens as one optimizer step on 2 CPU ranks
(1 thread each), trained by one rank while the other runs an empty micro-batch (sp1: what data parallelism
does with a single row) or by both, each on half its positions (sp2: Ulysses attention). Per rank: the step's
transient memory (as above) and its time. The model: SmolLM2-135M's width with 8 heads of 64 and 4 KV heads
(hidden 512: Ulysses splits the heads over the ranks, and 9 do not split in 2), chunked head, bf16.

    python benchmarks/bench_long.py --activations [--tokens 1024,4096] [--layers 2]

The bytes autograd keeps for the backward pass per token, layer and unit of hidden size (saved-tensor hooks,
exact), with and without gradient checkpointing: where learner.ACTIVATION_BYTES comes from.

    python benchmarks/bench_long.py --state [--state-tokens 10000000,100000000]

A rank's state file as a mid-epoch checkpoint writes it (torch.save without its CRC, then fsync and the
manifest's checksum: checkpoint.seal) for a pool shard and a grow step's samples of that many tokens in
completions of 2k tokens: bytes per token and seconds.
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
    sp = int(args.setting[2:]) if args.setting.startswith("sp") else 1
    chunk, gc = SETTINGS.get(args.setting, (1024, False))
    ds = common.ds_config(D.world_size(), micro=1)
    ds["bf16"] = {"enabled": True}
    ds["optimizer"]["params"]["fused"] = True
    learner = Learner(
        args.model,
        ds,
        checkpoint_above=0 if gc else None,
        logprob_chunk=chunk,
        share_prompt=False,
        max_seq_length=64 + args.tokens,
        sequence_parallel=sp,
    )
    rng = np.random.default_rng(0)
    vocab = learner.module.config.vocab_size
    row = build_row(
        rng.integers(3, vocab, 64).tolist(), rng.integers(3, vocab, args.tokens - 1).tolist(), True, 2, 64 + args.tokens
    )
    labels = int((row.labels[1:] != -100).sum())

    # rank 0 trains the row; under sequence parallelism its whole group does, else the others run an empty one
    mine = [row] if D.rank() < sp else []

    def step() -> None:
        learner.train_step(
            mine, [np.arange(len(mine))], pad_id=0, step_tokens=labels, world_size=D.world_size(), checkpoint=[gc]
        )

    step()  # the optimizer state is built here
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    took = time.perf_counter() - t0
    peak = rss_kb("VmHWM")
    per_rank = D.all_gather_object((round(took, 3), round((peak - before) / 2**20, 3), round(before / 2**20, 3)))
    took = max(t for t, _, _ in per_rank)
    result = {
        "setting": args.setting,
        "vocab": vocab,
        "tokens": args.tokens,
        "layers": args.layers,
        "label_tokens": labels,
        "step_s": round(took, 3),
        "label_tok_s": round(labels / took, 1),
        "rss_before_gb": max(b for *_, b in per_rank),
        "transient_gb": max(m for _, m, _ in per_rank),
        "transient_gb_per_rank": [m for _, m, _ in per_rank],
        "head": learner.head is not None,
    }
    if D.rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


def model_for(vocab: int, layers: int, heads: int = 9) -> Path:
    """SmolLM2-135M's shape (9 heads of 64, 3 KV heads), or 8 heads of 64 and 4 KV heads (--sp)."""
    from rft_ds.toy import build_tiny_model

    path = common.ROOT / ".cache" / (f"bench-long-v{vocab}-l{layers}" + ("" if heads == 9 else f"-h{heads}"))
    if not (path / "config.json").exists():
        build_tiny_model(
            path,
            hidden_size=64 * heads,
            num_layers=layers,
            num_heads=heads,
            head_dim=64,
            num_key_value_heads=3 if heads == 9 else heads // 2,
            intermediate_size=1536,
            vocab_size=vocab,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        )
    return path


def grow_step(args: argparse.Namespace) -> None:
    """One grow epoch of the tiny model with long completions, then its numbers."""
    import os
    import subprocess
    import tempfile

    from rft_ds.distributed import free_port
    from rft_ds.toy import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-long-grow-"))
    build_tiny_model(tmp / "model", max_position_embeddings=args.new_tokens + 64)
    lo = int(args.new_tokens * 0.9)
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--config",
        "launch/configs/tiny.yaml",
        f"model.model_path={tmp / 'model'}",
        "model.build=null",
        f"train.output_dir={tmp / 'run'}",
        "train.epochs=1",
        "train.eval_interval=0",
        "train.max_seq_length=auto",
        "train.save_every_steps=1",
        "train.save_final_model=false",
        "train.save_best_model=false",
        f"method.n_generations_per_prompt={args.n}",
        f"sampler.chunk_prompts={args.prompts}",
        f"method.gen_kwargs={{max_new_tokens: {args.new_tokens}, min_new_tokens: {lo}, do_sample: true}}",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if p.returncode:
        print(p.stdout[-2000:], p.stderr[-2000:])
        raise SystemExit(p.returncode)
    rec = json.loads((tmp / "run" / "metrics.jsonl").read_text().splitlines()[0])
    ckpts = sorted((tmp / "run" / "checkpoints").glob("epoch_*"))
    state = [f.stat().st_size for f in sorted(ckpts[0].glob("rank*.pt"))]
    result = {
        "new_tokens": args.new_tokens,
        "n": args.n,
        "sampled": rec["n_sampled"],
        "sampled_tokens": rec["sampled_tokens"],
        "sample_s": round(rec["time_sample"], 1),
        "sampled_tok_s": round(rec["sampled_tokens"] / rec["time_sample"], 1),
        "truncated_share": rec["truncated_share"],
        "train_s": round(rec["time_train"], 1),
        "peak_rss_gb": rec["peak_rss_gb"],
        "checkpoint": ckpts[0].name,
        "state_bytes_per_rank": state,
        "state_bytes_per_sampled_token": round(sum(state) / rec["sampled_tokens"], 2),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"bench": "bench_long --grow", **result}) + "\n")


def state_file(args: argparse.Namespace) -> None:
    """A rank's checkpoint state file for pools and samples of N tokens: bytes per token and save seconds."""
    import os
    import tempfile

    import numpy as np
    import torch

    from rft_ds.checkpoint import _without_zip_crc, seal
    from rft_ds.pool import LocalPool
    from rft_ds.samples import Samples
    from rft_ds.sampling.base import Completion

    rng = np.random.default_rng(0)
    for total in map(int, args.state_tokens.split(",")):
        length = 2048
        n = total // length
        flat = rng.integers(0, 128256, n * length, dtype=np.int32)
        comps = [Completion(flat[i * length : (i + 1) * length], "eos") for i in range(n)]
        for what in ("pool", "samples"):
            if what == "pool":
                obj = LocalPool(0)
                obj.add(np.arange(n) // 8, rng.random(n), np.ones(n, bool), [c.token_ids for c in comps], step=0)
            else:
                obj = Samples()
                for lo in range(0, n, 256 * 8):  # chunks of 256 prompts x 8 samples
                    part = comps[lo : lo + 256 * 8]
                    obj.add(lo // 8, [part[i : i + 8] for i in range(0, len(part), 8)])
            (common.ROOT / ".cache").mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=common.ROOT / ".cache") as d:
                t0 = time.perf_counter()
                with _without_zip_crc():
                    torch.save({"local": {what: obj}}, Path(d) / "rank0.pt", pickle_protocol=4)  # as checkpoint.save
                saved = time.perf_counter() - t0
                seal(Path(d), ["rank0.pt"], 0)
                took = time.perf_counter() - t0
                size = os.path.getsize(Path(d) / "rank0.pt")
            r = {
                "what": what,
                "tokens": n * length,
                "bytes_per_token": round(size / (n * length), 3),
                "torch_save_s": round(saved, 2),
                "save_fsync_checksum_s": round(took, 2),
            }
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"bench": "bench_long --state", **r}) + "\n")
            del obj
        del comps, flat


def activations(args: argparse.Namespace) -> None:
    """Bytes autograd keeps for the backward pass, per token, per layer and per unit of hidden size, counted
    with saved-tensor hooks (exact, unlike RSS): the body of a bf16 Llama of SmolLM2-135M's shape, sdpa, with
    and without gradient checkpointing (learner.ACTIVATION_BYTES)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=16384,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    params = {p.data_ptr() for p in model.parameters()}
    for gc in (False, True):
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for tokens in map(int, args.tokens.split(",")):
            saved: dict = {}

            def keep(t):
                if t.data_ptr() not in params:  # a weight is not an activation
                    saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                model.model(input_ids=torch.randint(0, cfg.vocab_size, (1, tokens)))
            per = sum(saved.values()) / tokens / args.layers / cfg.hidden_size
            r = {
                "gradient_checkpointing": gc,
                "tokens": tokens,
                "layers": args.layers,
                "saved_mb": round(sum(saved.values()) / 2**20, 1),
                "bytes_per_token_layer_hidden": round(per, 2),
            }
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"bench": "bench_long --activations", **r}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--vocab", default="49152,128256")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the JSON results here")
    ap.add_argument("--grow", action="store_true", help="a grow step of the tiny model with long completions")
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32, help="--grow: prompts per sampling chunk")
    ap.add_argument("--state", action="store_true", help="a rank's checkpoint state file at --state-tokens")
    ap.add_argument("--state-tokens", default="10000000,100000000")
    ap.add_argument("--activations", action="store_true", help="saved activations per token (exact)")
    ap.add_argument("--sp", action="store_true", help="one row on 2 ranks: alone vs sequence parallel")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--setting")
    ap.add_argument("--local_rank", type=int, default=0)
    args, _ = ap.parse_known_args()
    if args.worker:
        args.tokens = int(args.tokens)
        return worker(args)
    if args.grow:
        return grow_step(args)
    if args.state:
        return state_file(args)
    if args.activations:
        return activations(args)
    if args.sp:
        args.vocab, args.settings, args.threads = "49152", "sp1,sp2", 1
    results = []
    for vocab in map(int, args.vocab.split(",")):
        model = model_for(vocab, args.layers, 8 if args.sp else 9)
        for tokens in map(int, args.tokens.split(",")):
            for setting in args.settings.split(","):
                p = common.launch_captured(
                    __file__,
                    [
                        "--worker",
                        "--model",
                        str(model),
                        "--setting",
                        setting,
                        "--tokens",
                        str(tokens),
                        "--layers",
                        str(args.layers),
                        "--threads",
                        str(args.threads),
                    ],
                    nproc=2 if args.sp else 1,
                )
                found = [
                    json.loads(line.split("RESULT ", 1)[1]) for line in p.stdout.splitlines() if "RESULT {" in line
                ]
                if p.returncode or not found:
                    r = {
                        "setting": setting,
                        "vocab": vocab,
                        "tokens": tokens,
                        "error": f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or ["?"])[-1][:200],
                    }
                else:
                    r = found[0]
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{'vocab':>7} {'tokens':>6} {'setting':>11} {'step s':>7} {'label tok/s':>11} {'transient GB':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['vocab']:>7} {r['tokens']:>6} {r['setting']:>11}  {r['error']}")
        else:
            print(
                f"{r['vocab']:>7} {r['tokens']:>6} {r['setting']:>11} {r['step_s']:>7.2f} {r['label_tok_s']:>11.1f} "
                f"{r['transient_gb']:>12.3f}"
            )
    if args.sp:
        print(
            "\nsp1 / sp2: the largest transient over the ranks, and the step's time (higher = sequence parallelism "
            "saves more)"
        )
        by = {(r["tokens"], r["setting"]): r for r in results if "error" not in r}
        for (tokens, setting), r in by.items():
            if setting == "sp1" and (tokens, "sp2") in by:
                o = by[(tokens, "sp2")]
                print(
                    f"  {tokens:>6} tokens: memory {r['transient_gb'] / max(o['transient_gb'], 1e-3):5.2f}x less, "
                    f"time {r['step_s'] / o['step_s']:.3f}x less; per rank {r['transient_gb_per_rank']} -> "
                    f"{o['transient_gb_per_rank']} GB"
                )
        return
    print("\nplain / chunked: transient memory (higher = chunking saves more), chunked / plain: label tokens/s")
    by = {(r["vocab"], r["tokens"], r["setting"]): r for r in results if "error" not in r}
    for (vocab, tokens, setting), r in by.items():
        if setting == "plain" and (vocab, tokens, "chunked") in by:
            c = by[(vocab, tokens, "chunked")]
            print(
                f"  vocab {vocab:>6} x {tokens:>5} tokens: memory {r['transient_gb'] / max(c['transient_gb'], 1e-3):5.2f}x "
                f"less, speed {c['label_tok_s'] / r['label_tok_s']:.3f}"
            )
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({"bench": "bench_long", **r}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
