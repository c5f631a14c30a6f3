"""Full fine-tuning vs LoRA on the SmolLM2 demo's rows, side by side in one run: what LoRA saves, what it costs.

    python benchmarks/bench_lora.py [--steps 6] [--warmup 2] [--nproc 2] [--ckpt-dir DIR]

It starts itself under the deepspeed launcher (--nproc CPU ranks, gloo, ZeRO-3, ds_configs/zero3_cpu_bf16.json
with the demo's micro-batch 16, LR and warm-up, as in launch/configs/smollm2.yaml). Each rank runs the two
settings one after the other in the same process, each with its own rft_ds.learner.Learner, freed
(engine.destroy, del, gc.collect) before the next one is built:

  lora  r=16, alpha=32, peft's "all-linear" (every attention and MLP projection; not the tied LM head)
  full  every weight trains

`lora` runs FIRST: peak RSS is the process's high-water mark, so the second setting's figure includes the
first's; run first, LoRA's is its own, and full fine-tuning's is at least its own. Measured per setting:

  params      trainable (requires_grad) and total, at ZeRO-3's full sizes (ds_numel)
  optimizer   bytes on this rank: ZeRO-3's fp32 master partitions (optimizer.fp32_partitioned_groups_flat)
              plus every tensor of Adam's state (exp_avg, exp_avg_sq, step), read after the steps because
              torch's Adam makes its state at the first one
  step        Learner.train_step on the demo's rows (its chat-template 2-digit additions answered by the number
              and EOS), one micro-batch per optimizer step, --steps steps of which the first --warmup are not
              timed: seconds per step (slowest rank) and label tokens per second (all ranks)
  sync        rft_ds.weight_sync.WeightSync (64 MiB buckets, bf16) into a consumer that only counts: MiB and
              seconds of the first and of the second sync (LoRA sends its frozen matrices on the first only:
              with "all-linear" every projection is resent, merged, so that is the embedding alone)
  checkpoint  rft_ds.checkpoint.save into a temporary directory (removed after): MiB on disk, and under ds/
              (DeepSpeed's part; LoRA leaves the frozen base weights out: they are the model_path's)
  memory      peak RSS (ru_maxrss) per rank after the setting; current RSS (psutil) with the engine alive and
              after it is freed (the latter shows whether the second setting starts clean)

Rank 0 prints one table and a last line `JSON {...}` with every rank's numbers, which this process passes on
(the ranks' logs only if they fail). Needs the demo model: python -m rft_ds.smollm2 .cache/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # puts this checkout's rft_ds first on sys.path
from bench_train import MODEL, demo_rows

DS_CONFIG = common.ROOT / "ds_configs" / "zero3_cpu_bf16.json"
SETTINGS = ("lora", "full")  # this order: see the docstring (peak RSS)
MICRO = 16
MARK = "--- bench_lora ---"


def numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves an empty tensor and keeps the size here


def optimizer_bytes(engine: Any) -> dict[str, int]:
    """What this rank holds for the optimizer: the fp32 master copy of its partition and Adam's state of it.
    (The bf16 weights and gradient buffers are not counted: both settings have the model's bf16 weights.)"""
    import torch

    zero = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3; zero.optimizer is torch's AdamW over its flats
    master = sum(t.nbytes for t in zero.fp32_partitioned_groups_flat)
    adam = sum(v.nbytes for s in zero.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"master": master, "adam": adam, "total": master + adam}


class CountingConsumer:
    """Stands in for vLLM's load_weights: takes the sync's (name, tensor) stream and counts it, so the sync's
    time is rft_ds's gathers, merges and copies alone (gpu_timings.py's CountingConsumer, without its checks)."""

    def __init__(self) -> None:
        self.bytes, self.tensors = 0, 0

    def load_weights(self, weights) -> None:
        self.bytes, self.tensors = 0, 0
        for _, t in weights:
            self.bytes += t.numel() * t.element_size()
            self.tensors += 1


def checkpoint_size(engine: Any, tokenizer: Any, parent: str | None, setting: str) -> dict:
    """Save as the recipe does (collective), measure on rank 0, remove. Rank 0 picks the directory."""
    from rft_ds import distributed as D
    from rft_ds.checkpoint import checkpoint_name, save

    root = Path(D.broadcast_object(tempfile.mkdtemp(prefix="bench-lora-", dir=parent) if D.is_main() else None))
    saved = save(root, checkpoint_name(1), engine, {"bench": setting}, tokenizer, keep_last=1)
    out = {"save_s": saved.seconds, "own_bytes": saved.own_bytes}
    if D.is_main():
        out["bytes"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        out["ds_bytes"] = sum(f.stat().st_size for f in (saved.path / "ds").rglob("*") if f.is_file())
    D.barrier()
    if D.is_main():
        shutil.rmtree(root)
    return out


def run_setting(name: str, rows: list, tokenizer: Any, args: argparse.Namespace) -> dict:
    """Build one Learner, measure it (params, steps, optimizer, syncs, checkpoint, memory), free it."""
    import numpy as np
    import psutil
    import torch

    from rft_ds import distributed as D
    from rft_ds.config import TrainConfig
    from rft_ds.experience import label_tokens
    from rft_ds.learner import Learner, fill_ds_config, load_ds_config
    from rft_ds.lora import LoraSpec
    from rft_ds.weight_sync import WeightSync

    world = D.world_size()
    train = TrainConfig(micro_batch_size=MICRO, gradient_accumulation_steps=1, learning_rate=2e-5, warmup_steps=2)
    ds = fill_ds_config(load_ds_config(DS_CONFIG), train, world)
    spec = LoraSpec(r=16, alpha=32.0, target_modules="all-linear") if name == "lora" else None
    t = time.perf_counter()
    learner = Learner(str(MODEL), ds, lora=spec)
    params = list(learner.module.parameters())
    out: dict = {
        "setting": name,
        "init_s": time.perf_counter() - t,
        "params": sum(map(numel, params)),
        "trainable": sum(numel(p) for p in params if p.requires_grad),
    }
    del params

    mine = rows[D.rank() :: world]
    micro = [np.arange(k * MICRO, (k + 1) * MICRO) % len(mine) for k in range(args.steps)]
    step_tokens = D.all_reduce(torch.from_numpy(label_tokens(mine, micro, 1)), "sum").tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seconds, labels, losses = 0.0, 0, []
    for k, idx in enumerate(micro):
        t = time.perf_counter()
        stats = learner.train_step(mine, [idx], pad, step_tokens[k], world)
        if k >= args.warmup:  # the first steps allocate, make Adam's state and run DeepSpeed's first gathers
            seconds += time.perf_counter() - t
            labels += stats.tokens
        losses.append(stats.losses[-1])
    out.update(train_s=seconds, label_tokens=labels, losses=losses, optimizer=optimizer_bytes(learner.engine))

    consumer = CountingConsumer()
    ws = WeightSync(learner.module, consumer, 64.0, torch.bfloat16)
    for i in (1, 2):
        s = ws.sync()
        out[f"sync{i}"] = {"bytes": s.bytes, "seconds": s.seconds, "tensors": consumer.tensors}
    out["checkpoint"] = checkpoint_size(learner.engine, tokenizer, args.ckpt_dir, name)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    out["rss_gib"] = psutil.Process().memory_info().rss / 2**30
    learner.engine.destroy()  # drops ZeRO-3's hooks, which keep the module (and its partitions) referenced
    del learner, ws, consumer
    gc.collect()
    out["rss_freed_gib"] = psutil.Process().memory_info().rss / 2**30
    return out


def report(per_rank: list[list[dict]], args: argparse.Namespace) -> None:
    """Rank 0: one row per setting; times are the slowest rank's, token counts summed over ranks."""
    world, timed = len(per_rank), args.steps - args.warmup
    mib = 2**20
    out = [
        MARK,
        f"{world} ranks (gloo, CPU), ZeRO-3 bf16, micro-batch {MICRO}, {timed} timed steps of {args.steps}; "
        "per-rank figures read rank 0 / rank 1 / ...; `lora` ran first (peak RSS is the process's)",
    ]
    head = (
        f"{'setting':>7} | {'trainable params':>18} | {'optimizer MiB/rank':>18} | {'step s':>6} | "
        f"{'label tok/s':>11} | {'sync1 MiB / s':>14} | {'sync2 MiB / s':>14} | {'checkpoint MiB':>16} | "
        f"{'peak RSS GiB per rank':>21}"
    )
    out += [head, "-" * len(head)]
    for i, name in enumerate(SETTINGS):
        rs = [p[i] for p in per_rank]
        wall = max(r["train_s"] for r in rs)
        opt = " / ".join(f"{r['optimizer']['total'] / mib:.0f}" for r in rs)
        sync = [f"{rs[0][k]['bytes'] / mib:.1f} / {max(r[k]['seconds'] for r in rs):.2f}" for k in ("sync1", "sync2")]
        ck = rs[0]["checkpoint"]
        ckpt = f"{ck['bytes'] / mib:.0f} (ds/ {ck['ds_bytes'] / mib:.0f})"
        rss = " / ".join(f"{r['peak_rss_gib']:.2f}" for r in rs)
        trainable = f"{rs[0]['trainable'] / 1e6:.2f}M of {rs[0]['params'] / 1e6:.1f}M"
        out.append(
            f"{name:>7} | {trainable:>18} | {opt:>18} | {wall / timed:>6.2f} | "
            f"{sum(r['label_tokens'] for r in rs) / wall:>11.1f} | {sync[0]:>14} | {sync[1]:>14} | "
            f"{ckpt:>16} | {rss:>21}"
        )
    for i, name in enumerate(SETTINGS):
        now = " / ".join(f"{p[i]['rss_gib']:.2f} -> {p[i]['rss_freed_gib']:.2f}" for p in per_rank)
        out.append(f"{name}: current RSS GiB per rank (psutil), engine alive -> freed: {now}")
    out.append(
        "JSON "
        + json.dumps(
            {
                "world": world,
                "steps": args.steps,
                "warmup": args.warmup,
                "micro": MICRO,
                "settings": list(SETTINGS),
                "per_rank": per_rank,
            }
        )
    )
    print("\n".join(out), flush=True)  # one write: the other ranks' and the launcher's lines stay outside it


def rank_main(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from rft_ds import distributed as D

    D.init("gloo", 1800)  # also shares the node's cores between its ranks (threads_per_rank)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    rows = demo_rows(tokenizer, MICRO * args.steps * D.world_size())
    results = []
    for name in SETTINGS:
        D.barrier()
        results.append(run_setting(name, rows, tokenizer, args))
    per_rank = D.all_gather_object(results)
    if D.is_main():
        report(per_rank, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per setting, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes)")
    ap.add_argument("--ckpt-dir", default=None, help="where the temporary checkpoints go (default: the system's tmp)")
    args = ap.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")
    if "RANK" in os.environ:
        return rank_main(args)
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} missing: python -m rft_ds.smollm2 {MODEL}")
    p = common.launch_captured(__file__, sys.argv[1:], args.nproc)
    lines = p.stdout.splitlines()
    start = next((i for i, x in enumerate(lines) if x == MARK), None)
    end = next((i for i, x in enumerate(lines) if x.startswith("JSON ") and start is not None and i > start), None)
    if p.returncode != 0 or start is None or end is None:
        sys.exit(f"benchmark ranks failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    print("\n".join(lines[start + 1 : end + 1]))


if __name__ == "__main__":
    main()
