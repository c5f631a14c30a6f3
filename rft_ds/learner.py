"""The learner: an HF causal LM under DeepSpeed ZeRO-3, trained with masked cross-entropy.

Optimizer, LR schedule, gradient accumulation, clipping and precision come from the DeepSpeed JSON;
its "auto" fields are filled from the run config (as HF's integration does), and explicit values that
contradict the run config are refused before anything is built.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rft_ds.config import ConfigError, TrainConfig
from rft_ds.experience import IGNORE_INDEX, Row, collate


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    return cfg


def fill_ds_config(ds: dict, train: TrainConfig, world_size: int) -> dict:
    """Resolve "auto" values and check batch sizes against the world size. Pure; raises ConfigError."""
    ds = copy.deepcopy(ds)

    def pick(key: str, run_value: int | None, default: int) -> int:
        v = ds.get(key, "auto")
        if v == "auto":
            return run_value if run_value is not None else default
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"deepspeed config {key} must be a positive int or \"auto\", got {v!r}")
        if run_value is not None and run_value != v:
            raise ConfigError(f"train.{'micro_batch_size' if 'micro' in key else 'gradient_accumulation_steps'}="
                              f"{run_value} contradicts deepspeed config {key}={v}")
        return v

    mb = pick("train_micro_batch_size_per_gpu", train.micro_batch_size, 8)
    ga = pick("gradient_accumulation_steps", train.gradient_accumulation_steps, 1)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = mb, ga
    tbs = ds.get("train_batch_size", "auto")
    if tbs == "auto":
        ds["train_batch_size"] = mb * ga * world_size
    elif tbs != mb * ga * world_size:
        raise ConfigError(f"deepspeed config train_batch_size={tbs} must equal micro_batch_size ({mb}) x "
                          f"gradient_accumulation_steps ({ga}) x world size ({world_size}) = {mb * ga * world_size}")

    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"deepspeed config zero_optimization.stage must be 3, got {stage!r}")
    opt = ds.get("optimizer", {}).get("params", {})
    if opt.get("lr", "auto") == "auto":
        opt["lr"] = train.learning_rate
    sched = ds.get("scheduler", {}).get("params", {})
    if ds.get("scheduler", {}).get("type") == "WarmupLR" and sched.get("warmup_num_steps") == "auto" \
            and train.warmup_steps == 0:
        del ds["scheduler"]  # no warmup asked: constant LR (DeepSpeed's WarmupLR cannot do 0 steps)
    for key, value in (("warmup_max_lr", train.learning_rate), ("warmup_num_steps", train.warmup_steps)):
        if sched.get(key) == "auto":
            sched[key] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"deepspeed config has \"auto\" values rft_ds cannot fill: {', '.join(leftover)}")
    return ds


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


@dataclass
class TrainStats:
    """One rank's pass over its micro-batches: the losses, and |sampler log p - model log p| over the label
    tokens of the rows this rank sampled this epoch, seen before the first optimizer step."""

    losses: list[float] = field(default_factory=list)
    logprob_abs_sum: float = 0.0
    logprob_abs_max: float = 0.0
    logprob_tokens: int = 0

    def add(self, other: "TrainStats") -> None:
        self.losses += other.losses
        self.logprob_abs_sum += other.logprob_abs_sum
        self.logprob_abs_max = max(self.logprob_abs_max, other.logprob_abs_max)
        self.logprob_tokens += other.logprob_tokens

    def add_logprob_diffs(self, diffs: np.ndarray) -> None:
        if diffs.size:
            self.logprob_abs_sum += float(diffs.sum())
            self.logprob_abs_max = max(self.logprob_abs_max, float(diffs.max()))
            self.logprob_tokens += int(diffs.size)


def label_logprob_diffs(logits: Any, labels: Any, rows: Sequence[Row]) -> np.ndarray:
    """|model log p - sampler log p| of every label token of the rows that carry the sampler's log p.

    logits[:, t] predicts labels[:, t + 1] (HF's shift); only label positions go through log_softmax, so
    the extra memory is (label tokens x vocab), not (batch x width x vocab)."""
    import torch

    with torch.no_grad():
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        picked = logits[:, :-1][mask].float()
        logp = torch.log_softmax(picked, dim=-1).gather(-1, shifted[mask][:, None])[:, 0].cpu().numpy()
        counts = mask.sum(dim=1).cpu().tolist()
    diffs, start = [], 0
    for row, n in zip(rows, counts):
        if row.ref_logprobs is not None:
            m = min(n, len(row.ref_logprobs))
            diffs.append(np.abs(logp[start:start + m] - row.ref_logprobs[:m]))
        start += n
    return np.concatenate(diffs) if diffs else np.zeros(0)


class Learner:
    """Owns the DeepSpeed engine. `engine.module` is the HF model (parameters partitioned)."""

    def __init__(self, model_path: str, ds_config: dict) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # Kept alive so from_pretrained loads straight into ZeRO-3 partitions (no full copy per rank).
        self._hf_ds = HfDeepSpeedConfig(ds_config)
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
            torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                              if p.requires_grad], config=ds_config)
        self.micro_batch_size = ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = ds_config["gradient_accumulation_steps"]

    @property
    def module(self):
        return self.engine.module

    @property
    def device(self):
        """Where the engine computes (the device rule's choice): every input goes here first."""
        return self.engine.device

    def train_step(self, rows: Sequence[Row], micro_batches: Sequence[np.ndarray], pad_id: int,
                   compare_logprobs: bool = False) -> TrainStats:
        """One optimizer step: grad_accum micro-batches, DeepSpeed steps the optimizer after the last.

        With compare_logprobs (the epoch's first step, before any update), the forwards also give the
        stale-weight check its numbers: the model's log p of each label token of rows that carry the
        sampler's (no extra forward pass)."""
        import torch

        self.engine.train()
        stats = TrainStats()
        for idx in micro_batches:
            batch_rows = [rows[i] for i in idx]
            batch = {key: torch.from_numpy(v).to(self.device) for key, v in collate(batch_rows, pad_id).items()}
            out = self.engine(**batch, use_cache=False)
            if compare_logprobs and any(r.ref_logprobs is not None for r in batch_rows):
                stats.add_logprob_diffs(label_logprob_diffs(out.logits, batch["labels"], batch_rows))
            self.engine.backward(out.loss)
            self.engine.step()
            stats.losses.append(float(out.loss.detach()))
        return stats

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_hf(self, out_dir: str | Path, tokenizer: Any, is_main: bool, extra: dict | None = None) -> None:
        """Gather the full weights one parameter at a time and write a plain HF directory (rank 0), with
        `extra` {file name: JSON-able} beside them (e.g. which run and epoch the weights are from)."""
        import deepspeed

        from rft_ds.checkpoint import replacing_dir

        state = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main:
                    state[name] = p.detach().to("cpu", copy=True)
        if is_main:
            with replacing_dir(out_dir) as tmp:
                self.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                for name, value in (extra or {}).items():
                    (Path(tmp) / name).write_text(json.dumps(value))
