"""Smoke run for a bare CUDA machine (torch + transformers + deepspeed; no vLLM, no network), which also
runs unchanged on a CPU box (gloo, the CPU DeepSpeed config), so CI keeps it alive.

    deepspeed --num_gpus 1 benchmarks/gpu_smoke.py [--out DIR]     # one GPU
    deepspeed --num_gpus 2 benchmarks/gpu_smoke.py [--out DIR]     # CPU: 2 ranks (the launcher counts NUMA nodes)
    make gpu-smoke                                                 # the same, NPROC = GPU count (or 2)

What it does, every rank, in order; any failed check prints `[gpu-smoke] FAIL ...` and exits 1:
  1. builds the tiny toy model locally (rft_ds.toy.ensure_tiny_model), nothing downloaded;
  2. runs RFT through the public API (rft_ds.train) with the HF sampler on the "say the letter" task under
     ZeRO-3 (zero3_gpu.json + nccl with CUDA, zero3_cpu.json + gloo without): 2 epochs with a checkpoint
     every epoch and eval, then `resume="auto"` with epochs=3 in the same output dir, which must continue
     the history (epochs 0, 1, 2) with finite losses;
  3. streams the trained ZeRO-3 weights through rft_ds.weight_sync.WeightSync (bucketed gathers) into
     `HFEngine`, a plain copy of the model on this rank's device that checks every tensor it is handed,
     then runs rft_ds.weight_sync.parity_check against it (fp32: 1e-3, bf16: 0.5, the recipe's defaults);
  4. prints train label tokens/s, the gather's GB/s against a same-device copy_ of as many bytes, and the
     peak memory (torch.cuda.max_memory_allocated on CUDA, peak RSS on CPU).
vLLM is never imported on this path, and the script checks that at the end.
The numbers come from a tiny model (~0.4 MB of weights): they prove the path works, not its speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rft_ds from this checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rft_ds  # noqa: E402
from rft_ds import distributed as D  # noqa: E402
from rft_ds import toy  # noqa: E402
from rft_ds.checkpoint import CheckpointError  # noqa: E402
from rft_ds.config import ConfigError, SamplerConfig  # noqa: E402
from rft_ds.data import DataError  # noqa: E402
from rft_ds.sampling.base import Completion, finish_completion  # noqa: E402
from rft_ds.scoring import RewardError  # noqa: E402
from rft_ds.weight_sync import ParityError, WeightSync, parity_check  # noqa: E402

EXPECTED_ERRORS = (ConfigError, DataError, RewardError, D.RankError, CheckpointError, ParityError)


class SmokeFailure(RuntimeError):
    """A check of this smoke run failed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SmokeFailure(message)


def say(message: str) -> None:
    if D.is_main():
        print(f"[gpu-smoke] {message}", flush=True)


@contextlib.contextmanager
def stage(name: str):
    """Name the stage in any error. The failing rank exits 1 and the deepspeed launcher then stops the others
    (no collective here: a rank that failed inside rft_ds may be out of step with the rest)."""
    try:
        yield
    except SmokeFailure as e:
        raise SmokeFailure(f"{name}: {e}") from e
    except Exception as e:
        if not isinstance(e, EXPECTED_ERRORS):  # rft_ds's own errors are one clear line already
            traceback.print_exc()
        raise SmokeFailure(f"{name}: {type(e).__name__}: {e}") from e


# --- the device --------------------------------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- train label tokens, counted as the learner lays out its micro-batches -------------------------------


class LabelTokenCounter:
    """Counts the label tokens (labels != -100) of every micro-batch this rank trains on, by wrapping the
    `layout` the learner calls (rows one by one, or a prompt's rows packed). Counting only: the batches are
    returned unchanged."""

    def __init__(self) -> None:
        self.tokens = 0

    @contextlib.contextmanager
    def counting(self):
        from rft_ds import learner
        from rft_ds.experience import IGNORE_INDEX

        original = getattr(learner, "layout", None)
        if original is None:  # the learner no longer collates through this name: tokens/s is not available
            yield
            return

        def counted(rows, pad_id, pack):
            batch, order = original(rows, pad_id, pack)
            self.tokens += int((np.asarray(batch["labels"]) != IGNORE_INDEX).sum())
            return batch, order

        learner.layout = counted
        try:
            yield
        finally:
            learner.layout = original


# --- the consumer of the weight sync: an HF "engine" that checks every tensor ------------------------------


class HFEngine:
    """A plain (non-ZeRO) copy of the model on this rank's device, standing in for a vLLM engine: it takes
    the sync's (name, tensor) stream into itself (`load_weights`), checking each tensor, and offers the
    sampler calls parity_check needs (`generate`, greedy; `prompt_logprobs`)."""

    def __init__(self, model_path: str, tokenizer, dtype: torch.dtype, dev: torch.device) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

        if is_deepspeed_zero3_enabled():  # a learner's ZeRO-3 setting still alive would partition this copy
            unset_hf_deepspeed_config()
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(dev).eval()
        check(
            not any(hasattr(p, "ds_id") for p in self.model.parameters()),
            "the engine's copy of the model came out ZeRO-3 partitioned",
        )
        self.tokenizer, self.dtype, self.device = tokenizer, dtype, dev
        self.eos_ids = {tokenizer.eos_token_id}
        self.expected = dict(self.model.named_parameters())  # what a sync must deliver, each exactly once
        self.state_names = set(self.model.state_dict())
        self.problems: list[str] = []
        self.received: list[str] = []
        self.bytes = 0

    def load_weights(self, weights) -> None:
        """Copy each streamed tensor into the model after checking name, shape, dtype, device and values.
        Problems are collected, never raised mid-stream: the stream is collective (ZeRO-3 gathers), so
        this rank must drain it whatever it finds."""
        seen = set(self.received)
        for name, t in weights:
            self.received.append(name)
            self.bytes += t.numel() * t.element_size()
            if name in seen:
                self.problems.append(f"{name}: received twice")
                continue
            seen.add(name)
            if name not in self.state_names:
                self.problems.append(f"{name}: not in the HF model's state dict")
                continue
            target = self.expected.get(name)
            if target is None:
                self.problems.append(f"{name}: in the state dict but not a parameter")
                continue
            bad = []
            if tuple(t.shape) != tuple(target.shape):
                bad.append(f"shape {tuple(t.shape)} != {tuple(target.shape)}")
            if t.dtype != self.dtype:
                bad.append(f"dtype {t.dtype} != {self.dtype}")
            if t.device != self.device:
                bad.append(f"device {t.device} != {self.device}")
            if not bad and not bool(torch.isfinite(t).all()):
                bad.append("non-finite values")
            if bad:
                self.problems.append(f"{name}: " + ", ".join(bad))
                continue
            with torch.no_grad():
                target.copy_(t)

    def missing(self) -> list[str]:
        return sorted(set(self.expected) - set(self.received))

    @torch.no_grad()
    def generate(
        self, prompts, n: int, gen_kwargs: dict, seed: int, progress=None, logprobs: bool = False
    ) -> list[list[Completion]]:
        """Greedy completions (all n the same); enough for the parity check's probes. No per-token log-probs
        (`logprobs` is accepted and ignored, as the Sampler contract allows)."""
        check(not gen_kwargs.get("do_sample", True) or n == 0, "HFEngine.generate is greedy only")
        out = []
        for p in prompts:
            ids = torch.tensor([list(p)], dtype=torch.long, device=self.device)
            seq = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=gen_kwargs["max_new_tokens"],
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.eos_ids),
            )
            c = finish_completion(seq[0, ids.shape[1] :].tolist(), self.eos_ids, (), self.tokenizer.decode)
            out.append([Completion(c.token_ids.copy(), c.finish_reason) for _ in range(n)])
        return out

    @torch.no_grad()
    def prompt_logprobs(self, sequences) -> list[np.ndarray]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, as VLLMSampler.prompt_logprobs."""
        result = []
        for s in sequences:
            ids = torch.tensor([list(s)], dtype=torch.long, device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            result.append(logp.gather(-1, ids[0, 1:, None])[:, 0].cpu().numpy())
        return result


class Drain:
    """A consumer that takes the stream and drops it: the sync's gathers and copies, timed on their own."""

    def load_weights(self, weights) -> None:
        for _ in weights:
            pass
        synchronize()


# --- the run -----------------------------------------------------------------------------------------------


def pick_ds_config(cuda: bool, override: str | None = None) -> Path:
    """ds_configs/zero3_gpu.json with CUDA, zero3_cpu.json without (or --ds-config). Both use torch's AdamW
    (`torch_adam: true`): DeepSpeed's FusedAdam would need nvcc, which a bare torch machine lacks."""
    return (
        Path(override).resolve() if override else ROOT / "ds_configs" / ("zero3_gpu.json" if cuda else "zero3_cpu.json")
    )


def run_config(model_dir: Path, run_dir: Path, ds_config: Path, backend: str, epochs: int, args) -> dict:
    lora = (
        {
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
            "gradient_checkpointing": True,
        }
        if args.lora
        else {}
    )
    return {
        "model": {"model_path": str(model_dir), **lora},
        "data": {"max_prompt_length": 32},
        "method": {
            "gen_kwargs": {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": 1.0},
            "start_percentile": 0.7,
            "end_percentile": 0.95,
            "n_improve_steps": 2,
            "n_generations_per_prompt": args.generations,
        },
        "sampler": {"backend": "hf", "batch_size": 16},
        "train": {
            "epochs": epochs,
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "max_seq_length": 64,
            "seed": 1000,
            "deepspeed_config": str(ds_config),
            "dist_backend": backend,
            "dist_timeout_s": 300,
            "output_dir": str(run_dir),
            "eval_interval": 1,
            "eval_gen_kwargs": {"max_new_tokens": args.max_new_tokens, "do_sample": False},
            "save_interval": 1,
            "progress": False,
            "tensorboard": False,
            "plots": False,
        },
    }


def check_history(history: list[dict], epochs: int, what: str) -> None:
    check(
        [r.get("epoch") for r in history] == list(range(epochs)),
        f"{what}: history has epochs {[r.get('epoch') for r in history]}, expected {list(range(epochs))}",
    )
    for r in history:
        loss = r.get("train_loss")
        check(loss is not None and math.isfinite(loss), f"{what}: epoch {r['epoch']} train_loss is {loss!r}")
        check(r.get("train_steps", 0) > 0, f"{what}: epoch {r['epoch']} ran no optimizer step")
        check(
            len(set(r["selection_digest_per_rank"])) == 1, f"{what}: ranks selected differently in epoch {r['epoch']}"
        )
    check("eval_reward_mean_initial" in history[0], f"{what}: no eval before training")
    check("eval_reward_mean" in history[-1], f"{what}: no eval after the last epoch")


def smoke(args) -> None:
    cuda = torch.cuda.is_available()
    dev = device()
    out = Path(args.out).resolve()
    model_dir = Path(args.model).resolve() if args.model else out / "model"
    run_dir = out / "run"
    ds_config = pick_ds_config(cuda, args.ds_config)
    dtype = torch.bfloat16 if json.loads(ds_config.read_text()).get("bf16", {}).get("enabled") else torch.float32
    tolerance = 1e-3 if dtype == torch.float32 else 0.5  # the recipe's defaults
    backend = "nccl" if cuda else "gloo"
    world = D.world_size()
    shown = ds_config.relative_to(ROOT) if ds_config.is_relative_to(ROOT) else ds_config
    say(f"device {device_name()} | {world} rank(s) | {backend} | {shown} | {dtype} | out {out}")

    # 1. The tiny model, built here (rank 0), and a clean run directory.
    with stage("building the tiny model"):
        if D.is_main():
            if run_dir.exists():
                shutil.rmtree(run_dir)
            toy.ensure_tiny_model(model_dir)
    D.barrier()

    # 2. RFT through the public API: 2 epochs with checkpoints, then a resume that trains a third.
    prompts, evals = toy.train_prompts(args.prompts), toy.eval_prompts(args.eval_prompts)
    counter = LabelTokenCounter()
    t0 = time.perf_counter()
    with stage("RFT run, epochs 0-1 (hf sampler, ZeRO-3, checkpoint every epoch)"), counter.counting():
        first = rft_ds.train(
            reward_fn=toy.reward_fn,
            prompts=prompts,
            eval_prompts=evals,
            metric_fn=toy.metric_fn,
            config=run_config(model_dir, run_dir, ds_config, backend, 2, args),
        )
    with stage("checking the first run"):
        check_history(first.history, 2, "first run")
        latest = run_dir / "checkpoints" / "latest"
        check(latest.is_file(), f"first run: no checkpoint written ({latest} missing)")
        ckpt = latest.parent / latest.read_text().strip()
        meta = ckpt / "meta.json"
        check(
            meta.is_file() and json.loads(meta.read_text()).get("position") == [2, "sample", 0],
            f"first run: the latest checkpoint {ckpt} is not a complete checkpoint after epoch 1",
        )
    first_history = first.history
    say(
        f"run 1: epochs 0-1 in {time.perf_counter() - t0:.1f}s, losses "
        f"{[round(r['train_loss'], 4) for r in first_history]}, checkpoint {ckpt}"
    )
    del first
    gc.collect()

    t0 = time.perf_counter()
    with stage("RFT resume to epoch 2 (resume=auto)"), counter.counting():
        result = rft_ds.train(
            reward_fn=toy.reward_fn,
            prompts=prompts,
            eval_prompts=evals,
            metric_fn=toy.metric_fn,
            config=run_config(model_dir, run_dir, ds_config, backend, 3, args),
            resume="auto",
        )
    history = result.history
    with stage("checking the resumed run"):
        check(
            result.resumed_from is not None and Path(result.resumed_from).resolve() == ckpt.resolve(),
            f"the second run did not resume from {ckpt} (resumed_from={result.resumed_from})",
        )
        check_history(history, 3, "resumed run")
        for key in ("train_loss", "selection_digest", "eval_reward_mean"):
            check(
                [r.get(key) for r in history[:2]] == [r.get(key) for r in first_history],
                f"resumed run: epochs 0-1 {key} differ from the first run's",
            )
        on_disk = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        check(on_disk == [0, 1, 2], f"metrics.jsonl has epochs {on_disk}, expected [0, 1, 2]")
    say(
        f"run 2: resumed from {ckpt.name}, epoch 2 in {time.perf_counter() - t0:.1f}s; losses "
        f"{[round(r['train_loss'], 4) for r in history]}, eval reward {history[0]['eval_reward_mean_initial']:.3f} "
        f"-> {history[-1]['eval_reward_mean']:.3f}"
    )

    # 3. The weight sync into a checking HF engine, then the parity check against it.
    tok = result.tokenizer
    probes = [tok(p["prompt"])["input_ids"] for p in prompts[:4]]
    probe_texts = [p["prompt"] for p in prompts[:4]]
    completion_len = min(8, args.max_new_tokens)
    bucket_mb = args.bucket_mb
    with stage("building the HF engine"):
        engine = HFEngine(str(model_dir), tok, dtype, dev)
    with stage("parity check before the sync (engine holds the untrained weights)"):
        stale = parity_check(result.model, engine, probes, completion_len, float("inf"), tok.pad_token_id, probe_texts)
    sync = WeightSync(result.model, engine, bucket_mb, dtype)
    with stage("weight sync (bucketed ZeRO-3 gather) into the HF engine"):
        stats = sync.sync()
        check(not engine.problems, f"{len(engine.problems)} bad tensor(s): " + "; ".join(engine.problems[:5]))
        check(not engine.missing(), f"parameters never sent: {', '.join(engine.missing()[:5])}")
        check(stats.bytes == engine.bytes, f"sync counted {stats.bytes} bytes, the engine received {engine.bytes}")
    first_tensors = len(engine.received)
    with stage("parity check after the sync"):
        diff = parity_check(result.model, engine, probes, completion_len, tolerance, tok.pad_token_id, probe_texts)
    if args.lora:  # a second sync sends the adapted (merged) modules and their fused siblings only
        with stage("LoRA: second (partial) sync, its parity check, and final_adapter"):
            engine.received.clear()  # a new sync: each tensor once again
            engine.bytes = 0
            second = sync.sync()
            check(
                second.bytes == engine.bytes, f"sync counted {second.bytes} bytes, the engine received {engine.bytes}"
            )
            check(not engine.problems, f"{len(engine.problems)} bad tensor(s): " + "; ".join(engine.problems[:5]))
            check(
                second.bytes < stats.bytes, f"the second LoRA sync sent {second.bytes} bytes, the first {stats.bytes}"
            )
            diff = parity_check(result.model, engine, probes, completion_len, tolerance, tok.pad_token_id, probe_texts)
            check((run_dir / "final_adapter" / "adapter_config.json").is_file(), "no final_adapter/ written")
        say(
            f"LoRA: second sync {second.bytes / 2**20:.3f} MiB of the first's {stats.bytes / 2**20:.3f} MiB; parity "
            f"after it {diff:.2g}"
        )
        check(
            stale > diff,
            f"the engine agrees as well with the untrained weights (max |logprob diff| {stale:.3g}) "
            f"as with the trained ones ({diff:.3g}): did training or the sync change anything?",
        )
    if stale <= tolerance:
        say(
            f"note: the untrained weights differ by only {stale:.3g} <= tolerance {tolerance:g}: this short run "
            "trained too little for the parity check to tell them from the trained ones"
        )
    with stage("engine weights against final_model"):
        if D.is_main():  # the run's own HF export of the same trained weights: must be bit-identical
            from safetensors.torch import load_file

            saved = load_file(str(run_dir / "final_model" / "model.safetensors"))
            for name, p in engine.expected.items():
                if name in saved:
                    check(
                        torch.equal(p.detach().cpu(), saved[name].to(p.dtype)),
                        f"{name}: the synced engine differs from final_model",
                    )
    say(
        f"weight sync: {first_tensors} tensors, {stats.bytes / 2**20:.2f} MiB in {stats.n_buckets} bucket(s) of "
        f"{bucket_mb:g} MiB, each name/shape/dtype/device checked; parity max |logprob diff| {diff:.2g} "
        f"(tolerance {tolerance:g}; {stale:.2g} before the sync)"
    )

    # 4. Numbers. Gather: the same stream drained, best of 3, slowest rank; baseline: copy_ of as many bytes.
    with stage("timing the gather and a device copy"):
        drain = WeightSync(result.model, Drain(), bucket_mb, dtype)
        drain.sync()  # warm-up
        gather_s = []
        for _ in range(3):
            D.barrier()
            synchronize()
            t = time.perf_counter()
            nbytes = drain.sync().bytes
            gather_s.append(time.perf_counter() - t)
        src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        dst.copy_(src)
        copy_s = []
        for _ in range(10):
            synchronize()
            t = time.perf_counter()
            dst.copy_(src)
            synchronize()
            copy_s.append(time.perf_counter() - t)
        del src, dst
    gather_t = max(D.all_gather_object(min(gather_s)))
    copy_t = max(D.all_gather_object(min(copy_s)))

    label_tokens = sum(D.all_gather_object(counter.tokens))
    train_s = sum(r["time_train"] for r in history)
    if cuda:
        peaks = D.all_gather_object(torch.cuda.max_memory_allocated())
        peak_line = (
            f"peak GPU memory: {max(peaks) / 2**30:.3f} GiB max_memory_allocated (max of {world} rank(s): "
            f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB)"
        )
    else:
        peaks = D.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        peak_line = (
            f"peak memory: {max(peaks) / 2**30:.3f} GiB peak RSS (max of {world} rank(s): "
            f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB)"
        )

    with stage("checking that vLLM was never imported"):
        check(sys.modules.get("vllm") is None, "vllm was imported on the HF path (sys.modules has it)")

    name = device_name()
    if label_tokens:
        say(
            f"SUMMARY train: {label_tokens / train_s:.1f} label tokens/s ({label_tokens} label tokens in "
            f"{train_s:.2f}s of training, 3 epochs, {world} rank(s)) on {name}"
        )
    else:
        say(
            f"SUMMARY train: label tokens not counted (rft_ds.learner.layout not found); "
            f"{sum(r['n_rows'] for r in history) / train_s:.1f} rows/s on {name}"
        )
    say(
        f"SUMMARY gather: {nbytes / gather_t / 1e9:.4f} GB/s ({nbytes / 2**20:.2f} MiB in {gather_t * 1e3:.1f} ms, "
        f"bucket {bucket_mb:g} MiB) vs device copy_ {nbytes / copy_t / 1e9:.2f} GB/s ({copy_t * 1e6:.1f} us), "
        f"ratio {copy_t / gather_t:.4f} on {name}"
    )
    say(f"SUMMARY {peak_line} on {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-smoke"), help="output directory (its run/ is replaced)")
    ap.add_argument("--model", default=None, help="where to build the tiny model (default: OUT/model)")
    ap.add_argument("--prompts", type=int, default=32, help="training prompts")
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--bucket-mb", type=float, default=SamplerConfig.sync_bucket_mb)
    ap.add_argument(
        "--ds-config",
        default=None,
        help="DeepSpeed JSON (default: ds_configs/zero3_gpu.json with CUDA, ds_configs/zero3_cpu.json without)",
    )
    ap.add_argument(
        "--lora",
        action="store_true",
        help="LoRA (r 8 on q/v/down projections) with gradient checkpointing; checks the partial second sync",
    )
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args()

    t0 = time.perf_counter()
    try:
        D.init("auto", 300)  # the device rule picks this rank's GPU; nccl with CUDA, gloo without
        smoke(args)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line and exit code 1
        rank = D.rank() if D.is_dist() else int(os.environ.get("RANK", "0"))
        if not isinstance(e, SmokeFailure):
            traceback.print_exc()
        why = str(e) if isinstance(e, SmokeFailure) else f"{type(e).__name__}: {e}"
        print(f"[gpu-smoke] FAIL (rank {rank}): {why}", file=sys.stderr, flush=True)
        return 1
    D.barrier()  # every rank got here: nothing of the run is left in flight
    say(f"PASS in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
