"""What is refused before any model loads: the start-up steps `rft-ds check` and a run's start share.

`steps` is the one list. A run calls it through `prepare`, where the first problem raises (one line naming
the field); `rft-ds check` calls it with an `attempt` that records a problem and goes on, so one check lists
every problem, and a step that needs an earlier one's result is skipped when that failed. Neither can drift
from the other. Nothing here needs a process group or model weights, except `check_shared_output`, the one
collective check, which setup runs once the process group exists.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rft_ds import distributed as D
from rft_ds.config import (
    EvalSet,
    RFTRunConfig,
    best_metric,
    parse_sets,
    read_model_config,
    rollouts_on,
    text_config,
    yaml_safe,
)
from rft_ds.data import PromptSet, load_source, normalize, resolve_callable, tokenize, use_chat_template
from rft_ds.errors import ConfigError
from rft_ds.evaluation import EvalData
from rft_ds.lora import check_lora, parse_lora
from rft_ds.prompt_store import PromptStore, open_rows, startup_positions
from rft_ds.reward_terms import build_terms, check_arguments, check_prompts, function_term
from rft_ds.rollout import RolloutSpec, load_spec
from rft_ds.sequence_parallel import why_not as why_not_sequence_parallel

FAILED = object()  # what a failed step returns under check's `attempt`


@dataclass
class Inputs:
    """The Python API's arguments; None: the config's field."""

    reward_fn: Any = None
    prompts: Any = None
    eval_prompts: Any = None
    metric_fn: Any = None


@dataclass
class Prepared:
    """What the start-up steps found, for setup: nothing here holds model weights."""

    rewards: list  # reward_terms.RewardTerm, in config order (reward models: config.json checked, not loaded)
    prompts: PromptStore  # the training prompts, read when needed (their replay prompts in .replay)
    evals: list[EvalData]  # eval sets, in order (empty: no eval)
    best: tuple[EvalSet, str] | None  # what picks best_model/ (train.best_metric), None: no best_model/
    tokenizer: Any
    ds_config: dict  # the filled DeepSpeed config
    max_len: int  # tokens a training row may hold (train.max_seq_length resolved)
    rollout: RolloutSpec | None = None  # rollout.env / rollout.tools, imported and checked; None: single turns


def prepare(cfg: RFTRunConfig, inputs: Inputs) -> Prepared:
    """Every start-up step, the first problem raised; model.build makes the model first when it is missing."""
    return steps(cfg, launch_world_size(), inputs)


def _call(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def steps(
    cfg: RFTRunConfig,
    world: int,
    inputs: Inputs,
    cuda: bool | None = None,
    attempt: Callable = _call,
    notes: list[str] | None = None,
) -> Prepared | None:
    """The start-up steps in order. attempt(fn, *args) runs one (a run: plainly; `rft-ds check`: recording its
    problem and returning FAILED). notes given (check) means nothing is built or written: a model that
    model.build would make is a note, and the steps that need it wait for the run. cuda as check_launch."""

    def ok(*results: Any) -> bool:
        return all(r is not FAILED for r in results)

    check_only = notes is not None
    attempt(check_launch, cfg, world, cuda)  # the resume target too: setup agrees on it, collectively
    # reward models: config.json checked, loaded in setup; with rollout.env the environment may give the rewards
    rewards = attempt(build_terms, cfg.reward, inputs.reward_fn, cfg.rollout.env is not None)
    rollout = attempt(load_spec, cfg.rollout)  # the environment or tools imported, one environment made
    attempt(check_metric_sinks, cfg.train)
    sets = attempt(parse_sets, cfg, inputs.eval_prompts, inputs.metric_fn)
    best = attempt(best_metric, cfg.train.best_metric, sets) if ok(sets) and cfg.train.save_best_model else None
    prompts = attempt(load_prompts, cfg, inputs.prompts)
    replay = attempt(load_replay_prompts, cfg)  # its own step: a bad replay source hides nothing else
    if ok(prompts):
        prompts.replay = replay if ok(replay) else None
    evals = attempt(load_eval_sets, cfg, sets, rewards if ok(rewards) else []) if ok(sets) else FAILED
    attempt(check_output_dir, Path(cfg.train.output_dir), not check_only)
    ds_config = attempt(deepspeed_config, cfg, world, cuda)
    model = Path(cfg.model.model_path)
    if check_only and cfg.model.build and not (model / "config.json").is_file():
        notes.append(
            f"model.model_path {model} is not there yet: model.build={cfg.model.build} makes it when the run "
            "starts, so its checks (causal LM, LoRA targets, tokenizer, prompt lengths) wait until then"
        )
        if cfg.model.build == "smollm2":
            attempt(check_smollm2_build)
        return None
    if not check_only:
        build_model(cfg)
    if attempt(check_model, cfg, cuda) is FAILED:
        return None
    if cfg.sampler.backend == "vllm" and ok(ds_config):
        attempt(engine_limits, cfg, ds_config, cuda)  # max_model_len and the CPU KV budget, before any engine
    tokenizer = attempt(load_tokenizer, cfg)
    if not ok(tokenizer, prompts, evals):
        return None
    if not ok(rollout):
        return None
    schemas = rollout.schemas if rollout is not None else None
    if rollout is not None:
        attempt(check_env_template, cfg, tokenizer, rollout)
    checked = attempt(tokenize_prompts, cfg, tokenizer, prompts, evals, check_only, schemas)
    if checked is FAILED:
        return None
    max_len = attempt(row_limit, cfg, prompts)
    if ok(max_len) and not rollouts_on(cfg):  # a prompt drawn later that would not fit a row is refused when read
        prompts.limit_to(max_len - cfg.method.gen_kwargs["max_new_tokens"] - 1)
    if ok(rewards):
        metadata, head = checked
        attempt(check_arguments, rewards, {k for m in metadata for k in m})
        attempt(check_prompts, rewards, metadata[:head], "data.prompts")
    for i, ev in enumerate(evals):
        attempt(check_arguments, ev.rewards, {k for m in ev.prompts.metadata for k in m})
        attempt(check_prompts, ev.rewards, ev.prompts.metadata, eval_where(cfg, i))
    return Prepared(rewards, prompts, evals, best, tokenizer, ds_config, max_len, rollout)


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
    check_resume_groups(ckpt, cfg, world)
    return ckpt


def ranks_per_engine(cfg: RFTRunConfig) -> int:
    """Ranks that share one engine, and so one share of the prompts: sampler.tensor_parallel_size (hf: 1)."""
    return cfg.sampler.tensor_parallel_size if cfg.sampler.backend == "vllm" else 1


def check_resume_groups(ckpt: Path | None, cfg: RFTRunConfig, world: int) -> None:
    """A checkpoint taken inside sampling, scoring or training holds each rank's completions of its engine
    group's prompts: with another number of groups (sampler.tensor_parallel_size changed) they would be paired
    with other prompts. Refused in one line, --resume-force or not; at an epoch's end, or after training,
    nothing per group is pending and any number of groups resumes."""
    from rft_ds.checkpoint import read_meta
    from rft_ds.run_state import elastic

    meta = read_meta(ckpt) if ckpt is not None else {}
    saved = (meta.get("shard") or {}).get("groups")
    now = world // ranks_per_engine(cfg)
    if saved is None or saved == now or elastic(meta.get("position", (0, 0, 0))):
        return
    raise ConfigError(
        f"checkpoint {ckpt} was taken inside an epoch's sampling or training with the prompts dealt to {saved} "
        f"engine groups; this run deals them to {now} (sampler.tensor_parallel_size="
        f"{cfg.sampler.tensor_parallel_size} on {world} ranks): resume it with "
        f"sampler.tensor_parallel_size={world // saved}, or from a checkpoint at an epoch's end"
    )


def check_resume_config(ckpt: Path | None, cfg: RFTRunConfig) -> None:
    """A resume with a changed field that matters (config.RESUME_FIELDS) is refused, in one line listing
    them, unless train.resume_force: the pools, schedule and seeds would no longer mean what they meant."""
    from rft_ds.checkpoint import read_meta
    from rft_ds.config import resume_changes

    saved = read_meta(ckpt).get("config") if ckpt is not None else None
    changes = resume_changes(saved, yaml_safe(cfg.to_dict())) if saved else []
    if changes and not cfg.train.resume_force:
        raise ConfigError(
            f"checkpoint {ckpt} was written with another config: {'; '.join(changes)}; resume with "
            "--resume-force (train.resume_force=true) to accept the change"
        )


def check_metric_sinks(t: Any) -> None:
    import importlib.util

    if t.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb is true but the wandb package is not installed (pip install wandb)")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "train.tensorboard is true but the tensorboard package is not installed (pip install tensorboard)"
        )


def tensorboard_on(setting: bool | None) -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None if setting is None else setting


def load_prompts(cfg: RFTRunConfig, prompts: Any) -> PromptStore:
    """The training prompts (the API's argument, else data.prompts), opened where they lie (prompt_store):
    records are read and checked later, a sample at start-up (tokenize_prompts) and the rest when drawn."""
    d = cfg.data
    src = prompts if prompts is not None else d.prompts
    if src is None:
        raise ConfigError("data.prompts is required")
    prompts = PromptStore(
        open_rows(src, "prompts", d.prompt_field, d.split), "prompts", d.prompt_field, d.metadata_fields
    )
    if d.prompts_per_grow_step is not None and d.prompts_per_grow_step > len(prompts):
        raise ConfigError(
            f"data.prompts_per_grow_step ({d.prompts_per_grow_step}) is larger than the dataset's "
            f"{len(prompts)} prompts; set it to at most {len(prompts)}, or null for every prompt"
        )
    return prompts


def load_replay_prompts(cfg: RFTRunConfig) -> PromptSet | None:
    """data.replay_prompts, read and checked (None: no replay, also at method.replay_share 0). Only the prompt
    is read: no reward scores them, so data.metadata_fields does not apply."""
    d = cfg.data
    if d.replay_prompts is None or cfg.method.replay_share == 0:
        return None
    texts, _ = normalize(
        load_source(d.replay_prompts, "data.replay_prompts", d.prompt_field, d.split),
        "data.replay_prompts",
        d.prompt_field,
        [],
    )
    return PromptSet(texts, [{} for _ in texts])


def eval_where(cfg: RFTRunConfig, i: int) -> str:
    """How errors name eval set i: data.eval_prompts' one set, or eval.sets[i]."""
    return "eval_prompts" if cfg.eval.sets is None else f"eval.sets[{i}]"


def load_eval_sets(cfg: RFTRunConfig, sets: Sequence[EvalSet], rewards: list) -> list[EvalData]:
    """Each eval set's prompts read and checked, and its functions resolved (a set without its own
    reward_fn shares the run's reward terms)."""
    d, out = cfg.data, []
    for i, es in enumerate(sets):
        where = eval_where(cfg, i)
        data = PromptSet(
            *normalize(
                load_source(es.prompts, where, d.prompt_field, es.split), where, d.prompt_field, d.metadata_fields
            )
        )
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
    problem = why_not_sequence_parallel(
        text_config(read_model_config(cfg.model.model_path)), cfg.train.sequence_parallel
    )
    if problem:
        raise ConfigError(f"train.sequence_parallel={cfg.train.sequence_parallel}: {problem}")
    lora = parse_lora(cfg.model.lora)
    if lora is not None:
        check_lora(lora, cfg.model.model_path, cfg.model.trust_remote_code)  # on the meta device: no weights read
    if cfg.sampler.backend == "vllm":
        from rft_ds.sampling.vllm import check_servable

        check_servable(cfg.model.model_path, on_cpu=not cuda)


def check_causal_lm(model_path: str, trust_remote_code: bool = False) -> None:
    """From config.json alone: refuse a model AutoModelForCausalLM cannot build, before loading weights. A
    model with its own code (auto_map) is one it can build when model.trust_remote_code allows that code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_model_config(model_path)
    model_type = config.get("model_type")
    if "AutoModelForCausalLM" in (config.get("auto_map") or {}) and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if not trust_remote_code:
            raise ConfigError(
                f"model.model_path {model_path}: model type {model_type!r} comes with its own code "
                f"({config['auto_map']['AutoModelForCausalLM']}); set model.trust_remote_code: true to run it"
            )
        return
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"model.model_path {model_path}: model type {model_type!r} is not a causal LM "
            "(AutoModelForCausalLM cannot load it)"
        )


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
    return max(
        [cfg.method.gen_kwargs["max_new_tokens"], (cfg.train.eval_gen_kwargs or {}).get("max_new_tokens", 0)]
        + [(d.get("gen_kwargs") or {}).get("max_new_tokens", 0) for d in sets if isinstance(d, dict)]
    )


def model_max_positions(model_path: str) -> int | None:
    return text_config(read_model_config(model_path)).get("max_position_embeddings")


def prompt_limit(cfg: RFTRunConfig) -> int:
    """Longest prompt allowed: data.max_prompt_length, and room left for the longest generation (rollouts:
    for a turn within rollout.max_tokens, itself within the model's positions)."""
    positions = model_max_positions(cfg.model.model_path)
    if rollouts_on(cfg):
        r = cfg.rollout
        if positions is not None and r.max_tokens > positions:
            raise ConfigError(f"rollout.max_tokens ({r.max_tokens}) is more than the model's {positions} positions")
        return min(cfg.data.max_prompt_length, r.max_tokens - 2)
    if positions is None:
        return cfg.data.max_prompt_length
    room = positions - longest_generation(cfg)
    if room < 1:
        raise ConfigError(
            f"max_new_tokens ({longest_generation(cfg)}) leaves no room for a prompt in the model's "
            f"{positions} positions"
        )
    return min(cfg.data.max_prompt_length, room)


def engine_limits(cfg: RFTRunConfig, ds_config: dict, cuda: bool | None = None) -> tuple[int, int | None]:
    """The vLLM engine's (max_model_len, kv_cache_memory_bytes), checked from config.json before any engine
    starts: a max_model_len shorter than the longest prompt + generation, or a CPU KV budget that cannot hold
    one request's n samples, is refused. Unset on CPU, the budget grows with that need; on GPU
    gpu_memory_utilization decides (None). the start-up steps and build.make_sampler call it; cuda as check_launch."""
    import torch

    from rft_ds.sampling.vllm import CPU_BLOCK_SIZE, check_max_model_len, kv_bytes_per_token, kv_cache_budget

    sp, m = cfg.sampler, cfg.method
    limit = prompt_limit(cfg)
    # rollouts: a turn sees its trajectory so far, at most rollout.max_tokens with what it samples
    longest = cfg.rollout.max_tokens - limit if rollouts_on(cfg) else longest_generation(cfg)
    max_len = check_max_model_len(sp.max_model_len, limit, longest)
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    if on_gpu:
        return max_len, sp.kv_cache_memory_bytes
    dtype = str(engine_dtype(sp.dtype, ds_config)).removeprefix("torch.")
    per_token = kv_bytes_per_token(cfg.model.model_path, dtype, sp.tensor_parallel_size)
    return max_len, kv_cache_budget(
        sp.kv_cache_memory_bytes,
        per_token,
        sp.block_size or CPU_BLOCK_SIZE,
        max_len,
        m.n_generations_per_prompt,
        limit,
        longest if rollouts_on(cfg) else m.gen_kwargs["max_new_tokens"],
    )


def tokenize_prompts(
    cfg: RFTRunConfig,
    tokenizer: Any,
    prompts: PromptStore,
    evals: Sequence[EvalData],
    every: bool = False,
    tools: list | None = None,
) -> tuple[list[dict], int]:
    """Token ids of the eval and replay prompts, and of the training prompts checked at start-up: all of them
    with `every` (`rft-ds check`) or up to prompt_store.STARTUP_CHECK, else that many spread over the set (the
    rest are checked when drawn). Chat prompts are rendered with the template; a prompt longer than the limit
    is an error naming it. Returns the checked training prompts' metadata, and how many of them are the set's
    first ones (positions = indices)."""
    d = cfg.data
    limit = prompt_limit(cfg)
    chat = use_chat_template(tokenizer, d.apply_chat_template)
    prompts.set_format(tokenizer, limit, chat, d.system_prompt, tools)
    if every:
        prompts.check_all()
    positions, head = startup_positions(len(prompts))
    metadata = [r.metadata for r in prompts.load(positions)]
    sets = [
        (ev.prompts, "eval_prompts" if cfg.eval.sets is None else f"eval.sets[{i}].prompts")
        for i, ev in enumerate(evals)
    ]
    sets += [(prompts.replay, "data.replay_prompts")] if prompts.replay is not None else []
    for p, where in sets:
        p.records = tokenize(p.texts, p.metadata, tokenizer, limit, where, chat, d.system_prompt, tools)
        # chat prompts: reward functions get the last user message as the prompt, the messages as a keyword
        p.texts, p.metadata = [r.text for r in p.records], [r.metadata for r in p.records]
    return metadata, head


def check_env_template(cfg: RFTRunConfig, tokenizer: Any, rollout: RolloutSpec) -> None:
    """With rollouts and a chat template: the template renders what an environment answers after an assistant
    turn (a user message; with tools, a tool message), here rather than at a run's first environment answer."""
    from rft_ds.rollout import env_delta

    if not use_chat_template(tokenizer, cfg.data.apply_chat_template):
        return
    answers = [[{"role": "user", "content": "observation"}]]
    if rollout.schemas:
        answers.append([{"role": "tool", "name": rollout.schemas[0]["function"]["name"], "content": "result"}])
    for messages in answers:
        try:
            env_delta(tokenizer, messages, rollout.schemas, tokenizer.eos_token)
        except Exception as e:  # noqa: BLE001 - the template's own error, in one line
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"rollout: the chat template cannot render a {messages[0]['role']!r} message after an assistant "
                f"turn ({why}); set data.apply_chat_template or use another tokenizer"
            ) from None


def row_limit(cfg: RFTRunConfig, prompts: PromptStore) -> int:
    """Tokens a training row may hold (train.max_seq_length), from the tokenized prompts: auto is the longest
    prompt + method.gen_kwargs.max_new_tokens + its EOS, so no completion is ever cut; an explicit value below
    that is refused here, before any model loads, naming both fields. When only a sample of a large set was
    checked, the longest prompt is the longest the limit allows (data.max_prompt_length)."""
    if rollouts_on(cfg):  # a trajectory's row: its whole sequence (rollout.max_tokens) and its EOS
        return cfg.rollout.max_tokens + 1 if cfg.train.max_seq_length == "auto" else cfg.train.max_seq_length
    known = prompts.lengths >= 0
    first = int(np.argmax(prompts.lengths))  # the longest known prompt (ties: the first); unknown ones are -1
    replay = prompts.replay.records if prompts.replay else []
    # the longest prompt of the training and replay sets (ties: the first), and how an error names it
    lengths, where, longest = max(
        [(int(prompts.lengths[first]), "prompt", first)]
        + [(len(r.token_ids), "data.replay_prompts", i) for i, r in enumerate(replay)],
        key=lambda x: x[0],
    )
    new_tokens = cfg.method.gen_kwargs["max_new_tokens"]
    need = lengths + new_tokens + 1
    limit = cfg.train.max_seq_length
    if limit == "auto":  # a sample of a large set was checked: any prompt up to the limit may come
        return need if known.all() else max(need, prompt_limit(cfg) + new_tokens + 1)
    if limit < need:
        raise ConfigError(
            f"train.max_seq_length ({limit}) is shorter than {where} {longest} ({lengths} tokens) "
            f"+ method.gen_kwargs.max_new_tokens ({new_tokens}) + EOS = {need}: its completions would be "
            f"cut; set train.max_seq_length to auto or >= {need}"
        )
    return limit


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
                        "file system every node mounts (NFS, Lustre, ...): checkpoints and resume need one directory"
                    )
                time.sleep(1)
    finally:
        D.barrier()  # nobody removes a marker before every rank has looked
        mine.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the last rank on each file system removes the directory
            mark.rmdir()


def check_smollm2_build() -> None:
    """What model.build: smollm2 needs is installed (the model itself is made when the run starts)."""
    from rft_ds import smollm2

    try:
        smollm2.gguf_path()
    except smollm2.BuildError as e:
        raise ConfigError(str(e)) from None


def engine_dtype(setting: str, ds_config: dict) -> Any:
    """The vLLM engine's dtype: sampler.dtype, or under auto the training dtype (bf16, fp16 or float32: an
    fp16 run gets a float16 engine, not a float32 one at twice the memory)."""
    import torch

    from rft_ds.learner import training_dtype

    return training_dtype(ds_config) if setting == "auto" else getattr(torch, setting)
