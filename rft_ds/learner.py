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
from rft_ds.experience import IGNORE_INDEX, PackSpec, Row, collate, layout
from rft_ds.logprobs import DEFAULT_CHUNK, install, returns_head_output

PRESETS = Path(__file__).resolve().parent / "ds_configs"  # shipped in the package: found from any directory


def resolve_ds_config(value: str | Path, cuda: bool | None = None) -> Path:
    """train.deepspeed_config -> a file: "auto" is the preset for the device found (zero3_gpu.json with CUDA,
    zero3_cpu.json without); an existing path is itself; a preset's name (alone or as ds_configs/NAME,
    how the repo's configs write it) is the packaged preset, whatever the working directory."""
    if str(value) == "auto":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return PRESETS / ("zero3_gpu.json" if cuda else "zero3_cpu.json")
    path = Path(value)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parent in (Path("."), Path("ds_configs")) and (PRESETS / path.name).is_file():
        return PRESETS / path.name
    presets = ", ".join(sorted(p.name for p in PRESETS.glob("*.json")))
    raise ConfigError(f"train.deepspeed_config: file not found: {path} (or auto, or a preset: {presets})")


def load_ds_config(path: str | Path, cuda: bool | None = None) -> dict:
    path = resolve_ds_config(path, cuda)
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
            raise ConfigError(f'deepspeed config {key} must be a positive int or "auto", got {v!r}')
        if run_value is not None and run_value != v:
            raise ConfigError(
                f"train.{'micro_batch_size' if 'micro' in key else 'gradient_accumulation_steps'}="
                f"{run_value} contradicts deepspeed config {key}={v}"
            )
        return v

    mb = pick("train_micro_batch_size_per_gpu", train.micro_batch_size, 8)
    ga = pick("gradient_accumulation_steps", train.gradient_accumulation_steps, 1)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = mb, ga
    tbs = ds.get("train_batch_size", "auto")
    if tbs == "auto":
        ds["train_batch_size"] = mb * ga * world_size
    elif tbs != mb * ga * world_size:
        raise ConfigError(
            f"deepspeed config train_batch_size={tbs} must equal micro_batch_size ({mb}) x "
            f"gradient_accumulation_steps ({ga}) x world size ({world_size}) = {mb * ga * world_size}"
        )

    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"deepspeed config zero_optimization.stage must be 3, got {stage!r}")
    opt = ds.get("optimizer", {}).get("params", {})
    if opt.get("lr", "auto") == "auto":
        opt["lr"] = train.learning_rate
    sched = ds.get("scheduler", {}).get("params", {})
    if (
        ds.get("scheduler", {}).get("type") == "WarmupLR"
        and sched.get("warmup_num_steps") == "auto"
        and train.warmup_steps == 0
    ):
        del ds["scheduler"]  # no warmup asked: constant LR (DeepSpeed's WarmupLR cannot do 0 steps)
    for key, value in (("warmup_max_lr", train.learning_rate), ("warmup_num_steps", train.warmup_steps)):
        if sched.get(key) == "auto":
            sched[key] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f'deepspeed config has "auto" values rft_ds cannot fill: {", ".join(leftover)}')
    return ds


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


@dataclass
class TrainStats:
    """One rank's pass over its micro-batches: cross-entropy summed over its label tokens and their count
    (train_loss is the sum over ranks over the count over ranks), the loss of each of its steps (progress
    bar), and |sampler log p - model log p| over the label tokens of the rows this rank sampled this epoch,
    seen before the first optimizer step."""

    ce_sum: float = 0.0
    tokens: int = 0
    input_tokens: int = 0  # every token of the rows trained on (prompts included), for throughput
    checkpointed: int = 0  # micro-batches that ran with gradient checkpointing
    losses: list[float] = field(default_factory=list)
    logprob_abs_sum: float = 0.0
    logprob_abs_max: float = 0.0
    logprob_tokens: int = 0

    def add(self, other: TrainStats) -> None:
        self.ce_sum += other.ce_sum
        self.tokens += other.tokens
        self.input_tokens += other.input_tokens
        self.checkpointed += other.checkpointed
        self.losses += other.losses
        self.logprob_abs_sum += other.logprob_abs_sum
        self.logprob_abs_max = max(self.logprob_abs_max, other.logprob_abs_max)
        self.logprob_tokens += other.logprob_tokens

    def add_logprob_diffs(self, diffs: np.ndarray) -> None:
        if diffs.size:
            self.logprob_abs_sum += float(diffs.sum())
            self.logprob_abs_max = max(self.logprob_abs_max, float(diffs.max()))
            self.logprob_tokens += int(diffs.size)


# Activations autograd keeps per token, per layer, per unit of hidden size, in bf16: 46 without gradient
# checkpointing, 5 with it (SmolLM2-135M's shape, sdpa; counted exactly with saved-tensor hooks:
# benchmarks/bench_long.py --activations)
ACTIVATION_BYTES = 46
ACTIVATION_BUDGET = 2 * 2**30  # model.gradient_checkpointing: auto keeps at most this much of activations


def training_dtype(ds_config: dict) -> Any:
    """The dtype the model trains in, as the DeepSpeed config says: bf16, fp16, or else float32. The one place
    that reads it (the learner's weights, the activation estimate, the engine's auto dtype)."""
    import torch

    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes logits_to_keep (by name, or as any keyword): transformers' own models
    do; a model with its own code (model.trust_remote_code) may not, and would fail on the keyword."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters.values()
    return any(p.name == "logits_to_keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def checkpoint_tokens(model_config: dict, dtype_bytes: int, budget: int = ACTIVATION_BUDGET) -> int:
    """The tokens of a micro-batch past which gradient checkpointing pays under model.gradient_checkpointing:
    auto: where its stored activations, ACTIVATION_BYTES x hidden x layers per token (x2 in float32), would pass
    `budget`. From config.json alone, so every rank decides the same: SmolLM2-135M ~2.7k tokens, a 7B Llama
    ~360, the tiny test model never in practice. Pure."""
    per_token = ACTIVATION_BYTES * dtype_bytes // 2 * model_config["hidden_size"] * model_config["num_hidden_layers"]
    return max(1, budget // per_token)


def checkpoint_plan(tokens: Sequence[int], above: int | None) -> list[bool]:
    """Which micro-batches run with gradient checkpointing: those of more than `above` tokens (padding
    included; 0: all, None: none). `tokens`: each micro-batch's largest size over the ranks, so every rank
    decides the same (a rank that recomputes its forward gathers ZeRO-3 parameters the others would not)."""
    return [above is not None and int(t) > above for t in tokens]


def label_positions(labels: Any) -> Any:
    """Positions whose next token is a label in some row of the batch: the only positions whose logits the
    loss needs (logits[:, t] predicts labels[:, t + 1]). The LM head and the softmax over the vocabulary
    then run on those alone, not on every prompt and padding position."""
    import torch

    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()


def label_logprobs(logits: Any, labels: Any, keep: Any) -> tuple[Any, Any]:
    """(log p of every label token, in row-major order, with its graph; label tokens per row), from the
    logits at positions `keep` (label_positions)."""
    targets = labels[:, keep + 1]
    return target_logprobs(logits, targets), (targets != IGNORE_INDEX).sum(dim=1)


def target_logprobs(logits: Any, targets: Any) -> Any:
    """log p of targets[b, j] under logits[b, j], wherever it is not IGNORE_INDEX (row-major, with its graph)."""
    import torch

    labelled = targets != IGNORE_INDEX
    return torch.log_softmax(logits[labelled].float(), dim=-1).gather(-1, targets[labelled][:, None])[:, 0]


def logprob_diffs(logp: np.ndarray, counts: Sequence[int], rows: Sequence[Row]) -> np.ndarray:
    """|model log p - sampler log p| of every label token of the rows that carry the sampler's log p."""
    diffs, start = [], 0
    for row, n in zip(rows, counts):
        if row.ref_logprobs is not None:
            m = min(n, len(row.ref_logprobs))
            diffs.append(np.abs(logp[start : start + m] - row.ref_logprobs[:m]))
        start += n
    return np.concatenate(diffs) if diffs else np.zeros(0)


def mark_zero3_blocks(model: Any) -> list[str]:
    """Make each transformer block (the classes in the model's `_no_split_modules`) one ZeRO-3 fetch: its
    parameters are gathered together before its forward and its backward, instead of one gather, and one
    set of Python hooks, per linear layer. Same math; on the demo, 20 % less time per training step.
    Returns the block class names marked (none: the model names no blocks, and ZeRO-3 fetches per module)."""
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if classes:
        set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))
    return sorted(c.__name__ for c in classes)


def why_not_share_prompt(model: Any, trust_remote_code: bool) -> str | None:
    """Why this model cannot train a prompt's rows as one sequence (pack_rows), or None when it can: its
    attention must take the prefix-tree mask as given (sdpa or eager, no sliding window) and its positions
    must come from position_ids (rotary embeddings), as in HF's own Llama, Qwen, Mistral, Gemma, Phi."""
    cfg = model.config
    if trust_remote_code:
        return "the model's own code (trust_remote_code) may build its own mask"
    if cfg._attn_implementation not in ("sdpa", "eager"):
        return f"attention {cfg._attn_implementation!r} does not take a 4D mask (sdpa and eager do)"
    if getattr(cfg, "sliding_window", None) is not None or any(
        t != "full_attention" for t in getattr(cfg, "layer_types", None) or []
    ):
        return "sliding-window attention would be dropped by a 4D mask"
    if not any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        return "no rotary position embedding: positions may not follow position_ids"
    return None


def attention_ratio(model: Any) -> float:
    """Attention FLOPs per (query, key) pair over the FLOPs per token of every other weight the step runs
    (both ~ forward + backward): 2 * layers * heads * head_dim / body parameters (PackSpec.attn_ratio)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())  # ZeRO-3: partitioned
    # the embedding costs no matmul, the head runs at label positions only (tied: one matrix for both)
    embedding = cfg.vocab_size * cfg.hidden_size * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim / max(total - embedding, 1)


class Learner:
    """Owns the DeepSpeed engine. `engine.module` is the HF model (parameters partitioned)."""

    def __init__(
        self,
        model_path: str,
        ds_config: dict,
        lora: Any = None,
        checkpoint_above: int | None = None,
        trust_remote_code: bool = False,
        block_fetch: bool = True,
        share_prompt: bool = False,
        max_seq_length: int = 512,
        logprob_chunk: int = DEFAULT_CHUNK,
        sequence_parallel: int = 1,
    ) -> None:
        """checkpoint_above: gradient checkpointing for a micro-batch of more tokens than this, padding included
        (0: every micro-batch; None: never). lora: an rft_ds.lora.LoraSpec (None: every weight trains). Its A
        and B are plain parameters when peft makes them; deepspeed.initialize partitions them with the rest.
        block_fetch: under ZeRO-3, gather a transformer block's parameters at once (mark_zero3_blocks).
        share_prompt: a prompt's rows in a micro-batch are one sequence of at most max_seq_length tokens
        (experience.layout), where the model allows it (why_not_share_prompt) and it costs less. logprob_chunk:
        label positions per chunk of the LM head and log-softmax (rft_ds.logprobs; 0: every label position at
        once, as before).
        sequence_parallel: ranks that train each row together, each on a shard of its positions
        (rft_ds.sequence_parallel; collective: makes the groups); 1: none."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # Kept alive so from_pretrained loads straight into ZeRO-3 partitions (no full copy per rank).
        self._hf_ds = HfDeepSpeedConfig(ds_config)
        dtype = training_dtype(ds_config)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.dtype = dtype
        self.keeps = takes_logits_to_keep(model)  # a model's own code may not: then full logits, sliced here
        self.sp = None
        if sequence_parallel > 1:
            from rft_ds import sequence_parallel as SP

            impl = model.config._attn_implementation
            if trust_remote_code or impl != "sdpa":
                raise ConfigError(
                    f"train.sequence_parallel={sequence_parallel} needs transformers' own model code "
                    f"with sdpa attention; {type(model).__name__} has "
                    f"{'its own code' if trust_remote_code else repr(impl)}"
                )
            self.sp = SP.group(sequence_parallel)
            SP.install(model, self.sp)
        if isinstance(checkpoint_above, bool):
            raise TypeError("checkpoint_above is a token count (0: always) or None (never), not a bool")
        if checkpoint_above is not None and not model.supports_gradient_checkpointing:
            if checkpoint_above == 0:  # asked for always (model.gradient_checkpointing: true)
                raise ConfigError(f"model.gradient_checkpointing: true, but {type(model).__name__} does not support it")
            checkpoint_above = None  # auto: without it
        self.checkpoint_above = checkpoint_above
        self._checkpointing = checkpoint_above is not None
        if self._checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and ZeRO-3's hooks
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Not for a model's own code: a block that takes its hidden states by keyword would look to torch
        # like one without inputs, and its gradients would be reduced too early (below).
        self.zero3_blocks = mark_zero3_blocks(model) if block_fetch and not trust_remote_code else []
        self.share_prompt_off = (
            "not asked"
            if not share_prompt
            else "sequence parallelism attends without a mask"
            if self.sp
            else why_not_share_prompt(model, trust_remote_code)
        )
        self.share_prompt = self.share_prompt_off is None
        self._eager = model.config._attn_implementation == "eager"
        # sdpa: a mask costs the flash kernel on CUDA, masked attention measured ~6x the matmuls' cost per
        # FLOP (H200, 1B shape: 4 rows of 128 + 384 tokens packed ran 14 % slower than row by row). Eager
        # attention computes the whole square with or without a mask.
        masked_cost = 1.0 if self._eager or not torch.cuda.is_available() else 6.0
        self.pack = (
            PackSpec(max_seq_length, attention_ratio(model), masked_cost, 1.0 if self._eager else 0.5)
            if self.share_prompt
            else None
        )
        if self.zero3_blocks and lora is not None:
            # ZeRO-3 reduces a marked block's gradients in a full backward hook, and torch fires that hook
            # as soon as the block's output gradient exists when no input of the block needs a gradient:
            # under LoRA (frozen embedding) the first block's adapters would be reduced before they have
            # a gradient. An embedding output that needs a gradient (as gradient checkpointing makes it)
            # puts the hook after the block's own gradients.
            model.enable_input_require_grads()
        # the LM head computes label log-probs in chunks (bounded memory); not when LoRA adapts the head itself
        self.head = (
            install(model, logprob_chunk, lora.target_modules if lora is not None else ())
            if logprob_chunk and self.keeps
            else None
        )
        if lora is not None:
            from rft_ds.lora import wrap

            model = wrap(model, lora)
        self.lora = lora
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
        )
        self.head_off = (
            None
            if self.head is not None
            else "not asked"
            if not logprob_chunk
            else "its forward takes no logits_to_keep"
            if not self.keeps
            else "no linear LM head"
        )
        if self.head is not None and not returns_head_output(self.engine, self.head, self.device):
            self.head, self.head_off = None, "the model changes its LM head's output (soft-capping or scaling)"
        self.micro_batch_size = ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = ds_config["gradient_accumulation_steps"]

    @property
    def module(self):
        return self.engine.module

    def close(self) -> None:
        """Release the engine (ZeRO-3 hooks, optimizer state, partitions) before another takes its place."""
        import gc

        import torch

        self.engine.destroy()
        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def device(self):
        """Where the engine computes (the device rule's choice): every input goes here first."""
        return self.engine.device

    def train_step(
        self,
        rows: Sequence[Row],
        micro_batches: Sequence[np.ndarray],
        pad_id: int,
        step_tokens: int,
        world_size: int,
        checkpoint: Sequence[bool] | None = None,
    ) -> TrainStats:
        """One optimizer step: grad_accum micro-batches, DeepSpeed steps the optimizer after the last.

        The step's loss is the mean cross-entropy over all its label tokens, on every rank and in every
        micro-batch (`step_tokens`, summed over ranks), so a token weighs the same whether its row is long
        or short, or its micro-batch full or not (a per-micro-batch mean weighs the tokens of a short
        micro-batch more: the accumulation bug HF fixed in 2024). DeepSpeed divides each micro-batch's loss
        by grad_accum and averages the gradients over ranks; the scale undoes both. An empty micro-batch
        runs a one-token row with no label: its forward and backward still take part in every ZeRO-3
        gather, and add nothing.

        checkpoint: per micro-batch, whether it runs with gradient checkpointing (checkpoint_plan: the
        same on every rank, as ZeRO-3's gathers must be); None: only when built to checkpoint always."""
        import torch

        self.engine.train()
        stats = TrainStats()
        scale = self.grad_accum * world_size / max(step_tokens, 1)
        for k, idx in enumerate(micro_batches):
            batch_rows = [rows[i] for i in idx] or [Row(np.array([pad_id]), np.array([IGNORE_INDEX]))]
            stats.checkpointed += self._set_checkpointing(
                bool(checkpoint[k]) if checkpoint is not None else self.checkpoint_above == 0
            )
            if self.sp is not None:  # this rank's shard of the rows' positions; its group has the others
                from rft_ds.sequence_parallel import positions_of_rank

                batch = {
                    key: torch.from_numpy(v).to(self.device)
                    for key, v in positions_of_rank(batch_rows, pad_id, self.sp.size, self.sp.rank).items()
                }
                keep = torch.nonzero((batch["targets"] != IGNORE_INDEX).any(dim=0)).flatten()
                logp = self._logprobs_at(
                    batch["input_ids"], None, batch["position_ids"], keep, batch["targets"][:, keep]
                )
            else:
                arrays, _ = layout(batch_rows, pad_id, self.pack)
                batch = {key: torch.from_numpy(v).to(self.device) for key, v in arrays.items()}
                mask = batch.pop("attention_mask")
                if mask.dim() == 4 and self._eager:  # eager attention adds its mask: 0 where allowed
                    mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
                        ~mask, torch.finfo(self.dtype).min
                    )
                logp = self._label_logprobs(batch["input_ids"], mask, batch.get("position_ids"), batch["labels"])
            ce = -logp.sum()
            self.engine.backward(ce * scale)
            self.engine.step()
            stats.ce_sum += float(ce.detach())
            stats.tokens += int(logp.numel())
            if self.sp is None or self.sp.rank == 0:  # a group's rows counted once
                stats.input_tokens += sum(len(rows[i].input_ids) for i in idx)
        stats.losses.append(stats.ce_sum / max(stats.tokens, 1))
        return stats

    def probe_diffs(self, rows: Sequence[Row], pad_id: int, n_forwards: int) -> np.ndarray:
        """Collective: |model log p - sampler log p| of every label token of `rows` (each carries the sampler's
        log p of its completion: the stale-weight check's probes), before the epoch's first update. Forwards
        without gradient, in eval mode (no dropout), through the chunked head; n_forwards on every rank (a
        rank with fewer probes runs empty ones: every rank joins each of ZeRO-3's gathers)."""
        import torch

        per = -(-len(rows) // n_forwards) if rows else 1
        diffs = []
        self.engine.eval()
        with torch.no_grad():
            for k in range(n_forwards):
                part = list(rows[k * per : (k + 1) * per]) or [Row(np.array([pad_id]), np.array([IGNORE_INDEX]))]
                batch = {key: torch.from_numpy(v).to(self.device) for key, v in collate(part, pad_id).items()}
                logp = self._label_logprobs(batch["input_ids"], batch["attention_mask"], None, batch["labels"])
                counts = [int((r.labels[1:] != IGNORE_INDEX).sum()) for r in part]
                diffs.append(logprob_diffs(logp.float().cpu().numpy(), counts, part))
        self.engine.train()
        return np.concatenate(diffs)

    def _set_checkpointing(self, on: bool) -> bool:
        """Gradient checkpointing on or off for the next micro-batch (the layers' flag, flipped only when it
        changes; a learner built without it stays without). Whether it is on."""
        on = on and self.checkpoint_above is not None
        if on != self._checkpointing:
            module = self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module
            for m in module.modules():
                if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func"):
                    m.gradient_checkpointing = on
            self._checkpointing = on
        return on

    def _label_logprobs(self, input_ids: Any, mask: Any, position_ids: Any, labels: Any) -> Any:
        """log p of every label token (row-major, with its graph), from the positions that predict one."""
        keep = label_positions(labels)
        return self._logprobs_at(input_ids, mask, position_ids, keep, labels[:, keep + 1])

    def _logprobs_at(self, input_ids: Any, mask: Any, position_ids: Any, keep: Any, targets: Any) -> Any:
        """log p of targets[b, j], the token that follows position keep[j] of row b, wherever it is not
        IGNORE_INDEX (row-major, with its graph): through the chunked head when there is one (memory
        O(chunk x vocabulary)), else from the logits at those positions."""
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        if self.keeps:
            kwargs["logits_to_keep"] = keep
        if self.head is not None:
            with self.head.label_mode(targets):
                out = self.engine(**kwargs)
            self.head.last = None  # only the start-up check reads it
            return out.logits
        logits = self.engine(**kwargs).logits
        return target_logprobs(logits if self.keeps else logits[:, keep], targets)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_hf(
        self,
        out_dir: str | Path,
        tokenizer: Any,
        is_main: bool,
        extra: dict | None = None,
        min_share_bytes: int | None = None,
    ) -> None:
        """Collective: a plain HF directory of the full weights, with `extra` {file name: JSON-able} beside them
        (e.g. which run and epoch the weights are from). Every rank joins each tensor's gather and keeps the
        ones hf_write.deal gives it, writes them as its shard and goes on; rank 0 puts the directory together
        once every shard is written (hf_write). A LoRA model is written merged (W + scale * B @ A), under the
        base model's names: it loads without peft."""
        import shutil

        import deepspeed

        from rft_ds import distributed as D
        from rft_ds import hf_write
        from rft_ds.lora import is_peft, merged, sync_items

        out_dir = Path(out_dir)
        items = sync_items(self.module)
        sizes = [int(getattr(i.params[0], "ds_numel", i.params[0].numel())) * i.params[0].element_size() for i in items]
        writers = hf_write.deal(sizes, D.world_size(), min_share_bytes or hf_write.MIN_SHARE_BYTES)
        stage = hf_write.staging(out_dir)
        if is_main:
            shutil.rmtree(stage, ignore_errors=True)  # a crash mid-write left it
            stage.mkdir(parents=True)
        D.barrier()  # the staging directory exists before anyone writes into it
        state, me = {}, D.rank()
        for item, writer in zip(items, writers):
            with deepspeed.zero.GatheredParameters(item.params, modifier_rank=None):
                if writer == me:
                    state[item.name] = merged(item).detach().to("cpu", copy=True)
        model = self.module.get_base_model() if is_peft(self.module) else self.module
        hf_write.write_share(model, state, stage, me)
        del state
        if is_main:
            hf_write.assemble(stage, out_dir, D.world_size(), tokenizer, extra)
