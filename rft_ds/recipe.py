"""The RFT recipe: one epoch loop, readable top to bottom.

    sample (grow steps) -> score on each rank, all-gather -> select (pure) -> rows -> train -> sync -> eval

Every rank runs every line. The table that selection sees is identical on every rank, so selection is
too, and the check after each epoch proves it (a digest per rank) instead of assuming it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from rft_ds import distributed as D
from rft_ds import progress
from rft_ds.config import ConfigError, RFTRunConfig, read_model_config, text_config
from rft_ds.data import (PromptRecord, load_source, normalize, resolve_callable, shard, tokenize,
                         use_chat_template)
from rft_ds.experience import build_row, plan_micro_batches
from rft_ds.metrics import MetricsLog, format_epoch, open_sinks, plain
from rft_ds.scoring import RewardError, decode_outputs, score_and_gather
from rft_ds.selection import Pools, Samples, schedule, select, selection_digest


@dataclass
class Prompts:
    texts: list[str]
    metadata: list[dict]
    records: list[PromptRecord] = field(default_factory=list)


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


def _sample_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """Independent, far-apart streams per (epoch, rank, train/eval): nearby seeds overlap in samplers.
    epoch is -1 for the eval before training, hence the +1."""
    return int(np.random.SeedSequence([seed, epoch + 1, rank, stream]).generate_state(1)[0])


def _load_tokenizer(cfg: RFTRunConfig) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.model_path
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer at {path} has no eos_token: completions could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the usual choice; pads are masked out of loss and attention
    return tok


def longest_generation(cfg: RFTRunConfig) -> int:
    return max(cfg.method.gen_kwargs["max_new_tokens"], (cfg.train.eval_gen_kwargs or {}).get("max_new_tokens", 0))


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
    """Every check that needs no process group and no model weights, so bad input fails in seconds."""
    from rft_ds.checkpoint import resolve_resume
    from rft_ds.learner import fill_ds_config
    from rft_ds.sampling.vllm import engine_group

    from rft_ds.slurm import torch_env

    # set by every launcher (srun: SLURM_NTASKS); the process group comes later
    world = int(os.environ.get("WORLD_SIZE") or torch_env(os.environ).get("WORLD_SIZE", "1"))
    import torch

    # The device rule, checked here so a rank without a usable GPU stops before anything loads (init applies it).
    D.local_device(os.environ, torch.cuda.device_count())
    D.resolve_backend(cfg.train.dist_backend, torch.cuda.device_count())
    ckpt = resolve_resume(cfg.train.resume, cfg.train.output_dir, world)
    if cfg.sampler.backend == "vllm":
        engine_group(0, world, cfg.sampler.tensor_parallel_size)
    reward_fn = resolve_callable(reward_fn if reward_fn is not None else cfg.reward.reward_fn, "reward.reward_fn")
    if cfg.reward.reward_model:
        from rft_ds.rewards import check_reward_model

        if reward_fn is not None:
            raise ConfigError("set reward.reward_fn or reward.reward_model, not both")
        check_reward_model(cfg.reward.reward_model, cfg.reward.reward_model_label)
    elif reward_fn is None:
        raise ConfigError("reward.reward_fn or reward.reward_model is required (a callable, or 'module:function' in "
                          "the config)")
    check_metric_sinks(cfg.train)
    metric_fn = resolve_callable(metric_fn if metric_fn is not None else cfg.reward.metric_fn, "reward.metric_fn")
    src = prompts if prompts is not None else cfg.data.prompts
    if src is None:
        raise ConfigError("data.prompts is required")
    d = cfg.data
    train = Prompts(*normalize(load_source(src, "prompts", d.prompt_field, d.split), "prompts", d.prompt_field,
                               d.metadata_fields))
    src = eval_prompts if eval_prompts is not None else d.eval_prompts
    evals = None
    if src is not None:
        evals = Prompts(*normalize(load_source(src, "eval_prompts", d.prompt_field, d.eval_split), "eval_prompts",
                                   d.prompt_field, d.metadata_fields))
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{D.rank() if D.is_dist() else 0}.{random.getrandbits(32)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir {out} is not writable: {e.strerror or e}") from None

    from rft_ds.learner import load_ds_config

    ds_config = fill_ds_config(load_ds_config(cfg.train.deepspeed_config), cfg.train, world)
    if cfg.model.build == "tiny":
        from rft_ds.toy import ensure_tiny_model

        ensure_tiny_model(cfg.model.model_path, seed=cfg.train.seed)
    elif cfg.model.build == "smollm2":
        from rft_ds import smollm2

        try:
            smollm2.ensure(cfg.model.model_path)
        except smollm2.BuildError as e:
            raise ConfigError(str(e)) from None
    check_causal_lm(cfg.model.model_path)
    if cfg.sampler.backend == "vllm":
        from rft_ds.sampling.vllm import check_servable

        check_servable(cfg.model.model_path, on_cpu=not torch.cuda.is_available())
    tokenizer = _load_tokenizer(cfg)
    limit = prompt_limit(cfg)
    chat = use_chat_template(tokenizer, d.apply_chat_template)
    train.records = tokenize(train.texts, train.metadata, tokenizer, limit, "prompts", chat, d.system_prompt)
    if evals is not None:
        evals.records = tokenize(evals.texts, evals.metadata, tokenizer, limit, "eval_prompts", chat, d.system_prompt)
    return reward_fn, metric_fn, train, evals, tokenizer, ds_config, ckpt


def check_metric_sinks(t: Any) -> None:
    import importlib.util

    if t.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb is true but the wandb package is not installed (pip install wandb)")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard is true but the tensorboard package is not installed (pip install tensorboard)")


def tensorboard_on(setting: bool | None) -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None if setting is None else setting


def check_causal_lm(model_path: str) -> None:
    """From config.json alone: refuse a model AutoModelForCausalLM cannot build, before loading weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = read_model_config(model_path).get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"model.model_path {model_path}: model type {model_type!r} is not a causal LM "
                          "(AutoModelForCausalLM cannot load it)")


def make_sampler(cfg: RFTRunConfig, learner: Any, tokenizer: Any, ds_config: dict, group: int,
                 stop_sequences: list[str]) -> tuple[Any, Any]:
    """The sampler for `sampler.backend`, and the WeightSync that feeds it (None when it samples from the
    training module itself)."""
    import torch

    if cfg.sampler.backend == "hf":
        from rft_ds.sampling.hf import HFSampler

        return HFSampler(learner.module, tokenizer, cfg.sampler.batch_size, stop_sequences, learner.device), None

    from rft_ds.sampling.vllm import VLLMSampler
    from rft_ds.weight_sync import WeightSync

    sp = cfg.sampler
    dtype = sp.dtype if sp.dtype != "auto" else "bfloat16" if ds_config.get("bf16", {}).get("enabled") else "float32"
    sampler = VLLMSampler(
        cfg.model.model_path, tokenizer, seed=_sample_seed(cfg.train.seed, -1, group, 2), dtype=dtype,
        max_model_len=sp.max_model_len or prompt_limit(cfg) + longest_generation(cfg),
        tensor_parallel_size=sp.tensor_parallel_size, gpu_memory_utilization=sp.gpu_memory_utilization,
        kv_cache_memory_bytes=sp.kv_cache_memory_bytes, enforce_eager=sp.enforce_eager,
        enable_sleep_mode=sp.enable_sleep_mode, stop_sequences=stop_sequences)
    return sampler, WeightSync(learner.module, sampler, sp.sync_bucket_mb, getattr(torch, dtype))


def run(cfg: RFTRunConfig, reward_fn: Callable | str | None = None, prompts: Any = None, eval_prompts: Any = None,
        metric_fn: Callable | str | None = None, stop_sequences: Sequence[str] | None = None) -> RFTResult:
    from rft_ds.faults import StopSignals

    # First thing: a SIGUSR1/SIGTERM during start-up would otherwise kill the rank (its default action).
    signals = StopSignals().install()
    # DeepSpeed calls torch.distributed functions torch has renamed; the warning, once per call site and
    # rank, is about DeepSpeed's code, not the user's, and buries the progress bars.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        return _run(cfg, reward_fn, prompts, eval_prompts, metric_fn, stop_sequences, signals)
    finally:
        signals.uninstall()


def _run(cfg: RFTRunConfig, reward_fn: Any, prompts: Any, eval_prompts: Any, metric_fn: Any,
         stop_sequences: Sequence[str] | None, signals: Any) -> RFTResult:
    from rft_ds import checkpoint
    from rft_ds.faults import maybe_die
    from rft_ds.learner import Learner
    from rft_ds.sampling.vllm import engine_group
    from rft_ds.weight_sync import check_stale_weights, parity_check

    reward_fn, metric_fn, train, evals, tokenizer, ds_config, ckpt = prepare(cfg, reward_fn, prompts, eval_prompts,
                                                                             metric_fn)
    stop_sequences = list(stop_sequences if stop_sequences is not None else cfg.reward.stop_sequences)
    m, sel, t = cfg.method, cfg.selection, cfg.train

    D.init(t.dist_backend, t.dist_timeout_s)
    rank, world, main = D.rank(), D.world_size(), D.is_main()
    # Ranks sharing one engine (tensor parallel) sample the same prompts; only the first contributes.
    group, n_groups, contributes = engine_group(rank, world, cfg.sampler.tensor_parallel_size
                                                if cfg.sampler.backend == "vllm" else 1)
    show = progress.enabled(t.progress, main)
    if cfg.reward.reward_model:
        from rft_ds.rewards import RewardModel

        r = cfg.reward
        with D.all_ranks_or_fail("loading reward.reward_model"):  # a rank that cannot load it stops them all
            reward_fn = RewardModel(r.reward_model, r.reward_model_batch_size, r.reward_model_max_length,
                                    r.reward_model_label)
    random.seed(t.seed)
    np.random.seed(t.seed)
    import torch

    torch.manual_seed(t.seed)
    out = Path(t.output_dir)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(_yaml_safe(cfg.to_dict()), sort_keys=False))

    learner = Learner(cfg.model.model_path, ds_config)
    sampler, weight_sync = make_sampler(cfg, learner, tokenizer, ds_config, group, stop_sequences)
    sp = cfg.sampler
    # bf16/fp16: the engine's logits are rounded to half precision, and one bf16 step of a logit near 32-64 is
    # 0.25, so a 30-layer model legitimately differs by ~0.1-0.2 (SmolLM2-135M: 0.04-0.12 measured)
    parity_tol = sp.parity_tolerance or (1e-3 if weight_sync and weight_sync.dtype == torch.float32 else 0.5)
    stale_tol = sp.stale_tolerance or (1e-3 if weight_sync and weight_sync.dtype == torch.float32 else 0.1)
    dropout = has_dropout(learner.module.config)  # the training forward is then noisy: the check only logs
    probes = train.records[: sp.parity_probes]
    pools = Pools(dedup=sel.dedup)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    eval_kwargs = {**m.gen_kwargs, **(t.eval_gen_kwargs or {})}
    digest_prompts = checkpoint.prompts_digest(train.texts, train.metadata)

    def evaluate(epoch: int) -> dict:
        return _evaluate(sampler, evals, reward_fn, metric_fn, tokenizer, eval_kwargs, stop_sequences,
                         _sample_seed(t.seed, epoch, group, 1), group, n_groups, contributes, cfg.reward.batch_size, show)

    def check_parity() -> float:
        return parity_check(learner.module, sampler, [r.token_ids for r in probes], min(8, m.gen_kwargs["max_new_tokens"]),
                            parity_tol, pad_id, [r.text for r in probes], learner.device)

    do_eval = evals is not None and t.eval_interval > 0

    def sinks(start_epoch: int) -> list:
        return open_sinks(out, tensorboard_on(t.tensorboard), t.wandb, t.wandb_project, t.wandb_run_name,
                          _yaml_safe(cfg.to_dict()), start_epoch) if main else []
    start, best = 0, None
    if ckpt is not None:
        # Resume: weights, optimizer, scheduler, RNG, pools and history exactly as they were after that epoch;
        # then the engine gets the restored weights (a sync, never the original model path) and is checked.
        state = checkpoint.load(ckpt, learner.engine)
        checkpoint.check_compatible(state, digest_prompts)
        pools.samples, eval_before, best = state["pools"], state["eval_before"], state["best"]
        start = state["epoch"] + 1
        log = MetricsLog(out, enabled=main, history=state["history"], sinks=sinks(start))
        if weight_sync:
            weight_sync.sync()
            if sp.parity_check != "off":
                diff = check_parity()
                if main:
                    print(f"[rft_ds] engine synced from the checkpoint; parity max |logprob diff| {diff:.2g}", flush=True)
        if main:
            print(f"[rft_ds] resumed from {ckpt} at epoch {start + 1}/{t.epochs}", flush=True)
    else:
        log = MetricsLog(out, enabled=main, sinks=sinks(0))
        eval_before = evaluate(-1) if do_eval else None
        if eval_before:
            log.log_initial_eval(eval_before)
        if main and eval_before:
            print(f"[rft_ds] eval before training: reward {eval_before['eval_reward_mean']:.4f}", flush=True)

    def save(epoch: int, rec: dict) -> None:
        state = {"epoch": epoch, "pools": pools.samples, "history": log.history + [plain(rec)], "eval_before": eval_before,
                 "best": best, "prompts_digest": digest_prompts, "config": cfg.to_dict(),
                 "schedule": dataclasses.asdict(schedule(epoch, m.start_percentile, m.end_percentile, m.n_improve_steps))}
        checkpoint.save(out / "checkpoints", epoch, learner.engine, state, tokenizer, t.keep_last, die_hook=maybe_die)

    stopped = False
    for epoch in range(start, t.epochs):
        step = schedule(epoch, m.start_percentile, m.end_percentile, m.n_improve_steps)
        rec: dict[str, Any] = {"epoch": epoch, "grow_step": step.grow, "percentile": step.percentile}
        t0 = time.perf_counter()

        # 1. Sample (grow steps only): this rank's shard of prompts, N completions each.
        n_sampled, time_score, fresh = 0, 0.0, {}
        if step.grow:
            maybe_die("sample", epoch)
            mine = [train.records[i] for i in shard(len(train.records), group, n_groups)]
            comps = sampler.generate([r.token_ids for r in mine], m.n_generations_per_prompt, m.gen_kwargs,
                                     _sample_seed(t.seed, epoch, group, 0), f"epoch {epoch + 1}: sample" if show else None,
                                     logprobs=weight_sync is not None)
            local = _to_samples(mine, comps) if contributes else Samples.empty()
            fresh = _sampled_logprobs(mine, comps) if contributes else {}
            t1 = time.perf_counter()
            # 2. Score this rank's completions, all-gather the global table, add it to the pools.
            table, _ = score_and_gather(reward_fn, local, train.texts, train.metadata, tokenizer, stop_sequences,
                                        cfg.reward.batch_size, f"epoch {epoch + 1}: score" if show else None)
            pools.add(table)
            n_sampled = len(table)
            if n_sampled:
                rec.update(sampled_reward_mean=float(table.score.mean()), sampled_reward_max=float(table.score.max()))
            time_score = time.perf_counter() - t1
        t2 = time.perf_counter()

        # 3. Select (pure, identical on every rank) and build training rows from token ids.
        pool = pools.samples
        keep, thr = select(pool.prompt_id, pool.score, step.percentile, sel.strategy, sel.top_k, sel.min_score)
        rows = []
        for i in np.flatnonzero(keep):
            row = build_row(train.records[pool.prompt_id[i]].token_ids, pool.tokens[i], bool(pool.eos[i]), eos_id,
                            t.max_seq_length)
            if row is not None:
                row.ref_logprobs = fresh.get((int(pool.prompt_id[i]), int(pool.digest[i])))  # sampled here, now
                rows.append(row)
        micro = plan_micro_batches(len(rows), t.seed, epoch, rank, world, learner.micro_batch_size, learner.grad_accum)
        digest = selection_digest(pool, keep)
        t3 = time.perf_counter()

        # 4. Train on this rank's share; every rank runs the same number of micro-batches.
        if weight_sync:
            sampler.sleep()  # GPU sleep mode: give the engine's memory to training (no-op otherwise)
        maybe_die("train", epoch)
        stats = learner.train_micro_batches(rows, micro, pad_id, show)
        t4 = time.perf_counter()

        # 5. Hand the trained weights to the engine, and prove it on probes (first sync, or always).
        if weight_sync:
            st = weight_sync.sync()
            rec.update(time_sync=st.seconds, sync_bytes=st.bytes, sync_peak_extra_mb=st.peak_extra_bytes / 2**20)
            if sp.parity_check == "always" or (sp.parity_check == "first" and weight_sync.n_syncs == 1):
                rec["parity_max_diff"] = check_parity()

        per_rank = D.all_gather_object((digest, len(micro), float(np.sum(stats.losses)), len(stats.losses)))
        if len({d for d, *_ in per_rank}) != 1 or len({s for _, s, *_ in per_rank}) != 1:
            raise D.RankError(f"epoch {epoch}: ranks disagree on the selection or step count: {per_rank}")
        n_loss = sum(c for *_, c in per_rank)
        if weight_sync and step.grow:  # 6. the engine sampled from the weights the learner trained from?
            rec.update(check_stale_weights(stats, stale_tol, enforce=not dropout))
        first = np.r_[True, pool.prompt_id[1:] != pool.prompt_id[:-1]] if len(pool) else np.zeros(0, bool)
        rec.update(
            n_sampled=n_sampled, pool_size=len(pool), n_selected=int(keep.sum()), n_rows=len(rows),
            n_prompts_kept=int(len(np.unique(pool.prompt_id[keep]))),
            reward_mean=float(pool.score.mean()) if len(pool) else None,
            reward_max=float(pool.score.max()) if len(pool) else None,
            selected_reward_mean=float(pool.score[keep].mean()) if keep.any() else None,
            threshold_mean=float(thr[first].mean()) if len(pool) else None,
            train_loss=sum(s for _, _, s, _ in per_rank) / n_loss if n_loss else None,
            train_steps=len(micro) // learner.grad_accum, train_steps_per_rank=[s // learner.grad_accum for _, s, *_ in per_rank],
            lr=learner.lr(), selection_digest=digest, selection_digest_per_rank=[d for d, *_ in per_rank],
            time_sample=(t1 - t0) if step.grow else 0.0, time_score=time_score, time_select=t3 - t2, time_train=t4 - t3,
        )

        # 6. Eval every eval_interval epochs and after the last.
        if do_eval and ((epoch + 1) % t.eval_interval == 0 or epoch == t.epochs - 1):
            t5 = time.perf_counter()
            rec.update(evaluate(epoch))
            rec["time_eval"] = time.perf_counter() - t5
            if t.save_best_model and (best is None or rec["eval_reward_mean"] > best["eval_reward_mean"]):
                best = {"epoch": epoch, "eval_reward_mean": rec["eval_reward_mean"]}
                learner.save_hf(out / "best_model", tokenizer, main)  # same decision on every rank: collective
        if epoch == 0 and eval_before:  # the eval before training, metric_fn's numbers included
            rec.update({f"{k}_initial": v for k, v in eval_before.items()})
        # 7. Checkpoint every save_interval epochs, after the last, and when asked to stop (SIGTERM/SIGUSR1).
        stopped = signals.requested() and epoch < t.epochs - 1
        if stopped or (t.save_interval and ((epoch + 1) % t.save_interval == 0 or epoch == t.epochs - 1)):
            t6 = time.perf_counter()
            save(epoch, rec)
            rec["time_checkpoint"] = time.perf_counter() - t6
        rec["time_epoch"] = time.perf_counter() - t0
        log.log(rec)
        if main:
            print("[rft_ds] " + format_epoch(log.history[-1], t.epochs), flush=True)
        if stopped:
            if main:
                print(f"[rft_ds] stop signal received: checkpointed after epoch {epoch + 1}; continue with --resume auto",
                      flush=True)
            break

    if t.save_final_model and not stopped:
        learner.save_hf(out / "final_model", tokenizer, main)
    log.close()
    if main and t.plots:
        _write_plots(out, log.history)
    return RFTResult(cfg, learner.engine, tokenizer, log.history, eval_before, out, stopped, ckpt)


def _write_plots(out: Path, history: list[dict]) -> None:
    """The run is done and saved: a plotting problem is reported, never fatal."""
    from rft_ds.plot import plot_run

    try:
        paths = plot_run(out, records=history)
        print(f"[rft_ds] plots: {paths[0].parent}/{{{','.join(p.stem for p in paths)}}}.png", flush=True)
    except Exception as e:  # noqa: BLE001 - e.g. matplotlib missing; metrics.jsonl has it all
        print(f"[rft_ds] plots skipped ({type(e).__name__}: {e}); python -m rft_ds.plot {out} draws them later",
              flush=True)


def has_dropout(model_config: Any) -> bool:
    """Any *dropout* probability > 0 in the model's config: its training forward is then random."""
    cfg = model_config.to_dict()
    cfg.update(cfg.get("text_config") or {})
    return any("dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in cfg.items())


def _sampled_logprobs(records: Sequence[PromptRecord], comps: Sequence[Sequence[Any]]) -> dict:
    """(prompt id, completion digest) -> the sampler's log p of its label tokens, for the stale-weight check.
    Local to this rank and this epoch: nothing crosses ranks."""
    from rft_ds.selection import completion_digest

    return {(r.id, completion_digest(c.token_ids, c.eos)): np.asarray(c.logprobs, dtype=np.float64)
            for r, cs in zip(records, comps) for c in cs if c.logprobs is not None}


def _to_samples(records: Sequence[PromptRecord], comps: Sequence[Sequence[Any]]) -> Samples:
    return Samples(prompt_id=[r.id for r, cs in zip(records, comps) for _ in cs],
                   score=np.zeros(sum(map(len, comps))), eos=[c.eos for cs in comps for c in cs],
                   tokens=[c.token_ids for cs in comps for c in cs])


def _evaluate(sampler: Any, evals: Prompts, reward_fn: Callable, metric_fn: Callable | None, tokenizer: Any,
              gen_kwargs: dict, stop_sequences: list[str], seed: int, group: int, n_groups: int,
              contributes: bool, batch_size: int | None = None, show: bool = False) -> dict:
    """One completion per eval prompt, scored sharded; metric_fn runs once, on rank 0, on all of them."""
    mine = [evals.records[i] for i in shard(len(evals.records), group, n_groups)]
    comps = sampler.generate([r.token_ids for r in mine], 1, gen_kwargs, seed, "eval: sample" if show else None)
    local = _to_samples(mine, comps) if contributes else Samples.empty()
    table, _ = score_and_gather(reward_fn, local, evals.texts, evals.metadata, tokenizer, stop_sequences, batch_size,
                                "eval: score" if show else None)
    result: dict[str, Any] = {"eval_reward_mean": float(table.score.mean())}
    if metric_fn is not None:
        extra = None
        with D.all_ranks_or_fail("metric_fn"):
            if D.is_main():
                pids = table.prompt_id.tolist()
                outputs = decode_outputs(tokenizer, table.tokens, stop_sequences)
                prompts = [evals.texts[p] for p in pids]
                meta = {k: [evals.metadata[p].get(k) for p in pids] for k in sorted({k for p in pids for k in evals.metadata[p]})}
                extra = metric_fn(samples=[p + o for p, o in zip(prompts, outputs)], prompts=prompts, outputs=outputs, **meta)
                if not isinstance(extra, dict):
                    raise RewardError(f"metric_fn must return a dict, got {type(extra).__name__}")
        extra = D.broadcast_object(extra)
        result.update({f"eval_{k}": v for k, v in extra.items()})
    return result


def _yaml_safe(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _yaml_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_yaml_safe(v) for v in d]
    return d if isinstance(d, (str, int, float, bool, type(None))) else repr(d)
