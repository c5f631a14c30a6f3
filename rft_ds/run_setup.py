"""What a run builds once, before its loop: `setup` (start-up checks, process group, resume target, reward
model, learner, sampler and weight sync) returns the `Setup` every stage reads, with `Runtime` for the parts
that change (method.restart_from_base builds the learner again). And what is derived from the setup alone: the
parity check of the engine against the learner, the replay set's digest, the eval context, the metric sinks."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from rft_ds import console, evaluation, progress
from rft_ds import distributed as D
from rft_ds.build import make_sampler, new_learner, tolerances
from rft_ds.config import EvalSet, RFTRunConfig, yaml_safe
from rft_ds.data import PromptSet
from rft_ds.evaluation import EvalData
from rft_ds.learner import training_dtype
from rft_ds.metrics import open_sinks
from rft_ds.preflight import (
    Inputs,
    check_resume_config,
    check_resume_groups,
    check_shared_output,
    prepare,
    ranks_per_engine,
    tensorboard_on,
)
from rft_ds.reward_terms import load_reward_models
from rft_ds.run_state import RunState


@dataclass
class Runtime:
    """What changes during a run but is never saved: the learner and the weight sync that reads its module
    (method.restart_from_base builds both again), and the clocks the safe points keep."""

    learner: Any
    weight_sync: Any  # None when the sampler is the training module itself (hf)
    started: float = field(default_factory=time.monotonic)
    last_safe_point: float = field(default_factory=time.monotonic)
    longest_step_s: float = 0.0  # the longest stretch between two safe points seen (for Slurm's deadline)
    last_save_at: float = field(default_factory=time.monotonic)
    last_save_s: float = 0.0  # the last checkpoint's seconds; before the first, an estimate (Slurm deadline)


@dataclass
class Setup:
    """What never changes during a run: config, data, reward, tokenizer, engine, where this rank stands.
    Built once by `setup`; `rt` holds the parts that do change."""

    cfg: RFTRunConfig
    rewards: list  # reward_terms.RewardTerm, in config order
    prompts: PromptSet  # the training prompts (their replay prompts in .replay)
    evals: list[EvalData]  # eval sets, in order (empty: no eval)
    best: tuple[EvalSet, str] | None  # what picks best_model/ (train.best_metric), None: no best_model/
    tokenizer: Any
    sampler: Any
    rt: Runtime
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
    job_end: float | None  # Slurm's end of the job (time.time()), when known
    universal: Path | None  # the resume checkpoint in DeepSpeed's universal form (another world size)
    ds_config: dict  # the filled DeepSpeed config the learner was built with
    max_len: int  # tokens a training row may hold (train.max_seq_length resolved)
    rollout: Any = None  # rollout.Rollout: multi-turn sampling (rollout.env / rollout.tools); None: single turns


def setup(
    cfg: RFTRunConfig, inputs: Inputs, stop_sequences: Sequence[str] | None, signals: Any
) -> tuple[Setup, Path | None]:
    """Start-up checks (preflight.prepare: no model yet) -> process group -> resume target agreed -> reward
    model -> learner (DeepSpeed ZeRO-3) -> sampler and weight sync. Returns the setup and the checkpoint to
    resume from."""
    import torch

    from rft_ds import checkpoint
    from rft_ds.sampling.vllm import engine_group
    from rft_ds.slurm import job_end_time

    p = prepare(cfg, inputs)
    t = cfg.train
    D.init(t.dist_backend, t.dist_timeout_s)
    check_shared_output(Path(t.output_dir), wait_s=min(30.0, t.dist_timeout_s / 4))
    with D.all_ranks_or_fail("reading data.prompts"):  # one pass over the whole set, on rank 0, before any model
        digest = p.prompts.digest() if D.is_main() else None
    digest = D.broadcast_object(digest)
    # Resolved once, after the process group exists: rank 0 picks, every rank checks its own files, all agree.
    ckpt = checkpoint.agree_on_resume(t.resume, t.output_dir, D.world_size())
    check_resume_config(ckpt, cfg)  # again: a fallback may have picked an older checkpoint than prepare saw
    check_resume_groups(ckpt, cfg, D.world_size())
    universal, ds_config = None, p.ds_config
    if ckpt is not None and checkpoint.written_by(ckpt) != D.world_size():  # elastic resume
        universal = checkpoint.universal_copy(ckpt)
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    group, n_groups, contributes = engine_group(D.rank(), D.world_size(), ranks_per_engine(cfg))
    if any(r.reward_model for r in p.rewards):
        with D.all_ranks_or_fail("loading the reward model"):  # a rank that cannot load it stops them all
            load_reward_models(p.rewards)  # eval sets without their own reward_fn share these terms
    random.seed(t.seed)  # the training RNG's start; a resume replaces it with the checkpoint's, nothing re-seeds it
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    out = Path(t.output_dir)
    if D.is_main():
        (out / "config.yaml").write_text(yaml.safe_dump(yaml_safe(cfg.to_dict()), sort_keys=False))
    learner = new_learner(cfg, ds_config, p.max_len)
    if t.share_prompt and not learner.share_prompt and D.is_main():
        console.say(
            f"[rft_ds] note: train.share_prompt is off for this model ({learner.share_prompt_off}): "
            "rows train one by one"
        )
    sampler, weight_sync = make_sampler(
        cfg,
        learner,
        p.tokenizer,
        ds_config,
        group,
        list(stop_sequences if stop_sequences is not None else cfg.reward.stop_sequences),
    )
    engine = weight_sync.dtype if weight_sync else None
    parity_tol, stale_tol = tolerances(
        engine, training_dtype(ds_config), cfg.sampler.parity_tolerance, cfg.sampler.stale_tolerance
    )
    job_end = D.broadcast_object(job_end_time(os.environ) if D.is_main() else None)
    rt = Runtime(learner, weight_sync)
    if job_end is not None:  # the deadline's first save: measured here, not 0 s (every rank probes, at once)
        est = checkpoint.save_time_estimate(out / "checkpoints", checkpoint.own_bytes(learner.engine))
        rt.last_save_s = float(D.all_reduce(torch.tensor([est]), "max").item())
    s = Setup(
        cfg,
        p.rewards,
        p.prompts,
        p.evals,
        p.best,
        p.tokenizer,
        sampler,
        rt,
        signals,
        out,
        sampler.stop_sequences,
        group,
        n_groups,
        contributes,
        progress.enabled(t.progress, D.is_main()),
        parity_tol=parity_tol,
        stale_tol=stale_tol,
        prompts_digest=digest,
        job_end=job_end,
        universal=universal,
        ds_config=ds_config,
        max_len=p.max_len,
        rollout=_rollout(cfg, p),
    )
    return s, ckpt


def _rollout(cfg: RFTRunConfig, p: Any) -> Any:
    """The multi-turn sampler around the engine, when rollout.env or rollout.tools is set."""
    if p.rollout is None:
        return None
    from rft_ds.data import use_chat_template
    from rft_ds.rollout import Rollout

    chat = use_chat_template(p.tokenizer, cfg.data.apply_chat_template)
    return Rollout(p.rollout, p.tokenizer, chat, cfg.data.system_prompt, p.tokenizer.eos_token_id)


def restart_from_base(s: Setup) -> None:
    """Collective: the learner is rebuilt from model.model_path (weights, optimizer state and LR schedule
    as at the start), and what holds its module follows (the weight sync, or the HF sampler). The vLLM
    engine keeps the latest policy until the next sync; pools and the run state are untouched. Nothing
    holds the old module when it is released, and a sleeping engine (GPU sleep mode) is asleep first, so
    the peak is the start of a run's, not two models."""
    rt = s.rt
    dtype = rt.weight_sync.dtype if rt.weight_sync is not None else None
    if rt.weight_sync is not None:
        s.sampler.sleep()  # no-op without sleep mode; the next sync wakes it
        rt.weight_sync = None
    else:
        s.sampler.module = None
    rt.learner.close()
    rt.learner = new_learner(s.cfg, s.ds_config, s.max_len)
    if dtype is not None:
        from rft_ds.weight_sync import WeightSync

        rt.weight_sync = WeightSync(rt.learner.module, s.sampler, s.cfg.sampler.sync_bucket_mb, dtype)
    else:
        s.sampler.module = rt.learner.module


def check_parity(s: Setup) -> float:
    from rft_ds.weight_sync import parity_check

    probes = s.prompts.records[: s.cfg.sampler.parity_probes]
    return parity_check(
        s.rt.learner.module,
        s.sampler,
        [r.token_ids for r in probes],
        min(8, s.cfg.method.gen_kwargs["max_new_tokens"]),
        s.parity_tol,
        s.tokenizer.pad_token_id,
        [r.text for r in probes],
        s.rt.learner.device,
    )


def replay_digest(s: Setup) -> str:
    """What the replay set's answers were sampled for: a resume must find the same prompts at the same places."""
    from rft_ds.checkpoint import prompts_digest

    return prompts_digest(s.prompts.replay.texts, [])


def eval_context(s: Setup, st: RunState) -> evaluation.EvalContext:
    return evaluation.EvalContext(
        s.sampler,
        s.tokenizer,
        s.stop_sequences,
        s.cfg.reward,
        s.cfg.train.seed,
        st.shard,
        s.group,
        s.n_groups,
        s.contributes,
        s.show,
        s.rollout,
        s.cfg.rollout.failed_score,
    )


def sinks(s: Setup, start_epoch: int) -> list:
    t = s.cfg.train
    return (
        open_sinks(
            s.out,
            tensorboard_on(t.tensorboard),
            t.wandb,
            t.wandb_project,
            t.wandb_run_name,
            yaml_safe(s.cfg.to_dict()),
            start_epoch,
        )
        if D.is_main()
        else []
    )
