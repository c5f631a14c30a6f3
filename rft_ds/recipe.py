"""The RFT recipe: one epoch loop, readable top to bottom.

    sample (grow steps) -> score on each rank -> all-gather scores and ids -> select (pure) -> rows where the
    tokens are, a few moved to balance -> train -> sync -> eval

Every rank runs every line. The table that selection sees is identical on every rank, so selection is
too, and the check after each epoch proves it (a digest per rank) instead of assuming it. Token ids stay
on the rank that sampled them (its pool shard); only the rows a balancing plan moves cross ranks.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from rft_ds import distributed as D
from rft_ds import console, progress, replay
from rft_ds.config import ConfigError, RFTRunConfig, read_model_config, text_config
from rft_ds.data import (PromptRecord, load_source, normalize, resolve_callable, shard, tokenize,
                         use_chat_template)
from rft_ds.evaluation import EvalSet, best_metric, maj_at_k, parse_sets, pass_at_k
from rft_ds.experience import (Row, build_row, label_tokens, micro_batch_tokens, num_steps, padded_tokens, plan_micro_batches,
                               prompt_groups, rows_for_rank)
from rft_ds.faults import maybe_die
from rft_ds.learner import TrainStats, checkpoint_plan
from rft_ds.sequence_parallel import why_not as why_not_sequence_parallel
from rft_ds.metrics import MetricsLog, format_epoch, open_sinks, plain
from rft_ds.pool import LocalPool
from rft_ds.samples import Samples, pick_probes
from rft_ds.lora import check_lora, parse_lora, save_adapter
from rft_ds.reward_terms import build_terms, check_arguments, check_prompts, function_term, load_reward_models
from rft_ds.scoring import RewardError, gather_new_rows, gather_pool, score_shard, term_means
from rft_ds.selection import (TABLE, cap_per_prompt, parse_pool_policy, schedule, select,
                              selection_digest, truncated, update_pool)
from rft_ds.weight_sync import check_stale_weights


@dataclass
class Prompts:
    texts: list[str]
    metadata: list[dict]
    records: list[PromptRecord] = field(default_factory=list)
    replay: "Prompts | None" = None  # the training prompts' data.replay_prompts (rft_ds/replay.py)


@dataclass
class EvalData:
    """One eval set, ready: its spec (evaluation.EvalSet), tokenized prompts and resolved callables."""

    spec: EvalSet
    prompts: Prompts
    rewards: list  # its own reward_fn as a term, or the run's reward terms
    metric_fn: Any
    answer_fn: Any


@dataclass
class RFTResult:
    """What `train` returns: the trained engine (its `.module` is the HF model) and the run's metrics."""

    config: RFTRunConfig
    engine: Any
    tokenizer: Any
    history: list[dict]
    eval_before: dict | None
    output_dir: Path
    stopped_early: bool = False  # a stop signal ended the run after a checkpoint; resume to continue
    resumed_from: Path | None = None

    @property
    def model(self) -> Any:
        return self.engine.module


def _sample_seed(seed: int, epoch: int, rank: int, stream: int, chunk: int = 0) -> int:
    """Independent, far-apart streams per (epoch, rank, train/eval, sampling chunk): nearby seeds overlap in
    samplers. epoch is -1 for the eval before training, hence the +1."""
    return int(np.random.SeedSequence([seed, epoch + 1, rank, stream] + ([chunk] if chunk else [])).generate_state(1)[0])


def load_tokenizer(cfg: RFTRunConfig) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.model_path
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer at {path} has no eos_token: completions could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the usual choice; pads are masked out of loss and attention
    return tok


def longest_generation(cfg: RFTRunConfig) -> int:
    sets = cfg.eval.sets if isinstance(cfg.eval.sets, list) else []
    return max([cfg.method.gen_kwargs["max_new_tokens"], (cfg.train.eval_gen_kwargs or {}).get("max_new_tokens", 0)]
               + [(d.get("gen_kwargs") or {}).get("max_new_tokens", 0) for d in sets if isinstance(d, dict)])


def model_max_positions(model_path: str) -> int | None:
    return text_config(read_model_config(model_path)).get("max_position_embeddings")


def prompt_limit(cfg: RFTRunConfig) -> int:
    """Longest prompt allowed: data.max_prompt_length, and room left for the longest generation."""
    positions = model_max_positions(cfg.model.model_path)
    if positions is None:
        return cfg.data.max_prompt_length
    room = positions - longest_generation(cfg)
    if room < 1:
        raise ConfigError(f"max_new_tokens ({longest_generation(cfg)}) leaves no room for a prompt in the model's "
                          f"{positions} positions")
    return min(cfg.data.max_prompt_length, room)


def prepare(cfg: RFTRunConfig, reward_fn: Any, prompts: Any, eval_prompts: Any, metric_fn: Any):
    """Every check that needs no process group and no model weights, so bad input fails in seconds. The
    steps are the ones `rft-ds check` runs one by one (rft_ds/check.py)."""
    world = launch_world_size()
    ckpt = check_launch(cfg, world)
    rewards = build_terms(cfg.reward, reward_fn)  # reward models: config.json checked here, loaded in setup
    check_metric_sinks(cfg.train)
    sets = parse_sets(cfg, eval_prompts, metric_fn)
    best = best_metric(cfg.train.best_metric, sets) if cfg.train.save_best_model else None
    train = load_prompts(cfg, prompts)
    train.replay = load_replay_prompts(cfg)
    evals = load_eval_sets(cfg, sets, rewards)
    check_output_dir(Path(cfg.train.output_dir))
    ds_config = deepspeed_config(cfg, world)
    build_model(cfg)
    check_model(cfg)
    if cfg.sampler.backend == "vllm":
        engine_limits(cfg, ds_config)  # max_model_len and the CPU KV budget, from config.json, before any engine
    tokenizer = load_tokenizer(cfg)
    tokenize_prompts(cfg, tokenizer, train, evals)
    row_limit(cfg, train)
    check_arguments(rewards, {k for m in train.metadata for k in m})
    check_prompts(rewards, train.metadata, "data.prompts")
    for i, ev in enumerate(evals):
        check_arguments(ev.rewards, {k for m in ev.prompts.metadata for k in m})
        check_prompts(ev.rewards, ev.prompts.metadata, eval_where(cfg, i))
    return rewards, train, evals, best, tokenizer, ds_config, ckpt


def launch_world_size() -> int:
    """The world size the launcher set (srun: SLURM_NTASKS); the process group comes later."""
    from rft_ds.slurm import torch_env

    return int(os.environ.get("WORLD_SIZE") or torch_env(os.environ).get("WORLD_SIZE", "1"))


def check_launch(cfg: RFTRunConfig, world: int, cuda: bool | None = None) -> Path | None:
    """The device rule (a rank without a usable GPU stops before anything loads; init applies it), the
    backend, engine groups, the KV block size, and the resume target; returns the checkpoint to resume
    from. cuda: None is this host as it is; True or False checks for a run on GPU or CPU nodes elsewhere
    (`rft-ds check --device`), without this host's device count."""
    import torch

    from rft_ds.checkpoint import resolve_resume
    from rft_ds.sampling.vllm import check_block_size, engine_group

    if cuda is None:
        D.local_device(os.environ, torch.cuda.device_count())
    D.resolve_backend(cfg.train.dist_backend, torch.cuda.device_count() if cuda is None else int(cuda))
    if world % cfg.train.sequence_parallel:
        raise ConfigError(f"train.sequence_parallel={cfg.train.sequence_parallel} must divide the world size {world}")
    if cfg.sampler.backend == "vllm":
        engine_group(0, world, cfg.sampler.tensor_parallel_size)
        check_block_size(cfg.sampler.block_size, on_cpu=not (torch.cuda.is_available() if cuda is None else cuda))
    ckpt = resolve_resume(cfg.train.resume, cfg.train.output_dir, world)
    check_resume_config(ckpt, cfg)
    return ckpt


def load_prompts(cfg: RFTRunConfig, prompts: Any) -> Prompts:
    """The training prompts (the API's argument, else data.prompts), read and checked, not yet tokenized."""
    d = cfg.data
    src = prompts if prompts is not None else d.prompts
    if src is None:
        raise ConfigError("data.prompts is required")
    return Prompts(*normalize(load_source(src, "prompts", d.prompt_field, d.split), "prompts", d.prompt_field,
                              d.metadata_fields))


def load_replay_prompts(cfg: RFTRunConfig) -> Prompts | None:
    """data.replay_prompts, read and checked (None: no replay, also at method.replay_share 0). Only the prompt
    is read: no reward scores them, so data.metadata_fields does not apply."""
    d = cfg.data
    if d.replay_prompts is None or cfg.method.replay_share == 0:
        return None
    texts, _ = normalize(load_source(d.replay_prompts, "data.replay_prompts", d.prompt_field, d.split),
                         "data.replay_prompts", d.prompt_field, [])
    return Prompts(texts, [{} for _ in texts])


def eval_where(cfg: RFTRunConfig, i: int) -> str:
    """How errors name eval set i: data.eval_prompts' one set, or eval.sets[i]."""
    return "eval_prompts" if cfg.eval.sets is None else f"eval.sets[{i}]"


def load_eval_sets(cfg: RFTRunConfig, sets: Sequence[EvalSet], rewards: list) -> list[EvalData]:
    """Each eval set's prompts read and checked, and its functions resolved (a set without its own
    reward_fn shares the run's reward terms)."""
    d, out = cfg.data, []
    for i, es in enumerate(sets):
        where = eval_where(cfg, i)
        data = Prompts(*normalize(load_source(es.prompts, where, d.prompt_field, es.split), where, d.prompt_field,
                                  d.metadata_fields))
        terms = rewards if es.reward_fn is None else [function_term(es.reward_fn, f"{where}.reward_fn")]
        metric = resolve_callable(es.metric_fn, "reward.metric_fn" if cfg.eval.sets is None else f"{where}.metric_fn")
        out.append(EvalData(es, data, terms, metric, resolve_callable(es.answer_fn, f"{where}.answer_fn")))
    return out


def check_output_dir(out: Path, create: bool = True) -> None:
    """train.output_dir can be written: created and probed, or (create=False, for `rft-ds check`) its
    nearest existing parent is writable, leaving nothing behind."""
    try:
        if not create:  # a probe directory made and removed where the first missing part would go
            import tempfile

            existing = next(p for p in [out, *out.absolute().parents] if p.exists())
            if not existing.is_dir():
                raise NotADirectoryError(20, f"{existing} is not a directory")
            os.rmdir(tempfile.mkdtemp(prefix=".rft_ds_check.", dir=existing))
            return
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{D.rank() if D.is_dist() else 0}.{random.getrandbits(32)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir {out} is not writable: {e.strerror or e}") from None


def deepspeed_config(cfg: RFTRunConfig, world: int, cuda: bool | None = None) -> dict:
    from rft_ds.learner import fill_ds_config, load_ds_config

    return fill_ds_config(load_ds_config(cfg.train.deepspeed_config, cuda), cfg.train, world)


def build_model(cfg: RFTRunConfig) -> None:
    """model.build: make the model at model_path if it is missing (nothing comes from a hub)."""
    if cfg.model.build == "tiny":
        from rft_ds.toy import ensure_tiny_model

        ensure_tiny_model(cfg.model.model_path, seed=cfg.train.seed)
    elif cfg.model.build == "smollm2":
        from rft_ds import smollm2

        try:
            smollm2.ensure(cfg.model.model_path)
        except smollm2.BuildError as e:
            raise ConfigError(str(e)) from None


def check_model(cfg: RFTRunConfig, cuda: bool | None = None) -> None:
    """From the model directory's config alone: a causal LM, LoRA targets that exist (on the meta device),
    and, for vLLM on CPU, a head size it serves (cuda: None is this host)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    check_causal_lm(cfg.model.model_path, cfg.model.trust_remote_code)
    problem = why_not_sequence_parallel(text_config(read_model_config(cfg.model.model_path)),
                                        cfg.train.sequence_parallel)
    if problem:
        raise ConfigError(f"train.sequence_parallel={cfg.train.sequence_parallel}: {problem}")
    lora = parse_lora(cfg.model.lora)
    if lora is not None:
        check_lora(lora, cfg.model.model_path, cfg.model.trust_remote_code)  # on the meta device: no weights read
    if cfg.sampler.backend == "vllm":
        from rft_ds.sampling.vllm import check_servable

        check_servable(cfg.model.model_path, on_cpu=not cuda)


def tokenize_prompts(cfg: RFTRunConfig, tokenizer: Any, train: Prompts, evals: Sequence[EvalData]) -> None:
    """Token ids of every prompt (chat prompts rendered with the template); a prompt longer than the limit
    is an error naming it."""
    d = cfg.data
    limit = prompt_limit(cfg)
    chat = use_chat_template(tokenizer, d.apply_chat_template)
    sets = [(train, "prompts")] + [(ev.prompts, "eval_prompts" if cfg.eval.sets is None else f"eval.sets[{i}].prompts")
                                   for i, ev in enumerate(evals)]
    sets += [(train.replay, "data.replay_prompts")] if train.replay is not None else []
    for p, where in sets:
        p.records = tokenize(p.texts, p.metadata, tokenizer, limit, where, chat, d.system_prompt)
        # chat prompts: reward functions get the last user message as the prompt, the messages as a keyword
        p.texts, p.metadata = [r.text for r in p.records], [r.metadata for r in p.records]


def row_limit(cfg: RFTRunConfig, train: Prompts) -> int:
    """Tokens a training row may hold (train.max_seq_length), from the tokenized prompts: auto is the longest
    prompt + method.gen_kwargs.max_new_tokens + its EOS, so no completion is ever cut; an explicit value below
    that is refused here, before any model loads, naming both fields."""
    sets = [("prompt", train.records)] + ([("data.replay_prompts", train.replay.records)] if train.replay else [])
    # the longest prompt of the training and replay sets (ties: the first), and how an error names it
    lengths, where, longest = max(((len(r.token_ids), name, i) for name, records in sets for i, r in enumerate(records)),
                                  key=lambda x: x[0], default=(0, "prompt", 0))
    new_tokens = cfg.method.gen_kwargs["max_new_tokens"]
    need = lengths + new_tokens + 1
    limit = cfg.train.max_seq_length
    if limit == "auto":
        return need
    if limit < need:
        raise ConfigError(f"train.max_seq_length ({limit}) is shorter than {where} {longest} ({lengths} tokens) "
                          f"+ method.gen_kwargs.max_new_tokens ({new_tokens}) + EOS = {need}: its completions would be "
                          f"cut; set train.max_seq_length to auto or >= {need}")
    return limit


def check_resume_config(ckpt: Path | None, cfg: RFTRunConfig) -> None:
    """A resume with a changed field that matters (config.RESUME_FIELDS) is refused, in one line listing
    them, unless train.resume_force: the pools, schedule and seeds would no longer mean what they meant."""
    from rft_ds.checkpoint import read_meta
    from rft_ds.config import resume_changes

    saved = read_meta(ckpt).get("config") if ckpt is not None else None
    changes = resume_changes(saved, _yaml_safe(cfg.to_dict())) if saved else []
    if changes and not cfg.train.resume_force:
        raise ConfigError(f"checkpoint {ckpt} was written with another config: {'; '.join(changes)}; resume with "
                          "--resume-force (train.resume_force=true) to accept the change")


def check_shared_output(out: Path, wait_s: float = 30.0) -> None:
    """Collective, before any model loads: every rank writes a marker into train.output_dir and looks for
    every other rank's. Checkpoints (each rank writes its own shards into one directory) and resume need a
    directory all ranks see; on node-local disks a run would fail at its first save, or each node would
    resume from its own copy. A rank that does not see them all within wait_s (NFS may show another node's
    new file late) fails every rank with one line."""
    if D.world_size() == 1:
        return
    import contextlib
    import socket

    hosts = D.all_gather_object(socket.gethostname())
    mark = out / f".rft_ds_shared.{D.broadcast_object(uuid.uuid4().hex[:12] if D.is_main() else None)}"
    mine = mark / f"rank{D.rank()}"
    try:
        with D.all_ranks_or_fail("writing a marker into train.output_dir"):
            mark.mkdir(parents=True, exist_ok=True)
            mine.write_text(hosts[D.rank()])
        with D.all_ranks_or_fail("checking train.output_dir"):
            deadline = time.monotonic() + wait_s
            while missing := [r for r in range(D.world_size()) if not (mark / f"rank{r}").exists()]:
                if time.monotonic() > deadline:
                    r = missing[0]
                    raise ConfigError(
                        f"train.output_dir {out} is not shared between the nodes: rank {D.rank()} on "
                        f"{hosts[D.rank()]} does not see the file rank {r} on {hosts[r]} wrote there; put it on a "
                        "file system every node mounts (NFS, Lustre, ...): checkpoints and resume need one directory")
                time.sleep(1)
    finally:
        D.barrier()  # nobody removes a marker before every rank has looked
        mine.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the last rank on each file system removes the directory
            mark.rmdir()


def check_metric_sinks(t: Any) -> None:
    import importlib.util

    if t.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb is true but the wandb package is not installed (pip install wandb)")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard is true but the tensorboard package is not installed (pip install tensorboard)")


def tensorboard_on(setting: bool | None) -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None if setting is None else setting


def check_causal_lm(model_path: str, trust_remote_code: bool = False) -> None:
    """From config.json alone: refuse a model AutoModelForCausalLM cannot build, before loading weights. A
    model with its own code (auto_map) is one it can build when model.trust_remote_code allows that code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_model_config(model_path)
    model_type = config.get("model_type")
    if "AutoModelForCausalLM" in (config.get("auto_map") or {}) and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if not trust_remote_code:
            raise ConfigError(f"model.model_path {model_path}: model type {model_type!r} comes with its own code "
                              f"({config['auto_map']['AutoModelForCausalLM']}); set model.trust_remote_code: true to run it")
        return
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"model.model_path {model_path}: model type {model_type!r} is not a causal LM "
                          "(AutoModelForCausalLM cannot load it)")


def new_learner(cfg: RFTRunConfig, ds_config: dict, max_len: int) -> Any:
    """The DeepSpeed engine over the base model (model.model_path), as every run starts; rows of at most
    max_len tokens (row_limit)."""
    from rft_ds.learner import Learner

    from rft_ds.learner import checkpoint_tokens

    gc = cfg.model.gradient_checkpointing
    if gc == "auto":
        half = any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
        above = cfg.model.gradient_checkpointing_tokens or checkpoint_tokens(
            text_config(read_model_config(cfg.model.model_path)), 2 if half else 4)
    else:
        above = 0 if gc else None
    # a prompt's rows packed into one sequence (train.share_prompt) make at most max_seq_length tokens; under
    # auto, at least the 512 it used to default to, so short rows still share their prompt
    pack_len = max_len if cfg.train.max_seq_length != "auto" else max(max_len, PACK_LEN_AUTO)
    return Learner(cfg.model.model_path, ds_config, parse_lora(cfg.model.lora),
                   above,
                   cfg.model.trust_remote_code, cfg.model.zero3_block_fetch, cfg.train.share_prompt, pack_len,
                   cfg.train.logprob_chunk, cfg.train.sequence_parallel)


PACK_LEN_AUTO = 512  # packed-sequence length under train.max_seq_length: auto, when the rows are shorter


def engine_limits(cfg: RFTRunConfig, ds_config: dict, cuda: bool | None = None) -> tuple[int, int | None]:
    """The vLLM engine's (max_model_len, kv_cache_memory_bytes), checked from config.json before any engine
    starts: a max_model_len shorter than the longest prompt + generation, or a CPU KV budget that cannot hold
    one request's n samples, is refused. Unset on CPU, the budget grows with that need; on GPU
    gpu_memory_utilization decides (None). prepare, `rft-ds check` and make_sampler call it; cuda as check_launch."""
    import torch

    from rft_ds.sampling.vllm import CPU_BLOCK_SIZE, check_max_model_len, kv_bytes_per_token, kv_cache_budget

    sp, m = cfg.sampler, cfg.method
    limit = prompt_limit(cfg)
    max_len = check_max_model_len(sp.max_model_len, limit, longest_generation(cfg))
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    if on_gpu:
        return max_len, sp.kv_cache_memory_bytes
    dtype = str(engine_dtype(sp.dtype, ds_config)).removeprefix("torch.")
    per_token = kv_bytes_per_token(cfg.model.model_path, dtype, sp.tensor_parallel_size)
    return max_len, kv_cache_budget(sp.kv_cache_memory_bytes, per_token, sp.block_size or CPU_BLOCK_SIZE, max_len,
                                    m.n_generations_per_prompt, limit, m.gen_kwargs["max_new_tokens"])


def make_sampler(cfg: RFTRunConfig, learner: Any, tokenizer: Any, ds_config: dict, group: int,
                 stop_sequences: list[str]) -> tuple[Any, Any]:
    """The sampler for `sampler.backend`, and the WeightSync that feeds it (None when it samples from the
    training module itself)."""
    import torch

    if cfg.sampler.backend == "hf":
        from rft_ds.sampling.hf import HFSampler

        return HFSampler(learner.module, tokenizer, cfg.sampler.batch_size, stop_sequences, learner.device), None

    from rft_ds.sampling.vllm import CPU_KV_BYTES, VLLMSampler
    from rft_ds.weight_sync import WeightSync

    sp = cfg.sampler
    max_model_len, kv_bytes = engine_limits(cfg, ds_config)
    if sp.kv_cache_memory_bytes is None and kv_bytes is not None and kv_bytes > CPU_KV_BYTES and D.is_main():
        console.say(f"[rft_ds] note: vLLM's KV cache on CPU is {kv_bytes / 2**30:.2f} GiB per rank, what "
                    f"{cfg.method.n_generations_per_prompt} samples of the longest sequence take "
                    "(sampler.kv_cache_memory_bytes sets it)")
    sampler = VLLMSampler(
        cfg.model.model_path, tokenizer, seed=_sample_seed(cfg.train.seed, -1, group, 2),
        dtype=str(engine_dtype(sp.dtype, ds_config)).removeprefix("torch."), max_model_len=max_model_len,
        tensor_parallel_size=sp.tensor_parallel_size, gpu_memory_utilization=sp.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_bytes, block_size=sp.block_size, enforce_eager=sp.enforce_eager,
        enable_sleep_mode=sp.enable_sleep_mode, stop_sequences=stop_sequences,
        trust_remote_code=cfg.model.trust_remote_code)
    return sampler, WeightSync(learner.module, sampler, sp.sync_bucket_mb, engine_dtype(sp.dtype, ds_config))


def engine_dtype(setting: str, ds_config: dict) -> Any:
    import torch

    return getattr(torch, setting if setting != "auto" else "bfloat16" if ds_config.get("bf16", {}).get("enabled")
                   else "float32")


PER_RANK = ("local", "pool", "table")  # RunState fields that are not rank 0's to save
STAGES = ("sample", "train", "sync", "eval", "end")  # an epoch's stages in order; a checkpoint names the next one


@dataclass
class RunState:
    """Everything a resume restores, and nothing else; `save_checkpoint` and `load_checkpoint` write and read
    exactly these fields. The shared fields are equal on every rank (rank 0 saves them); `pool` and `local`
    are this rank's own (every rank saves its own, beside its RNG states); `table` is rebuilt from every
    rank's `pool` on resume, never saved."""

    run_id: str
    prompts_digest: str  # the pools are keyed by prompt position: a resume with other prompts is refused
    shard: str = "interleaved"  # how prompts are dealt to ranks (data.shard when the run started)
    # micro-batches grouped by row length (train.group_by_length when the run started; runs from before it: no)
    group_by_length: bool = False
    # a prompt's rows next to each other in the plan (train.share_prompt when the run started, and the model
    # allowed it; runs from before it: no)
    share_prompt: bool = False
    epoch: int = 0  # the epoch in progress
    stage: str = "sample"  # the next stage to run in it (STAGES)
    cursor: int = 0  # position inside the stage: sampling chunks done, or micro-batches trained
    record: dict = field(default_factory=dict)  # the epoch in progress: its metrics so far
    history: list = field(default_factory=list)  # one record per finished epoch (metrics.jsonl)
    eval_before: dict | None = None
    best: dict | None = None  # {"epoch", "metric", "value", "run_id"} of best_model/
    optimizer_steps: int = 0  # over the whole run (train.save_every_steps)
    # this rank's: the grow step's samples (until scored), the stale check's probes (until compared), losses so far
    local: dict = field(default_factory=dict)
    pool: LocalPool = field(default_factory=LocalPool)  # this rank's: tokens of the pool rows it owns
    # the base model's answers to data.replay_prompts (replay.pack, + "digest" of those prompts), on every rank
    replay: dict | None = None
    table: np.ndarray = field(default_factory=lambda: np.zeros(0, TABLE))  # the pools, canonical, on every rank

    def shared(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in PER_RANK}

    def position(self) -> tuple[int, int, int]:
        return self.epoch, STAGES.index(self.stage), self.cursor


@dataclass
class Setup:
    """What never changes during a run: config, data, reward, tokenizer, engines. Built once by `setup`
    (method.restart_from_base replaces the learner, and what holds its module, at each grow step)."""

    cfg: RFTRunConfig
    rewards: list  # reward_terms.RewardTerm, in config order
    train: Prompts
    evals: list[EvalData]  # eval.sets, in order (empty: no eval)
    best: tuple[EvalSet, str] | None  # what picks best_model/ (train.best_metric), None: no best_model/
    tokenizer: Any
    learner: Any
    sampler: Any
    weight_sync: Any  # None when the sampler is the training module itself (hf)
    signals: Any
    out: Path
    stop_sequences: list[str]
    group: int  # this rank's engine group (tensor parallel), its prompt shard, and whether its samples count
    n_groups: int
    contributes: bool
    show: bool  # progress bars (rank 0)
    parity_tol: float
    stale_tol: float
    prompts_digest: str
    started: float = field(default_factory=time.monotonic)
    last_save_at: float = field(default_factory=time.monotonic)
    longest_step_s: float = 0.0  # the longest stretch between two safe points seen (for the deadline)
    last_save_s: float = 0.0
    job_end: float | None = None  # Slurm's end of the job (time.time()), when known
    universal: Path | None = None  # the resume checkpoint in DeepSpeed's universal form (another world size)
    ds_config: dict = field(default_factory=dict)  # the filled DeepSpeed config the learner was built with
    max_len: int = 0  # tokens a training row may hold (row_limit: train.max_seq_length resolved)


def run(cfg: RFTRunConfig, reward_fn: Callable | str | None = None, prompts: Any = None, eval_prompts: Any = None,
        metric_fn: Callable | str | None = None, stop_sequences: Sequence[str] | None = None) -> RFTResult:
    from rft_ds.faults import SIGNALS

    # First thing (unless launch/train.py did it before its imports): a SIGUSR1/SIGTERM during start-up would
    # otherwise kill the rank (its default action).
    installed_here = not SIGNALS.installed
    SIGNALS.install()
    # DeepSpeed calls torch.distributed functions torch has renamed; the warning, once per call site and
    # rank, is about DeepSpeed's code, not the user's, and buries the progress bars.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        return _run(cfg, reward_fn, prompts, eval_prompts, metric_fn, stop_sequences, SIGNALS)
    finally:
        if installed_here:
            SIGNALS.uninstall()


def _run(cfg: RFTRunConfig, reward_fn: Any, prompts: Any, eval_prompts: Any, metric_fn: Any,
         stop_sequences: Sequence[str] | None, signals: Any) -> RFTResult:
    """The recipe: set up, restore or start the run state, then the epoch loop over its stages."""
    s, ckpt = setup(cfg, reward_fn, prompts, eval_prompts, metric_fn, stop_sequences, signals)
    t, m = cfg.train, cfg.method
    st = load_checkpoint(s, ckpt) if ckpt is not None else start_fresh(s)
    log = MetricsLog(s.out, enabled=D.is_main(), history=st.history, sinks=_sinks(s, len(st.history)))
    if ckpt is None and st.eval_before:
        log.log_initial_eval(st.eval_before)
    if st.epoch >= t.epochs and D.is_main():  # a finished run resumed with nothing left to do: say so
        console.say(f"[rft_ds] {ckpt} is the end of epoch {st.epoch}: nothing left to train for train.epochs={t.epochs} "
              "(raise train.epochs to continue)")
    stopped = False
    while st.epoch < t.epochs and not stopped:
        step = schedule(st.epoch, m.start_percentile, m.end_percentile, m.n_improve_steps)
        if st.stage == "sample":
            stopped = step.grow and sample(s, st)  # stop-safe between chunks
            if not stopped:
                score(s, st, step.grow)
        if st.stage == "train" and not stopped:
            stopped = train(s, st, step)  # stop-safe between optimizer steps
        if st.stage == "sync" and not stopped:
            stopped = sync(s, st)
        if st.stage == "eval" and not stopped:
            stopped = evaluate(s, st)
        if st.stage == "end" and not stopped:
            stopped = end_epoch(s, st, log)
    if stopped and D.is_main():
        why = "stop signal received" if signals.received is not None else "the Slurm job ends soon"
        console.say(f"[rft_ds] {why}: checkpointed in epoch {st.epoch + 1} ({st.stage}); continue with --resume auto")
    if t.save_final_model and not stopped:
        s.learner.save_hf(s.out / "final_model", s.tokenizer, D.is_main())
        if s.learner.lora is not None:
            save_adapter(s.learner.module, s.out / "final_adapter", D.is_main())
    log.close()
    if D.is_main() and t.plots:
        _write_plots(s.out, log.history)
    return RFTResult(cfg, s.learner.engine, s.tokenizer, log.history, st.eval_before, s.out, stopped, ckpt)


def setup(cfg: RFTRunConfig, reward_fn: Any, prompts: Any, eval_prompts: Any, metric_fn: Any,
          stop_sequences: Sequence[str] | None, signals: Any) -> tuple[Setup, Path | None]:
    """Checks (prepare: no model yet) -> process group -> resume target agreed -> reward model -> learner
    (DeepSpeed ZeRO-3) -> sampler and weight sync. Returns the setup and the checkpoint to resume from."""
    import torch

    from rft_ds import checkpoint
    from rft_ds.sampling.vllm import engine_group
    from rft_ds.slurm import job_end_time

    rewards, train, evals, best, tokenizer, ds_config, _ = prepare(cfg, reward_fn, prompts, eval_prompts, metric_fn)
    t = cfg.train
    D.init(t.dist_backend, t.dist_timeout_s)
    check_shared_output(Path(t.output_dir), wait_s=min(30.0, t.dist_timeout_s / 4))
    # Resolved once, after the process group exists: rank 0 picks, every rank checks its own files, all agree.
    ckpt = checkpoint.agree_on_resume(t.resume, t.output_dir, D.world_size())
    check_resume_config(ckpt, cfg)  # again: a fallback may have picked an older checkpoint than prepare saw
    universal = None
    if ckpt is not None and checkpoint.read_meta(ckpt)["world_size"] != D.world_size():  # elastic resume
        universal = checkpoint.universal_copy(ckpt)
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    group, n_groups, contributes = engine_group(D.rank(), D.world_size(), cfg.sampler.tensor_parallel_size
                                                if cfg.sampler.backend == "vllm" else 1)
    if any(r.reward_model for r in rewards):
        with D.all_ranks_or_fail("loading the reward model"):  # a rank that cannot load it stops them all
            load_reward_models(rewards)  # eval sets without their own reward_fn share these terms
    random.seed(t.seed)  # the training RNG's start; a resume replaces it with the checkpoint's, nothing re-seeds it
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    out = Path(t.output_dir)
    if D.is_main():
        (out / "config.yaml").write_text(yaml.safe_dump(_yaml_safe(cfg.to_dict()), sort_keys=False))
    max_len = row_limit(cfg, train)
    learner = new_learner(cfg, ds_config, max_len)
    if t.share_prompt and not learner.share_prompt and D.is_main():
        console.say(f"[rft_ds] note: train.share_prompt is off for this model ({learner.share_prompt_off}): "
                    "rows train one by one")
    sampler, weight_sync = make_sampler(cfg, learner, tokenizer, ds_config, group,
                                        list(stop_sequences if stop_sequences is not None else cfg.reward.stop_sequences))
    half = not (weight_sync and weight_sync.dtype == torch.float32)
    # bf16/fp16: the engine's logits are rounded to half precision, and one bf16 step of a logit near 32-64 is
    # 0.25, so a 30-layer model legitimately differs by ~0.1-0.2 (SmolLM2-135M: 0.04-0.12 measured)
    s = Setup(cfg, rewards, train, evals, best, tokenizer, learner, sampler, weight_sync, signals, out,
              sampler.stop_sequences, group, n_groups, contributes, progress.enabled(t.progress, D.is_main()),
              parity_tol=cfg.sampler.parity_tolerance or (0.5 if half else 1e-3),
              stale_tol=cfg.sampler.stale_tolerance or (0.1 if half else 1e-3),
              prompts_digest=checkpoint.prompts_digest(train.texts, train.metadata),
              job_end=D.broadcast_object(job_end_time(os.environ) if D.is_main() else None), universal=universal,
              ds_config=ds_config, max_len=max_len)
    return s, ckpt


def start_fresh(s: Setup) -> RunState:
    """A new run: a run id every rank shares, and the eval before training."""
    st = RunState(run_id=D.broadcast_object(uuid.uuid4().hex[:12] if D.is_main() else None),
                  prompts_digest=s.prompts_digest, shard=s.cfg.data.shard, pool=LocalPool(D.rank()),
                  group_by_length=s.cfg.train.group_by_length, share_prompt=s.learner.share_prompt)
    _warn_foreign_best_model(s.out, st.run_id)
    if s.train.replay is not None:  # before any update: the base model's answers
        t0 = time.perf_counter()
        st.replay = replay.sample_set(s.sampler, s.train.replay.records, s.group, s.n_groups, s.contributes,
                                      s.cfg.method.gen_kwargs, _sample_seed(s.cfg.train.seed, -1, s.group, 2),
                                      "replay: sample" if s.show else None)
        st.replay["digest"] = replay_digest(s)
        st.record["time_replay_sample"] = time.perf_counter() - t0
    if s.evals and s.cfg.train.eval_interval > 0:
        st.eval_before = _evaluate(s, -1)
        if s.best is not None:
            _best_key(s, st.eval_before)  # a best_metric that metric_fn does not report fails now, not after an epoch
        if D.is_main():
            console.say(f"[rft_ds] eval before training: {_eval_summary(s, st.eval_before)}")
    return st


def sample(s: Setup, st: RunState) -> bool:
    """Grow step: N completions for each of this rank's prompts, one chunk of prompts at a time, each chunk
    seeded on its own so a run stopped between chunks samples the rest exactly as it would have.
    Changes st.local["samples"] (samples.Samples: compact arrays), st.cursor, st.record["time_sample"] (and
    "sampled_preemptions" with vLLM). True when the run must stop."""
    m, chunk = s.cfg.method, s.cfg.sampler.chunk_prompts
    mine = _my_prompts(s, st)
    n_chunks = _n_chunks(s)
    done = st.local.setdefault("samples", Samples())
    while st.cursor < n_chunks:
        maybe_die("sample", st.epoch)
        t0 = time.perf_counter()
        part = mine[st.cursor * chunk:(st.cursor + 1) * chunk]
        label = f"epoch {st.epoch + 1}: sample" + (f" {st.cursor + 1}/{n_chunks}" if n_chunks > 1 else "")
        # the sampler's log-probs for a few prompts of the first chunk: the stale-weight check's probes
        probes = np.zeros(len(part), bool)
        if s.weight_sync is not None and st.cursor == 0:  # every rank of an engine group asks alike
            probes[pick_probes(len(part), s.cfg.sampler.stale_probes, s.cfg.train.seed, st.epoch, s.group)] = True
        done.add(st.cursor * chunk, s.sampler.generate([r.token_ids for r in part], m.n_generations_per_prompt,
                                                       m.gen_kwargs, _sample_seed(s.cfg.train.seed, st.epoch, s.group,
                                                                                  0, st.cursor),
                                                       label if s.show else None, logprobs=probes))
        if s.cfg.sampler.backend == "vllm":  # this rank's engine only (no collective): rank 0's in metrics.jsonl
            st.record["sampled_preemptions"] = st.record.get("sampled_preemptions", 0) + s.sampler.last_preemptions
        st.cursor += 1
        _add_time(st.record, "time_sample", time.perf_counter() - t0)
        if safe_point(s, st, time.perf_counter() - t0):
            return True
    return False


def score(s: Setup, st: RunState, grow: bool) -> None:
    """Grow steps: score this rank's completions, take them into its pool shard, all-gather their table rows
    (scores and ids, 25 bytes each) and update the pools by method.pool; then the stage is train.
    Changes st.pool, st.table, st.record, st.stage."""
    m, rec = s.cfg.method, st.record
    rec.setdefault("n_sampled", 0)
    if grow:
        maybe_die("score", st.epoch)
        t0 = time.perf_counter()
        samples = st.local.pop("samples", None)  # a tensor-parallel peer drops its copy: its leader scores them
        samples = samples if samples is not None and s.contributes else Samples()
        pids = np.array([r.id for r in _my_prompts(s, st)], dtype=np.int64)[samples.prompt]
        tokens, eos = samples.tokens(), samples.eos
        # the stale-weight check's probes outlive the samples until the first optimizer step: a few rows
        st.local["probes"] = [(int(pids[i]), tokens[i].copy(), bool(eos[i]), lp) for i, lp in samples.probes.items()]
        scores, _, parts = score_shard(s.rewards, pids, tokens, s.train.texts, s.train.metadata, s.tokenizer,
                                       s.stop_sequences, s.cfg.reward, f"epoch {st.epoch + 1}: score" if s.show else None)
        rec.update({f"sampled_{k}": v for k, v in term_means(s.rewards, parts).items()})
        grow_step = st.epoch // m.n_improve_steps
        mine = st.pool.add(pids, scores, eos, tokens, grow_step)
        del samples, tokens  # the pool shard holds its own copy of what it keeps
        new = gather_new_rows(mine, grow_step)
        st.table = update_pool(st.table, new, grow_step, parse_pool_policy(m.pool), s.cfg.selection.dedup)
        st.pool.keep_only(st.table)
        rec["n_sampled"], rec["sampled_tokens"] = len(new), int(new["length"].sum())
        # cut by max_new_tokens, without an end: kept or never selected (method.overlong), counted either way
        rec["truncated_share"] = float(truncated(new, m.gen_kwargs["max_new_tokens"]).mean()) if len(new) else 0.0
        if len(new):
            rec.update(sampled_reward_mean=float(new["score"].mean()), sampled_reward_max=float(new["score"].max()))
        rec["time_score"] = time.perf_counter() - t0
    st.stage, st.cursor = "train", 0


def train(s: Setup, st: RunState, step: Any) -> bool:
    """Select (pure, the same on every rank), build rows where the tokens are (a balancing plan moves the
    surplus), and train on this rank's rows, one optimizer step at a time (a safe point after each). Every
    rank runs the same number of steps. Changes st.cursor, st.optimizer_steps, st.local["stats"] (losses,
    stale-check sums), st.record; then the stage is sync."""
    import torch

    t, sel = s.cfg.train, s.cfg.selection
    restart = s.cfg.method.restart_from_base and step.grow and st.epoch > 0 and st.cursor == 0
    if restart:  # ReST-EM: this grow step's selection trains from the base weights, with a fresh optimizer
        t0 = time.perf_counter()
        restart_from_base(s)
        st.record.update(restarted_from_base=True, time_restart=time.perf_counter() - t0)
    restarted = bool(st.record.get("restarted_from_base"))  # also when resumed inside this epoch's training
    learner = s.learner
    t0 = time.perf_counter()
    table = st.table  # the pools: one row per completion, the same on every rank
    # DAPO's overlong filtering (method.overlong: drop): a completion cut short takes no part in selection, so it
    # neither is trained on nor raises its prompt's threshold
    usable = ~truncated(table, s.cfg.method.gen_kwargs["max_new_tokens"]) if s.cfg.method.overlong == "drop" else \
        np.ones(len(table), bool)
    keep, thr = np.zeros(len(table), bool), np.full(len(table), np.nan)
    keep[usable], thr[usable] = select(table["prompt_id"][usable], table["score"][usable], step.percentile,
                                       sel.strategy, sel.top_k, sel.min_score)
    pid = table["prompt_id"][usable]
    first = np.r_[True, pid[1:] != pid[:-1]] if len(pid) else np.zeros(0, bool)  # each usable prompt's first row
    keep = cap_per_prompt(table["prompt_id"], table["score"], keep, s.cfg.method.max_per_prompt)
    rows, n_rows, moved = _rows(s, st, table, keep)
    sp = t.sequence_parallel  # a group of sp ranks trains the same rows, each on its shard of their positions
    n_replay = 0
    if st.replay is not None:  # method.replay_share of the epoch's rows: the base model's answers
        extra, n_replay = _replay_rows(s, st, n_rows, len(rows))
        rows += extra
    steps = num_steps(n_rows + n_replay, D.world_size() // sp, learner.micro_batch_size, learner.grad_accum)
    micro = plan_micro_batches(len(rows), steps, t.seed, st.epoch, D.rank() // sp, learner.micro_batch_size,
                               learner.grad_accum, [len(r.input_ids) for r in rows] if st.group_by_length else None,
                               prompt_groups(rows) if st.share_prompt else None)
    # the epoch's whole plan: the same after a resume
    st.local["padding"] = padded_tokens(rows, micro, learner.pack)
    st.record.update(
        pool_size=len(table), n_selected=int(keep.sum()), n_rows=n_rows, rows_moved=moved, replay_rows=n_replay,
        n_prompts_kept=int(len(np.unique(table["prompt_id"][keep]))),
        reward_mean=float(table["score"].mean()) if len(table) else None,
        reward_max=float(table["score"].max()) if len(table) else None,
        selected_reward_mean=float(table["score"][keep].mean()) if keep.any() else None,
        threshold_mean=float(thr[usable][first].mean()) if usable.any() else None,
        rows_not_fitting=int(keep.sum()) - n_rows,  # selected, but longer than a row may be (resume_force)
        train_steps=steps, selection_digest=selection_digest(table, keep))
    _add_time(st.record, "time_select", time.perf_counter() - t0)
    if s.weight_sync:
        s.sampler.sleep()  # GPU sleep mode: give the engine's memory to training (no-op otherwise)
    # what each optimizer step's loss is averaged over: its label tokens on every rank (one all_reduce; a
    # sequence-parallel group's ranks each count the group's rows)
    step_tokens = (D.all_reduce(torch.from_numpy(label_tokens(rows, micro, learner.grad_accum)), "sum") // sp).tolist()
    # gradient checkpointing where a micro-batch is long on any rank (the same choice on every rank); a rank
    # computes 1/sp of its group's positions
    checkpoint = checkpoint_plan(D.all_reduce(torch.from_numpy(-(-micro_batch_tokens(rows, micro, learner.pack) // sp)),
                                              "max").tolist(), learner.checkpoint_above)
    stats = st.local.setdefault("stats", TrainStats())
    if s.weight_sync and step.grow and st.cursor == 0 and not restarted:
        # did the engine sample from the weights the learner has? its log p of a few of its completions vs the
        # learner's, before any update (every rank joins: the forwards gather ZeRO-3 parameters)
        n_forwards = -(-s.cfg.sampler.stale_probes // learner.micro_batch_size)
        stats.add_logprob_diffs(learner.probe_diffs(_probe_rows(s, st), s.tokenizer.pad_token_id, n_forwards))
    st.local.pop("probes", None)  # compared, or not to be compared: freed
    pbar = progress.bar(total=len(micro), desc=f"epoch {st.epoch + 1}: train", show=s.show, unit="micro-batch")
    pbar.update(st.cursor)
    while st.cursor < len(micro):
        maybe_die("train", st.epoch)
        t1 = time.perf_counter()
        upto = min(st.cursor + learner.grad_accum, len(micro))
        one = learner.train_step(rows, micro[st.cursor:upto], s.tokenizer.pad_token_id,
                                 step_tokens[st.cursor // learner.grad_accum], D.world_size(),
                                 checkpoint=checkpoint[st.cursor:upto])
        stats.add(one)
        pbar.update(upto - st.cursor)
        # refreshed every step: update() alone redraws at most every 0.1 s, and a leave=False bar is erased
        # on close, so a run of fast steps would never show its loss
        pbar.set_postfix(loss=f"{one.losses[-1]:.4f}", refresh=True)
        st.cursor, st.optimizer_steps = upto, st.optimizer_steps + 1
        _add_time(st.record, "time_train", time.perf_counter() - t1)
        if safe_point(s, st, time.perf_counter() - t1):
            pbar.close()
            return True
    pbar.close()
    st.record.setdefault("time_train", 0.0)
    _finish_train_record(s, st, step, len(micro))
    st.stage, st.cursor = "sync", 0
    return False


def _finish_train_record(s: Setup, st: RunState, step: Any, n_micro: int) -> None:
    """Every rank ran the same steps on the same selection (checked, not assumed); the loss is the mean over
    every label token the epoch trained on; the stale-weight check's verdict (grow steps with an engine)."""
    stats = st.local["stats"]
    per_rank = D.all_gather_object((st.record["selection_digest"], n_micro, stats.ce_sum, stats.tokens,
                                    stats.input_tokens, st.local.get("padding", (0, 0))))
    st.record["checkpointed_micro_batches"] = stats.checkpointed  # the same on every rank (checkpoint_plan)
    if len({d for d, *_ in per_rank}) != 1 or len({n for _, n, *_ in per_rank}) != 1:
        raise D.RankError(f"epoch {st.epoch}: ranks disagree on the selection or step count: {per_rank}")
    n_loss = sum(c for _, _, _, c, _, _ in per_rank)
    real, padded = (sum(p[i] for *_, p in per_rank) // s.cfg.train.sequence_parallel for i in (0, 1))
    st.record.update(train_loss=sum(x for _, _, x, _, _, _ in per_rank) / n_loss if n_loss else None,
                     trained_tokens=sum(t for *_, t, _ in per_rank),
                     computed_tokens=real, padding_share=1 - real / padded if padded else 0.0,
                     train_steps_per_rank=[n // s.learner.grad_accum for _, n, *_ in per_rank],
                     lr=s.learner.lr(), selection_digest_per_rank=[d for d, *_ in per_rank])
    if s.weight_sync and step.grow and not st.record.get("restarted_from_base"):  # did the engine sample from the
        # weights the learner trained from? (after a restart it did not, by design: it sampled the latest policy)
        st.record.update(check_stale_weights(stats, s.stale_tol))  # probes run in eval mode: no dropout


def restart_from_base(s: Setup) -> None:
    """Collective: the learner is rebuilt from model.model_path (weights, optimizer state and LR schedule
    as at the start), and what holds its module follows (the weight sync, or the HF sampler). The vLLM
    engine keeps the latest policy until the next sync; pools and the run state are untouched. Nothing
    holds the old module when it is released, and a sleeping engine (GPU sleep mode) is asleep first, so
    the peak is the start of a run's, not two models."""
    dtype = s.weight_sync.dtype if s.weight_sync is not None else None
    if s.weight_sync is not None:
        s.sampler.sleep()  # no-op without sleep mode; the next sync wakes it
        s.weight_sync = None
    else:
        s.sampler.module = None
    s.learner.close()
    s.learner = new_learner(s.cfg, s.ds_config, s.max_len)
    if dtype is not None:
        from rft_ds.weight_sync import WeightSync

        s.weight_sync = WeightSync(s.learner.module, s.sampler, s.cfg.sampler.sync_bucket_mb, dtype)
    else:
        s.sampler.module = s.learner.module


def _rows(s: Setup, st: RunState, table: np.ndarray, keep: np.ndarray) -> tuple[list[Row], int, int]:
    """This rank's training rows of the selected completions (experience.rows_for_rank)."""
    return rows_for_rank(table[keep], st.pool, [r.token_ids for r in s.train.records], s.tokenizer.eos_token_id,
                         s.max_len, s.cfg.train.sequence_parallel)


def _replay_rows(s: Setup, st: RunState, n_rows: int, n_mine: int) -> tuple[list[Row], int]:
    """Collective (one small all_gather of row counts): this rank's replay rows of the epoch (replay.draw),
    dealt so that every group of ranks ends within one row of the others; and the epoch's replay rows in all."""
    sp, rp = s.cfg.train.sequence_parallel, st.replay
    usable = np.arange(len(rp["prompt"]))  # method.overlong: drop leaves out what max_new_tokens cut, as for the pools
    if s.cfg.method.overlong == "drop":
        usable = usable[~truncated(rp, s.cfg.method.gen_kwargs["max_new_tokens"])]
    picks = usable[replay.draw(n_rows, len(usable), s.cfg.method.replay_share, s.cfg.train.seed, st.epoch)]
    counts = D.all_gather_object(n_mine)[::sp]  # every rank of a group holds the group's rows
    mine = picks[replay.deal(counts, len(picks))[D.rank() // sp]]
    prompts = s.train.replay.records
    rows = [build_row(prompts[rp["prompt"][i]].token_ids, tokens, bool(rp["eos"][i]), s.tokenizer.eos_token_id,
                      s.max_len)
            for i, tokens in zip(mine, replay.completions(rp, mine))]
    return [r for r in rows if r is not None], len(picks)


def replay_digest(s: Setup) -> str:
    """What the replay set's answers were sampled for: a resume must find the same prompts at the same places."""
    from rft_ds.checkpoint import prompts_digest

    return prompts_digest(s.train.replay.texts, [])


def _probe_rows(s: Setup, st: RunState) -> list[Row]:
    """The stale-weight check's probes as rows, each with the sampler's log p of its completion (and EOS)."""
    rows = []
    for pid, tokens, eos, logprobs in st.local.get("probes", []):
        row = build_row(s.train.records[pid].token_ids, tokens, eos, s.tokenizer.eos_token_id, s.max_len)
        if row is not None:  # an empty completion without EOS has no label
            row.ref_logprobs = logprobs
            rows.append(row)
    return rows


def sync(s: Setup, st: RunState) -> bool:
    """Hand the trained weights to the engine and prove it on probes (first sync of a run, or always).
    Changes st.record; then the stage is eval. A safe point after it."""
    if s.weight_sync:
        maybe_die("sync", st.epoch)
        t0 = time.perf_counter()
        stats = s.weight_sync.sync()
        st.record.update(time_sync=stats.seconds, sync_bytes=stats.bytes,
                         sync_peak_extra_mb=stats.peak_extra_bytes / 2**20)
        if s.cfg.sampler.parity_check == "always" or (s.cfg.sampler.parity_check == "first" and s.weight_sync.n_syncs == 1):
            st.record["parity_max_diff"] = check_parity(s)
        took = time.perf_counter() - t0
    else:
        took = 0.0
    st.stage, st.cursor = "eval", 0
    return safe_point(s, st, took)


def evaluate(s: Setup, st: RunState) -> bool:
    """Every eval_interval epochs and after the last: eval, and best_model/ when it improved.
    Changes st.record, st.best; then the stage is end. A safe point after it."""
    t, rec = s.cfg.train, st.record
    took = 0.0
    if s.evals and t.eval_interval > 0 and ((st.epoch + 1) % t.eval_interval == 0 or st.epoch == t.epochs - 1):
        t0 = time.perf_counter()
        rec.update(_evaluate(s, st.epoch))
        rec["time_eval"] = took = time.perf_counter() - t0
        if s.best is not None:
            key = _best_key(s, rec)
            if st.best is None or rec[key] > st.best["value"]:
                st.best = {"epoch": st.epoch, "metric": key, "value": rec[key], "run_id": st.run_id}
                s.learner.save_hf(s.out / "best_model", s.tokenizer, D.is_main(), extra={"rft_ds_run.json": st.best})
    st.stage, st.cursor = "end", 0
    return safe_point(s, st, took)


def end_epoch(s: Setup, st: RunState, log: MetricsLog) -> bool:
    """Close the epoch's record, checkpoint every save_interval epochs, after the last and when asked to
    stop, log it, and move on to the next epoch. Changes every field but pool, table and best."""
    t = s.cfg.train
    step = schedule(st.epoch, s.cfg.method.start_percentile, s.cfg.method.end_percentile, s.cfg.method.n_improve_steps)
    rec = {"epoch": st.epoch, "grow_step": step.grow, "percentile": step.percentile,
           **dict.fromkeys(("time_sample", "time_score", "time_select", "time_train"), 0.0), **st.record}
    if st.epoch == 0 and st.eval_before:  # the eval before training, metric_fn's numbers included
        rec.update({f"{k}_initial": v for k, v in st.eval_before.items()})
    rec["time_epoch"] = sum(v for k, v in rec.items() if k.startswith("time_") and k != "time_epoch")
    # the figure peers compare: tokens sampled and trained per second and device, over the epoch's wall time
    rec["tokens_per_s_per_device"] = (rec.get("sampled_tokens", 0) + rec.get("trained_tokens", 0)) / \
        max(rec["time_epoch"], 1e-9) / D.world_size()
    rec.update(memory_gb())
    stop = s.signals.requested() and st.epoch < t.epochs - 1
    st.history.append(plain(rec))
    st.epoch, st.stage, st.cursor, st.record, st.local = st.epoch + 1, "sample", 0, {}, {}
    if stop or (t.save_interval and (st.epoch % t.save_interval == 0 or st.epoch == t.epochs)):
        save_checkpoint(s, st)
    log.log(st.history[-1])
    if D.is_main():
        shown = s.best[0].key(s.best[1]) if s.best else s.evals[0].spec.key("reward_mean") if s.evals else ""
        console.say("[rft_ds] " + format_epoch(st.history[-1], t.epochs, shown))
    return stop


def memory_gb() -> dict[str, float]:
    """Collective (one all_reduce of 3 numbers): the largest of any rank's RSS now, its peak RSS so far
    (start-up included), and with CUDA its peak allocated GPU memory so far, in GiB."""
    import resource

    import psutil
    import torch

    gib = 2**30
    now = psutil.Process().memory_info().rss
    # Linux reports KiB, and updates the high-water mark lazily: it can lag the RSS read just before
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, now)
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    now, peak, gpu = D.all_reduce(torch.tensor([now, peak, gpu], dtype=torch.float64), "max").tolist()
    return {"rss_gb": now / gib, "peak_rss_gb": peak / gib, **({"gpu_peak_gb": gpu / gib} if gpu else {})}


def safe_point(s: Setup, st: RunState, step_s: float) -> bool:
    """Collective, at a point where a checkpoint can be taken (between sampling chunks and optimizer steps,
    after a sync or an eval). Saves when a rank got a stop signal, when a periodic save is due
    (train.save_every_steps / save_every_minutes), or before Slurm ends the job; True when the run must stop.
    One all_reduce of two flags."""
    import torch

    t = s.cfg.train
    s.longest_step_s = max(s.longest_step_s, step_s)
    now = time.monotonic()
    periodic = bool(t.save_every_steps and st.stage == "train" and st.optimizer_steps % t.save_every_steps == 0) or \
        bool(t.save_every_minutes and now - s.last_save_at >= 60 * t.save_every_minutes)
    deadline = s.job_end is not None and deadline_reached(time.time(), s.job_end, s.longest_step_s, s.last_save_s,
                                                          t.save_before_end_s)
    stop_flag, save_flag = D.all_reduce(torch.tensor([int(s.signals.received is not None or deadline),
                                                      int(periodic)]), "max").tolist()
    if stop_flag or save_flag:
        save_checkpoint(s, st)
        if deadline and D.is_main():
            console.say("[rft_ds] the Slurm job ends soon: checkpointed and stopping (exit 3: requeue to continue)")
    return bool(stop_flag)


def deadline_reached(now: float, job_end: float, longest_step_s: float, last_save_s: float, margin_s: float) -> bool:
    """Save and stop now if waiting for one more step and then saving could run past the job's end."""
    return now + longest_step_s + last_save_s + margin_s >= job_end


def save_checkpoint(s: Setup, st: RunState) -> None:
    """Collective: the run state (the shared part by rank 0; its pool shard, `local` and its RNG by every
    rank) and the DeepSpeed engine, atomically. The epoch record being closed gets the checkpoint's own time."""
    from rft_ds import checkpoint

    t0 = time.perf_counter()

    def finalize(seconds: float) -> dict:  # rank 0, once every rank's files are written and sealed
        if st.stage == "sample" and st.cursor == 0 and st.history:  # an end-of-epoch checkpoint
            st.history[-1]["time_checkpoint"] = seconds
            st.history[-1]["time_epoch"] += seconds
        return st.shared()

    checkpoint.save(s.out / "checkpoints", checkpoint.checkpoint_name(*st.position()), s.learner.engine, None,
                    s.tokenizer, s.cfg.train.keep_last, die_hook=maybe_die, finalize_state=finalize,
                    local_state={"pool": st.pool, "local": st.local},
                    meta={"run_id": st.run_id, "position": list(st.position()), "config": _yaml_safe(s.cfg.to_dict()),
                          "shard": {"plan": st.shard, "groups": s.n_groups}})
    s.last_save_s = time.perf_counter() - t0
    s.last_save_at = time.monotonic()
    if st.stage == "sample" and st.cursor == 0 and st.history:
        st.history[-1].setdefault("time_checkpoint", s.last_save_s)


def load_checkpoint(s: Setup, ckpt: Path) -> RunState:
    """The mirror of save_checkpoint: engine, RNG, run state; then the engine gets the restored weights (a
    sync, never the original model path) and is checked."""
    from rft_ds import checkpoint

    shared, mine = checkpoint.load(ckpt, s.learner.engine, verified=True, universal=s.universal)
    checkpoint.check_compatible(shared, s.prompts_digest)
    if s.universal:  # another world size (at an elastic position): this rank takes over some old ranks' shards
        pool, local = LocalPool.merge([m["pool"] for m in mine], D.rank()), {}
    else:
        pool, local = mine["pool"], mine["local"]
    old = local.pop("completions", None)  # written before samples.Samples: Completion lists
    if old is not None and shared["stage"] == "sample":  # still to be scored (their log-probs are not kept)
        local["samples"] = Samples()
        local["samples"].add(0, [[dataclasses.replace(c, logprobs=None) for c in cs] for cs in old])
    st = RunState(**shared, local=local, pool=pool, table=gather_pool(pool))
    replay.check_resume(st.replay, replay_digest(s) if s.train.replay is not None else None, str(ckpt))
    if st.best is not None and _best_model_run(s.out) != st.run_id:  # best_model/ was overwritten by another run
        if D.is_main():
            console.say(f"[rft_ds] note: {s.out / 'best_model'} is not this run's ({st.run_id}); the next eval rewrites it")
        st.best = None
    if st.best is not None and "metric" not in st.best:  # written before train.best_metric existed
        st.best = {"epoch": st.best["epoch"], "metric": "eval_reward_mean", "value": st.best["eval_reward_mean"],
                   "run_id": st.best["run_id"]}
    if st.best is not None and (s.best is None or st.best["metric"] != s.best[0].key(s.best[1])):
        if D.is_main() and s.best is not None:
            console.say(f"[rft_ds] note: best_model/ was picked by {st.best['metric']}, now train.best_metric is "
                  f"{s.best[0].name}/{s.best[1]}; the next eval rewrites it")
        st.best = None
    if s.weight_sync:
        s.weight_sync.sync()
        if s.cfg.sampler.parity_check != "off":
            diff = check_parity(s)
            if D.is_main():
                console.say(f"[rft_ds] engine synced from the checkpoint; parity max |logprob diff| {diff:.2g}")
    if D.is_main():
        console.say(f"[rft_ds] resumed from {ckpt} at epoch {st.epoch + 1}/{s.cfg.train.epochs} ({st.stage}"
              + (f" {st.cursor}" if st.cursor else "") + ")"
              + (f" on {D.world_size()} ranks, written by {checkpoint.read_meta(ckpt)['world_size']}" if s.universal
                 else ""))
    return st


def check_parity(s: Setup) -> float:
    from rft_ds.weight_sync import parity_check

    probes = s.train.records[: s.cfg.sampler.parity_probes]
    return parity_check(s.learner.module, s.sampler, [r.token_ids for r in probes],
                        min(8, s.cfg.method.gen_kwargs["max_new_tokens"]), s.parity_tol, s.tokenizer.pad_token_id,
                        [r.text for r in probes], s.learner.device)


def _my_prompts(s: Setup, st: RunState) -> list[PromptRecord]:
    return [s.train.records[i] for i in shard(len(s.train.records), s.group, s.n_groups, st.shard)]


def _n_chunks(s: Setup) -> int:
    """Sampling chunks per grow step: the same on every rank (each chunk ends at a collective safe point)."""
    longest_shard = -(-len(s.train.records) // s.n_groups)
    return max(1, -(-longest_shard // s.cfg.sampler.chunk_prompts))


def _add_time(rec: dict, key: str, seconds: float) -> None:
    rec[key] = rec.get(key, 0.0) + seconds


def _sinks(s: Setup, start_epoch: int) -> list:
    t = s.cfg.train
    return open_sinks(s.out, tensorboard_on(t.tensorboard), t.wandb, t.wandb_project, t.wandb_run_name,
                      _yaml_safe(s.cfg.to_dict()), start_epoch) if D.is_main() else []


def _best_model_run(out: Path) -> str | None:
    """The run id best_model/ says its weights are from (None: no best_model, or one without the mark)."""
    import json

    mark = out / "best_model" / "rft_ds_run.json"
    try:
        return json.loads(mark.read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _warn_foreign_best_model(out: Path, run_id: str) -> None:
    """best_model/ of another (abandoned) run is not this run's best: say so; the first eval replaces it."""
    if D.is_main() and (out / "best_model").is_dir():
        console.say(f"[rft_ds] note: {out / 'best_model'} holds run {_best_model_run(out) or 'unknown'}'s weights, not "
              f"this run's ({run_id}); this run's first eval replaces it")


def _write_plots(out: Path, history: list[dict]) -> None:
    """The run is done and saved: a plotting problem is reported, never fatal."""
    from rft_ds.plot import plot_run

    try:
        paths = plot_run(out, records=history)
        console.say(f"[rft_ds] plots: {paths[0].parent}/{{{','.join(p.stem for p in paths)}}}.png")
    except Exception as e:  # noqa: BLE001 - e.g. matplotlib missing; metrics.jsonl has it all
        console.say(f"[rft_ds] plots skipped ({type(e).__name__}: {e}); python -m rft_ds.plot {out} draws them later")


def _evaluate(s: Setup, epoch: int) -> dict:
    """Every eval set, in order: one dict of all their metrics (evaluation.EvalSet.key names them)."""
    result: dict[str, Any] = {}
    for i, ev in enumerate(s.evals):
        result.update(_evaluate_set(s, ev, epoch, stream=1 if i == 0 else 10 + i))
    return result


def _evaluate_set(s: Setup, ev: EvalData, epoch: int, stream: int) -> dict:
    """n_samples completions per prompt of this rank's share, scored where they were sampled. Per prompt:
    pass@k, maj@k, summed here; one all_reduce of those sums (a few numbers per set) gives the means.
    metric_fn runs once, on rank 0, on every output (gathered to rank 0 only)."""
    import torch

    spec, data, tok = ev.spec, ev.prompts, s.tokenizer
    name = "eval" if spec.name == "eval" else f"eval {spec.name}"
    label = (lambda what: f"{name}: {what}") if s.show else (lambda what: None)
    mine = [data.records[i] for i in shard(len(data.records), s.group, s.n_groups, s.cfg.data.shard)]
    seed = _sample_seed(s.cfg.train.seed, epoch, s.group, stream)
    ids = [r.token_ids for r in mine]  # every rank of an engine group generates (its collectives need all)
    comps = s.sampler.generate(ids, spec.n_samples, spec.gen_kwargs, seed, label("sample"))
    if not s.contributes:  # a tensor-parallel peer: its group leader scores the same completions
        mine, comps = [], []
    pids = [r.id for r, cs in zip(mine, comps) for _ in cs]
    scores, outputs, parts = score_shard(ev.rewards, pids, [c.token_ids for cs in comps for c in cs], data.texts,
                                         data.metadata, tok, s.stop_sequences, s.cfg.reward, label("score"))
    sums = [float(scores.sum()), float(len(scores)), float(len(mine))]
    with D.all_ranks_or_fail(f"eval set {spec.name}: pass@k / maj@k"):  # answer_fn is the user's code
        passed = scores >= spec.pass_threshold
        answers = [ev.answer_fn(o) for o in outputs] if spec.maj_k else []
        ends = np.cumsum([len(cs) for cs in comps]).tolist()
        spans = list(zip([0] + ends[:-1], ends))  # each prompt's samples
        sums += [sum(pass_at_k(b - a, int(passed[a:b].sum()), k) for a, b in spans) for k in spec.pass_k]
        sums += [sum(maj_at_k(answers[a:b], passed[a:b].tolist(), k) for a, b in spans) for k in spec.maj_k]
    if spec.greedy:
        greedy = s.sampler.generate(ids, 1, {**spec.gen_kwargs, "do_sample": False}, seed, label("greedy"))
        if not s.contributes:
            greedy = []
        g_scores, _, _ = score_shard(ev.rewards, [r.id for r, cs in zip(mine, greedy) for _ in cs],
                                     [c.token_ids for cs in greedy for c in cs], data.texts, data.metadata, tok,
                                     s.stop_sequences, s.cfg.reward, label("score greedy"))
        sums += [float(g_scores.sum()), float((g_scores >= spec.pass_threshold).sum()), float(len(g_scores))]
    tot = D.all_reduce(torch.tensor(sums, dtype=torch.float64)).tolist()
    n_samples, n_prompts = tot[1], tot[2]
    result: dict[str, Any] = {spec.key("reward_mean"): tot[0] / max(n_samples, 1)}
    at = 3
    for name in [f"pass@{k}" for k in spec.pass_k] + [f"maj@{k}" for k in spec.maj_k]:
        result[spec.key(name)] = tot[at] / max(n_prompts, 1)
        at += 1
    if spec.greedy:
        result[spec.key("greedy_reward_mean")] = tot[at] / max(tot[at + 2], 1)
        result[spec.key("greedy_pass")] = tot[at + 1] / max(tot[at + 2], 1)
    result.update({spec.key(k): v for k, v in term_means(ev.rewards, parts).items()})
    if ev.metric_fn is not None:
        gathered = D.gather_object((pids, outputs))
        extra = None
        with D.all_ranks_or_fail(f"eval set {spec.name}: metric_fn"):
            if D.is_main():
                pairs = sorted((p, o) for ps, os_ in gathered for p, o in zip(ps, os_))  # in prompt order
                pids, outputs = [p for p, _ in pairs], [o for _, o in pairs]
                prompts = [data.texts[p] for p in pids]
                meta = {k: [data.metadata[p].get(k) for p in pids] for k in sorted({k for p in pids for k in data.metadata[p]})}
                extra = ev.metric_fn(samples=[p + o for p, o in zip(prompts, outputs)], prompts=prompts, outputs=outputs,
                                     **meta)
                if not isinstance(extra, dict):
                    raise RewardError(f"metric_fn of eval set {spec.name} must return a dict, got {type(extra).__name__}")
        extra = D.broadcast_object(extra)
        result.update({spec.key(k): v for k, v in extra.items()})
    return result


def _best_key(s: Setup, rec: dict) -> str:
    """The record key of train.best_metric; a metric_fn key that never appeared is an error naming it."""
    spec, metric = s.best
    key = spec.key(metric)
    if not isinstance(rec.get(key), (int, float)) or isinstance(rec.get(key), bool):
        raise ConfigError(f"train.best_metric {spec.name}/{metric}: eval set {spec.name} reported no number {key}; it "
                          f"reported {', '.join(k for k in rec if k.startswith(spec.key('')))}")
    return key


def _eval_summary(s: Setup, result: dict) -> str:
    """One short line per eval: each set's reward mean and first pass@k / greedy numbers."""
    parts = []
    for ev in s.evals:
        spec = ev.spec
        shown = ["reward_mean"] + [m for m in spec.metrics()[1:] if m.startswith(("pass@", "maj@", "greedy_pass"))]
        nums = " ".join(f"{m.replace('_mean', '')} {result[spec.key(m)]:.4f}" for m in shown if spec.key(m) in result)
        parts.append(f"{spec.name}: {nums}")
    return " | ".join(parts)


def _yaml_safe(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _yaml_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_yaml_safe(v) for v in d]
    return d if isinstance(d, (str, int, float, bool, type(None))) else repr(d)
