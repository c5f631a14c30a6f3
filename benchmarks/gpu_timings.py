"""Speed of rft_ds's own training and weight-sync paths on ONE device, with random-init Llamas built here
(nothing from a hub; speed depends on shapes, not weight values). gpu_smoke.py proves the path works on a
0.4 MB model; this times it on real shapes:

    python -m deepspeed.launcher.runner --num_gpus 1 benchmarks/gpu_timings.py --size 135m   # or 1b
    OMP_NUM_THREADS=1 python -m deepspeed.launcher.runner --num_gpus 1 benchmarks/gpu_timings.py --size tiny  # CPU

  1. peak: bf16 torch.mm (8192^2 on CUDA, 1024^2 on CPU), best of a few timed repeats, in TFLOP/s;
  2. train: rft_ds.learner.Learner (ZeRO-3; zero3_gpu.json on CUDA, zero3_cpu_bf16.json on CPU; torch AdamW)
     on random rows of 128 prompt + 384 completion tokens (labels on the completion), one micro-batch per
     optimizer step, the first --warmup steps untimed. MFU = model FLOPs / timed seconds (forward, backward,
     optimizer) / the peak of (1), with model FLOPs per timed step
         6 * body_params * all_tokens            (body: every parameter but the tied embedding / LM head)
       + 6 * vocab * hidden * label_positions    (the head runs only where a label is: logits_to_keep)
       + 12 * layers * heads * head_dim * seq^2 per row (attention scores and values, forward and backward,
                                                 no causal discount: the PaLM convention; attention_pairs);
     with --per-prompt K --share, a prompt's K rows are one sequence (train.share_prompt) where the learner's
     cost rule packs them, and the tokens counted are those computed. max_seq_length is K rows here, so all K
     may pack; a run packs only as many rows as fit its train.max_seq_length; --logprob-chunk and --gc set the
     label log-probs' chunk (0: all at once) and gradient checkpointing, for long rows (issue 28):
         ... gpu_timings.py --size 1b --micro 1 --completion-len 4096 --logprob-chunk 0|1024 [--gc]
     and the train section's peak GPU memory compares them;
  3. sync: the trained weights streamed through rft_ds.weight_sync.WeightSync (bucketed ZeRO-3 gathers) into a
     consumer that counts bytes and checks device and dtype; GB/s against a same-device copy_ of as many bytes.
Each section has its own try/except; exit code 1 if any failed. The last line is `[gpu-timings] JSON {...}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rft_ds from this checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rft_ds import distributed as D  # noqa: E402

# SmolLM2-135M's and Llama-3.2-1B's shapes (head_dim 64 both), all with tied embeddings.
SIZES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def say(message: str) -> None:
    print(f"[gpu-timings] {message}", flush=True)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def section(name: str, failed: list[str]):
    """One failing section prints its traceback and lets the others run (and the exit code says so)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported, counted, and the run goes on
        traceback.print_exc()
        say(f"FAIL {name}: {type(e).__name__}: {e}")
        failed.append(name)


def matmul_peak(dev: torch.device) -> float:
    """Measured bf16 matmul TFLOP/s: the denominator of MFU (a spec sheet's number is not reachable)."""
    n, warm, reps, iters = (8192, 5, 5, 10) if dev.type == "cuda" else (1024, 2, 3, 3)
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=dev) for _ in range(2))
    for _ in range(warm):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):  # best repeat: clocks ramp up and the first repeats can be slow
        synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * iters / best / 1e12


def build_model(size: str, out: Path, dev: torch.device, positions: int = 2048) -> None:
    """A random-init Llama of `size` with `positions` positions, saved in bf16 (what the learner loads). Built
    on the device, where initialising a billion parameters takes a second, before any ZeRO-3 setting exists
    to partition it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    config = LlamaConfig(
        **shape,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        tie_word_embeddings=True,
        max_position_embeddings=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def random_rows(n: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0, per_prompt: int = 1) -> list:
    """Rows built by rft_ds.experience.build_row from random ids: labels on the completion only, no EOS;
    each prompt answered per_prompt times, its rows next to each other."""
    from rft_ds.experience import build_row

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, prompt_len) for _ in range(-(-n // per_prompt))]
    return [
        build_row(
            prompts[i // per_prompt], rng.integers(3, vocab, completion_len), False, 2, prompt_len + completion_len
        )
        for i in range(n)
    ]


def memory(dev: torch.device, key: str, out: dict) -> None:
    """Peak allocated GPU memory since the last reset (CUDA), or the process's peak RSS (CPU: no reset)."""
    if dev.type == "cuda":
        out[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        say(f"{key}: peak {out[f'{key}_peak_gib']:.2f} GiB torch.cuda.max_memory_allocated")
        torch.cuda.reset_peak_memory_stats()
    else:
        out[f"{key}_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        say(f"{key}: peak RSS {out[f'{key}_peak_rss_gib']:.2f} GiB (process lifetime)")


def attention_pairs(rows, pack) -> int:
    """The (query, key) pairs attention needs for these rows as the learner lays them out, without a causal
    discount: a row's length squared; in a packed sequence, the shared prefix's h^2 and each segment's
    s^2 + 2 h s (the pairs its mask lets through, not the whole square the kernel computes)."""
    from rft_ds.experience import pack_plan, sequence_lengths, shared_head

    if not sequence_lengths(rows, pack)[1]:
        return sum(len(r.input_ids) ** 2 for r in rows)
    total = 0
    for members in pack_plan(rows, pack.max_len):
        h = shared_head(rows[members[0]])
        total += h * h + sum((len(rows[i].input_ids) - h) ** 2 + 2 * h * (len(rows[i].input_ids) - h) for i in members)
    return total


def train(learner, args, world: int, peak_tflops: float | None, out: dict) -> None:
    """Time Learner.train_step, one micro-batch per optimizer step, as the recipe calls it. The tokens (and so
    the FLOPs) are those computed: with --share, a prompt's rows packed where that pays (sequence_lengths)."""
    from rft_ds.experience import sequence_lengths

    cfg = learner.module.config
    rows = random_rows(
        args.micro * args.steps, args.prompt_len, args.completion_len, cfg.vocab_size, per_prompt=args.per_prompt
    )
    label_per_step = args.micro * args.completion_len  # a row's first position is a prompt token: never a label
    seconds, labels, tokens, squares, losses = 0.0, 0, 0, 0, []
    for k in range(args.steps):
        idx = np.arange(k * args.micro, (k + 1) * args.micro)
        synchronize()
        t = time.perf_counter()
        stats = learner.train_step(rows, [idx], pad_id=0, step_tokens=label_per_step * world, world_size=world)
        synchronize()
        losses.append(stats.losses[-1])
        if k >= args.warmup:  # the first steps allocate, and run DeepSpeed's first gathers
            seconds += time.perf_counter() - t
            labels += stats.tokens
            lengths, _ = sequence_lengths([rows[i] for i in idx], learner.pack)  # as the learner lays them out
            tokens += sum(lengths)
            squares += attention_pairs([rows[i] for i in idx], learner.pack)
    timed = args.steps - args.warmup
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in learner.module.parameters())  # tied: once
    # LoRA: the 6x rule counts weight gradients of frozen weights too, so its MFU is an upper bound
    out["train_trainable_params"] = sum(
        int(getattr(p, "ds_numel", p.numel())) for p in learner.module.parameters() if p.requires_grad
    )
    head = cfg.vocab_size * cfg.hidden_size
    body = total - head * (1 if cfg.tie_word_embeddings else 2)
    seq = args.prompt_len + args.completion_len
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * squares  # each computed sequence
    flops = 6 * body * tokens + 6 * head * labels + attn
    out.update(
        train_params=total,
        train_body_params=body,
        train_steps_timed=timed,
        train_seconds=seconds,
        train_step_ms=1e3 * seconds / timed,
        train_label_tokens_per_s=labels / seconds,
        train_tokens_per_s=tokens / seconds,
        train_tflops=flops / seconds / 1e12,
        train_loss_first=losses[0],
        train_loss_last=losses[-1],
        attn_impl=cfg._attn_implementation,
    )
    if peak_tflops:
        out["train_mfu"] = out["train_tflops"] / peak_tflops
    say(
        f"train: {total / 1e6:.1f}M params ({body / 1e6:.1f}M body), micro {args.micro} x {seq} tokens, "
        f"{timed} timed steps of {out['train_step_ms']:.1f} ms, {cfg._attn_implementation} attention"
    )
    say(
        f"train: {out['train_label_tokens_per_s']:.0f} label tokens/s, {out['train_tokens_per_s']:.0f} tokens/s, "
        f"{out['train_tflops']:.2f} TFLOP/s, MFU {out.get('train_mfu', float('nan')):.3f}; "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (ln vocab {np.log(cfg.vocab_size):.3f})"
    )


class CountingConsumer:
    """Stands in for vLLM's reload: takes the sync's (name, tensor) stream, counts bytes and checks that each
    tensor is on the rank's device in the sync's dtype (a CPU bounce would show as a wrong device)."""

    def __init__(self, dev: torch.device, dtype: torch.dtype) -> None:
        self.dev, self.dtype, self.bytes, self.names, self.problems = dev, dtype, 0, 0, []

    def load_weights(self, weights) -> None:
        self.bytes, self.names = 0, 0
        for name, t in weights:
            self.bytes += t.numel() * t.element_size()
            self.names += 1
            if t.device != self.dev or t.dtype != self.dtype:
                self.problems.append(f"{name}: {t.device} {t.dtype}")
        synchronize()


def sync(learner, dev: torch.device, bucket_mb: float, out: dict) -> None:
    """Time WeightSync.sync (best of 3 after a warm-up) against copy_ of as many bytes on the same device."""
    from rft_ds.weight_sync import WeightSync

    consumer = CountingConsumer(dev, torch.bfloat16)
    ws = WeightSync(learner.module, consumer, bucket_mb, torch.bfloat16)
    ws.sync()  # warm-up
    from rft_ds.lora import sync_items

    n_params = len(sync_items(learner.module))  # the base model's tensors (a LoRA model's merged)
    if consumer.problems or consumer.names != n_params:
        raise RuntimeError(f"{consumer.names} of {n_params} tensors, bad: {'; '.join(consumer.problems[:5])}")
    best = float("inf")
    for _ in range(3):
        synchronize()
        t = time.perf_counter()
        stats = ws.sync()
        best = min(best, time.perf_counter() - t)
    memory(dev, "sync", out)  # before the copy_ baseline's two buffers of the model's size
    src = torch.ones(stats.bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = float("inf")
    for _ in range(10):
        synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        synchronize()
        copy = min(copy, time.perf_counter() - t)
    del src, dst
    out.update(
        sync_mib=stats.bytes / 2**20,
        sync_tensors=consumer.names,
        sync_buckets=stats.n_buckets,
        sync_bucket_mb=bucket_mb,
        sync_seconds=best,
        sync_gb_per_s=stats.bytes / best / 1e9,
        copy_gb_per_s=stats.bytes / copy / 1e9,
        sync_peak_extra_mib=stats.peak_extra_bytes / 2**20,
    )
    say(
        f"sync: {out['sync_mib']:.1f} MiB in {consumer.names} tensors, {stats.n_buckets} bucket(s) of {bucket_mb:g} MiB, "
        f"{best * 1e3:.1f} ms = {out['sync_gb_per_s']:.2f} GB/s vs copy_ {out['copy_gb_per_s']:.2f} GB/s "
        f"({out['sync_gb_per_s'] / out['copy_gb_per_s']:.3f} of it)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--micro", type=int, default=8, help="rows per micro-batch (= per optimizer step)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--completion-len", type=int, default=384)
    ap.add_argument("--bucket-mb", type=float, default=64.0, help="WeightSync bucket (sampler.sync_bucket_mb)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on every linear layer (alpha = 2 x rank); 0: full")
    ap.add_argument(
        "--per-module",
        action="store_true",
        help="ZeRO-3 fetches per module (model.zero3_block_fetch false), the behaviour before per-block fetching",
    )
    ap.add_argument("--fused", action="store_true", help="torch's fused AdamW (optimizer params fused: true)")
    ap.add_argument("--per-prompt", type=int, default=1, help="rows per prompt (consecutive: one micro-batch)")
    ap.add_argument("--share", action="store_true", help="a prompt's rows as one sequence (train.share_prompt)")
    ap.add_argument(
        "--logprob-chunk",
        type=int,
        default=1024,
        help="train.logprob_chunk (0: every label position's logits at once, as before issue 28)",
    )
    ap.add_argument(
        "--gc",
        action="store_true",
        help="gradient checkpointing on every micro-batch (model.gradient_checkpointing: true)",
    )
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args()
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")

    import deepspeed
    import transformers

    failed: list[str] = []
    out: dict = {
        "lora_r": args.lora,
        "size": args.size,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "micro": args.micro,
        "steps": args.steps,
        "warmup": args.warmup,
        "seq": args.prompt_len + args.completion_len,
        "block_fetch": not args.per_module,
        "fused": args.fused,
        "per_prompt": args.per_prompt,
        "share_prompt": args.share,
        "logprob_chunk": args.logprob_chunk,
        "gradient_checkpointing": args.gc,
    }
    t0 = time.perf_counter()
    D.init("auto", 600)  # the device rule picks the GPU; nccl with CUDA, gloo without
    dev, world = D.device(), D.world_size()
    out["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    ds_path = ROOT / "ds_configs" / ("zero3_gpu.json" if dev.type == "cuda" else "zero3_cpu_bf16.json")
    say(
        f"{out['device']} | {world} rank(s) | torch {torch.__version__} | size {args.size} | {ds_path.name} | "
        f"{'per-module' if args.per_module else 'per-block'} fetch | {'fused' if args.fused else 'unfused'} AdamW"
    )

    peak = None
    with section("peak", failed):
        peak = out["peak_bf16_tflops"] = matmul_peak(dev)
        say(f"peak: bf16 torch.mm {peak:.2f} TFLOP/s")

    learner = None
    with tempfile.TemporaryDirectory(prefix="gpu-timings-") as tmp:
        with section("train", failed):
            from rft_ds.config import TrainConfig
            from rft_ds.learner import Learner, fill_ds_config, load_ds_config

            t = time.perf_counter()
            build_model(args.size, Path(tmp) / "model", dev, max(2048, args.prompt_len + args.completion_len))
            out["build_s"] = time.perf_counter() - t
            ds = fill_ds_config(
                load_ds_config(ds_path),
                TrainConfig(
                    micro_batch_size=args.micro, gradient_accumulation_steps=1, learning_rate=1e-5, warmup_steps=0
                ),
                world,
            )
            if args.fused:
                ds["optimizer"]["params"]["fused"] = True
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            from rft_ds.lora import LoraSpec

            learner = Learner(
                str(Path(tmp) / "model"),
                ds,
                LoraSpec(r=args.lora, alpha=2 * args.lora) if args.lora else None,
                block_fetch=not args.per_module,
                share_prompt=args.share,
                max_seq_length=(args.prompt_len + args.completion_len) * args.per_prompt,
                checkpoint_above=0 if args.gc else None,
                logprob_chunk=args.logprob_chunk,
            )
            out["learner_init_s"] = time.perf_counter() - t
            say(f"train: model built in {out['build_s']:.1f}s, Learner (ZeRO-3) up in {out['learner_init_s']:.1f}s")
            train(learner, args, world, peak, out)
            memory(dev, "train", out)
    with section("sync", failed):
        if learner is None:
            raise RuntimeError("no learner: the train section failed before building it")
        sync(learner, dev, args.bucket_mb, out)

    out["failed"], out["total_s"] = failed, time.perf_counter() - t0
    say(f"{'FAIL: ' + ', '.join(failed) if failed else 'OK'} in {out['total_s']:.1f}s")
    say("JSON " + json.dumps(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
