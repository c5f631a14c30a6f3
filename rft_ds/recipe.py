"""The RFT recipe: one epoch loop over an explicit run state, readable top to bottom.

    sample (grow steps) -> score on each rank -> all-gather scores and ids -> select (pure) -> rows where the
    tokens are, a few moved to balance -> train -> sync -> eval -> end of the epoch

The loop reads the order of the stages from run_state.STAGES; each stage function does its work and returns
an Outcome, and between two stages is a safe point (a checkpoint when a stop, a periodic save or Slurm's end
asks for one). Every rank runs every line. The table that selection sees is identical on every rank, so
selection is too, and the check after each epoch proves it (a digest per rank) instead of assuming it. Token
ids stay on the rank that sampled them (its pool shard); only the rows a balancing plan moves cross ranks.

What runs before the loop lives beside it: the start-up checks in preflight.py (shared with `rft-ds check`),
what is built from the config in build.py and put together by run_setup.py (the Setup every stage reads),
where the run state comes from and goes in state_io.py (a fresh start, a resume, a checkpoint), the eval
driver in evaluation.py, best and final models in artifacts.py.
"""

from __future__ import annotations

import enum
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rft_ds import artifacts, console, evaluation, progress, replay, run_setup
from rft_ds import distributed as D
from rft_ds.config import RFTRunConfig, pass_threshold
from rft_ds.data import deal_prompts
from rft_ds.evaluation import best_key
from rft_ds.experience import (
    Row,
    build_row,
    label_tokens,
    micro_batch_tokens,
    num_steps,
    padded_tokens,
    plan_micro_batches,
    prompt_groups,
    rows_for_rank,
)
from rft_ds.faults import maybe_die
from rft_ds.learner import TrainStats, checkpoint_plan
from rft_ds.metrics import MetricsLog, format_epoch, memory_gb, plain
from rft_ds.preflight import Inputs
from rft_ds.prompt_draw import SkipRules, draw, new_history, skipped, update_history
from rft_ds.run_setup import Setup, check_parity, eval_context, setup, sinks
from rft_ds.run_state import STAGES, RunState, advance
from rft_ds.samples import Samples, pick_probes, sample_seed
from rft_ds.scoring import gather_new_rows, rollout_means, score_samples, term_means
from rft_ds.selection import (
    parse_pool_policy,
    schedule,
    select_epoch,
    selection_digest,
    solved_prompts,
    truncated,
    update_pool,
)
from rft_ds.state_io import load_checkpoint, save_checkpoint, start_fresh
from rft_ds.weight_sync import check_stale_weights


class Outcome(enum.Enum):
    DONE = "done"  # the stage finished: the loop moves to the next one
    STOPPED = "stopped"  # a safe point checkpointed for a stop (signal, Slurm's end): the run ends here


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


def run(
    cfg: RFTRunConfig,
    reward_fn: Callable | str | None = None,
    prompts: Any = None,
    eval_prompts: Any = None,
    metric_fn: Callable | str | None = None,
    stop_sequences: Sequence[str] | None = None,
) -> RFTResult:
    from rft_ds.faults import SIGNALS

    # First thing (unless launch/train.py did it before its imports): a SIGUSR1/SIGTERM during start-up would
    # otherwise kill the rank (its default action).
    installed_here = not SIGNALS.installed
    SIGNALS.install()
    # DeepSpeed calls torch.distributed functions torch has renamed; the warning, once per call site and
    # rank, is about DeepSpeed's code, not the user's, and buries the progress bars.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        # a rank's error that leaves the others inside a collective (a training step's) ends them in seconds
        with D.failing_together():
            return _run(cfg, Inputs(reward_fn, prompts, eval_prompts, metric_fn), stop_sequences, SIGNALS)
    finally:
        if installed_here:
            SIGNALS.uninstall()


def _run(cfg: RFTRunConfig, inputs: Inputs, stop_sequences: Sequence[str] | None, signals: Any) -> RFTResult:
    """The recipe: set up, restore or start the run state, then the loop over the stages."""
    maybe_die("start", 0)
    s, ckpt = setup(cfg, inputs, stop_sequences, signals)
    t = cfg.train
    st = load_checkpoint(s, ckpt) if ckpt is not None else start_fresh(s)
    log = MetricsLog(s.out, enabled=D.is_main(), history=st.history, sinks=sinks(s, len(st.history)))
    if ckpt is None and st.eval_before:
        log.log_initial_eval(st.eval_before)
    if st.epoch >= t.epochs and D.is_main():  # a finished run resumed with nothing left to do: say so
        console.say(
            f"[rft_ds] {ckpt} is the end of epoch {st.epoch}: nothing left to train for train.epochs={t.epochs} "
            "(raise train.epochs to continue)"
        )
    stopped = False
    s.rt.last_safe_point = time.monotonic()
    while st.epoch < t.epochs and not stopped:
        stage = st.stage
        if STAGE_FNS[stage](s, st) is Outcome.STOPPED:
            stopped = True
            break
        advance(st)  # the next stage in STAGES; after "end", the next epoch
        # between two stages: a safe point; an epoch's end also checkpoints every save_interval epochs and after
        # the last. After the last there is no safe point: a stop asked for then ends nothing, the run is done.
        due = stage == "end" and bool(t.save_interval) and (st.epoch % t.save_interval == 0 or st.epoch == t.epochs)
        if st.epoch < t.epochs:
            stopped = safe_point(s, st, save=due) is Outcome.STOPPED
        elif due:
            save_checkpoint(s, st)
        if stage == "end":
            log.log(st.history[-1])
            if D.is_main():
                console.say("[rft_ds] " + format_epoch(st.history[-1], t.epochs, _shown_metric(s)))
    if stopped and D.is_main():
        why = "stop signal received" if signals.received is not None else "the Slurm job ends soon"
        console.say(f"[rft_ds] {why}: checkpointed in epoch {st.epoch + 1} ({st.stage}); continue with --resume auto")
    if t.save_final_model and not stopped:
        artifacts.save_final(s.rt.learner, s.out, s.tokenizer)
    log.close()
    if D.is_main() and t.plots:
        artifacts.write_plots(s.out, log.history)
    return RFTResult(cfg, s.rt.learner.engine, s.tokenizer, log.history, st.eval_before, s.out, stopped, ckpt)


# --- the stages: each takes (setup, state), changes the state fields its docstring names, returns an Outcome


def sample(s: Setup, st: RunState) -> Outcome:
    """Grow steps: N completions for each of this rank's prompts, one chunk of prompts at a time, each chunk
    seeded on its own so a run stopped between chunks samples the rest exactly as it would have.
    Changes st.local["samples"] (samples.Samples: compact arrays), st.cursor, st.record["time_sample"] (and
    "sampled_preemptions" with vLLM)."""
    if not _step(s, st).grow:
        return Outcome.DONE
    m, chunk = s.cfg.method, s.cfg.sampler.chunk_prompts
    if st.cursor == 0:  # the grow step's prompts (before its first chunk, so a resume here draws them again)
        s.prompts.forget()
        _draw(s, st)
    mine = _my_prompts(s, st)
    n_chunks = _n_chunks(s, st)
    done = st.local.setdefault("samples", Samples())
    while st.cursor < n_chunks:
        maybe_die("sample", st.epoch)
        t0 = time.perf_counter()
        with D.all_ranks_or_fail("reading data.prompts"):  # a bad record (found when drawn) stops every rank
            part = s.prompts.load(mine[st.cursor * chunk : (st.cursor + 1) * chunk])
        label = f"epoch {st.epoch + 1}: sample" + (f" {st.cursor + 1}/{n_chunks}" if n_chunks > 1 else "")
        # the sampler's log-probs for a few prompts of the first chunk: the stale-weight check's probes
        probes = np.zeros(len(part), bool)
        if s.rt.weight_sync is not None and st.cursor == 0:  # every rank of an engine group asks alike
            probes[pick_probes(len(part), s.cfg.sampler.stale_probes, s.cfg.train.seed, st.epoch, s.group)] = True
        seed = sample_seed(s.cfg.train.seed, st.epoch, s.group, 0, st.cursor)
        with D.all_ranks_or_fail("sampling"):  # an engine's error on one rank stops every rank, now
            maybe_die("generate", st.epoch)
            if s.rollout is not None:  # multi-turn: one sampler call per turn on every rank, whatever it holds
                out = s.rollout.generate(
                    s.sampler, part, m.n_generations_per_prompt, m.gen_kwargs, seed, label if s.show else None, probes
                )
                _say_rollout_errors(s, st)
            else:
                out = (
                    s.sampler.generate(
                        [r.token_ids for r in part],
                        m.n_generations_per_prompt,
                        m.gen_kwargs,
                        seed,
                        label if s.show else None,
                        logprobs=probes,
                    )
                    if part
                    else []
                )  # the skip rules left this rank nothing to sample
        done.add(st.cursor * chunk, out)
        if s.cfg.sampler.backend == "vllm":  # this rank's engine only (no collective): rank 0's in metrics.jsonl
            st.record["sampled_preemptions"] = st.record.get("sampled_preemptions", 0) + s.sampler.last_preemptions
        st.cursor += 1
        _add_time(st.record, "time_sample", time.perf_counter() - t0)
        if safe_point(s, st) is Outcome.STOPPED:
            return Outcome.STOPPED
    return Outcome.DONE


def score(s: Setup, st: RunState) -> Outcome:
    """Grow steps: score this rank's completions, take them into its pool shard, all-gather their table rows
    (scores and ids, 25 bytes each) and update the pools by method.pool.
    Changes st.pool, st.table, st.local (samples -> probes), st.record."""
    m, rec = s.cfg.method, st.record
    rec.setdefault("n_sampled", 0)
    if not _step(s, st).grow:
        return Outcome.DONE
    maybe_die("score", st.epoch)
    t0 = time.perf_counter()
    samples = st.local.pop("samples", None)  # a tensor-parallel peer drops its copy: its leader scores them
    samples = samples if samples is not None and s.contributes else Samples()
    pids = _my_prompts(s, st)[samples.prompt]
    tokens, eos = samples.tokens(), samples.eos
    # the stale-weight check's probes outlive the samples until the first optimizer step: a few rows
    st.local["probes"] = [(int(pids[i]), tokens[i].copy(), bool(eos[i]), lp) for i, lp in samples.probes.items()]
    label = f"epoch {st.epoch + 1}: score" if s.show else None
    # trajectories: the environment's rewards, the reward terms on the final turns where it gave none
    env_reward = None if s.rollout is None else samples.reward if samples.reward is not None else np.zeros(0)
    scores, _, parts = score_samples(
        s.rewards,
        pids,
        tokens,
        s.prompts.texts,
        s.prompts.metadata,
        s.tokenizer,
        s.stop_sequences,
        s.cfg.reward,
        label,
        env_reward,
        s.cfg.rollout.failed_score,
    )
    if s.rollout is not None:
        rec.update(rollout_means(samples.stats, sum(int((t >= 0).sum()) for t in tokens)))
    rec.update({f"sampled_{k}": v for k, v in term_means(s.rewards, parts).items()})
    grow_step = st.epoch // m.n_improve_steps
    mine = st.pool.add(pids, scores, eos, tokens, grow_step)
    del samples, tokens  # the pool shard holds its own copy of what it keeps
    new = gather_new_rows(mine, grow_step)
    st.table = update_pool(st.table, new, grow_step, parse_pool_policy(m.pool), s.cfg.selection.dedup)
    st.pool.keep_only(st.table)
    # the tokens the model sampled (a trajectory's prompt and environment text, stored with it, are not)
    rec["n_sampled"] = len(new)
    rec["sampled_tokens"] = rec.pop("rollout_model_tokens") if s.rollout is not None else int(new["length"].sum())
    if st.prompt_history is not None:  # the skip rules' history: every rank's samples, the same on every rank
        st.prompt_history = update_history(
            st.prompt_history, new["prompt_id"], new["score"], pass_threshold(s.cfg), grow_step
        )
        # what the skipped prompts would have cost at this grow step's mean completion length
        per_sample = rec["sampled_tokens"] / len(new) if len(new) else 0.0
        skipped = rec.get("prompts_skipped_solved", 0) + rec.get("prompts_skipped_hopeless", 0)
        rec["sampled_tokens_saved"] = int(skipped * m.n_generations_per_prompt * per_sample)
    # cut by max_new_tokens, without an end: kept or never selected (method.overlong), counted either way; a
    # trajectory's cuts (a turn, max_turns, max_tokens) are the rollout stats' (rollout_truncated)
    if s.rollout is not None:
        rec["truncated_share"] = rec["rollout_truncated"] / len(new) if len(new) else 0.0
    else:
        rec["truncated_share"] = float(truncated(new, m.gen_kwargs["max_new_tokens"]).mean()) if len(new) else 0.0
    if len(new):
        rec.update(sampled_reward_mean=float(new["score"].mean()), sampled_reward_max=float(new["score"].max()))
    rec["time_score"] = time.perf_counter() - t0
    return Outcome.DONE


def learn(s: Setup, st: RunState) -> Outcome:
    """Select (pure, the same on every rank), build rows where the tokens are (a balancing plan moves the
    surplus), and train on this rank's rows, one optimizer step at a time (a safe point after each). Every
    rank runs the same number of steps. Changes st.cursor, st.optimizer_steps, st.local["stats"] (losses,
    stale-check sums), st.record."""
    import torch

    t, sel, step = s.cfg.train, s.cfg.selection, _step(s, st)
    if s.cfg.method.restart_from_base and step.grow and st.epoch > 0 and st.cursor == 0:
        # ReST-EM: this grow step's selection trains from the base weights, with a fresh optimizer
        t0 = time.perf_counter()
        run_setup.restart_from_base(s)
        st.record.update(restarted_from_base=True, time_restart=time.perf_counter() - t0)
    restarted = bool(st.record.get("restarted_from_base"))  # also when resumed inside this epoch's training
    learner = s.rt.learner
    t0 = time.perf_counter()
    table = st.table  # the pools: one row per completion, the same on every rank
    m = s.cfg.method
    cut = m.gen_kwargs["max_new_tokens"] if m.overlong == "drop" else None  # method.overlong: drop leaves them out
    solved_at = pass_threshold(s.cfg) if sel.drop_solved else None  # selection.drop_solved: reject both ends
    keep, threshold_mean = select_epoch(
        table, step.percentile, sel.strategy, sel.top_k, sel.min_score, m.max_per_prompt, cut, solved_at
    )
    if s.rt.weight_sync:
        # GPU sleep mode (no-op otherwise): the engine's memory goes to training, and first to the row exchange's
        # buffers (under tensor parallelism vLLM holds a large share of the GPU until it sleeps)
        s.sampler.sleep()
    if s.rollout is None:
        _announce_lengths(s, table[keep])
    rows, n_rows, moved = rows_for_rank(
        table[keep],
        st.pool,
        s.prompts.token_ids if s.rollout is None else NO_PROMPTS,  # a trajectory holds its own prompt
        s.tokenizer.eos_token_id,
        s.max_len,
        t.sequence_parallel,
        s.prompts.lengths if s.rollout is None else np.zeros(len(s.prompts), np.int64),
    )
    sp = t.sequence_parallel  # a group of sp ranks trains the same rows, each on its shard of their positions
    n_replay = 0
    if st.replay is not None:  # method.replay_share of the epoch's rows: the base model's answers
        extra, n_replay = _replay_rows(s, st, n_rows, len(rows))
        rows += extra
    steps = num_steps(n_rows + n_replay, D.world_size() // sp, learner.micro_batch_size, learner.grad_accum)
    micro = plan_micro_batches(
        len(rows),
        steps,
        t.seed,
        st.epoch,
        D.rank() // sp,
        learner.micro_batch_size,
        learner.grad_accum,
        [len(r.input_ids) for r in rows] if st.group_by_length else None,
        prompt_groups(rows) if st.share_prompt else None,
    )
    # the epoch's whole plan: the same after a resume
    st.local["padding"] = padded_tokens(rows, micro, learner.pack)
    st.record.update(
        pool_size=len(table),
        n_selected=int(keep.sum()),
        n_rows=n_rows,
        rows_moved=moved,
        replay_rows=n_replay,
        n_prompts_kept=int(len(np.unique(table["prompt_id"][keep]))),
        reward_mean=float(table["score"].mean()) if len(table) else None,
        reward_max=float(table["score"].max()) if len(table) else None,
        selected_reward_mean=float(table["score"][keep].mean()) if keep.any() else None,
        threshold_mean=threshold_mean,
        rows_not_fitting=int(keep.sum()) - n_rows,  # selected, but longer than a row may be (resume_force)
        train_steps=steps,
        selection_digest=selection_digest(table, keep),
    )
    if solved_at is not None:
        st.record["prompts_dropped_solved"] = len(
            np.unique(table["prompt_id"][solved_prompts(table["prompt_id"], table["score"], solved_at)])
        )
    _add_time(st.record, "time_select", time.perf_counter() - t0)
    # what each optimizer step's loss is averaged over: its label tokens on every rank (one all_reduce; a
    # sequence-parallel group's ranks each count the group's rows)
    step_tokens = (D.all_reduce(torch.from_numpy(label_tokens(rows, micro, learner.grad_accum)), "sum") // sp).tolist()
    # gradient checkpointing where a micro-batch is long on any rank (the same choice on every rank); a rank
    # computes 1/sp of its group's positions
    checkpoint = checkpoint_plan(
        D.all_reduce(torch.from_numpy(-(-micro_batch_tokens(rows, micro, learner.pack) // sp)), "max").tolist(),
        learner.checkpoint_above,
    )
    stats = st.local.setdefault("stats", TrainStats())
    if s.rt.weight_sync and step.grow and st.cursor == 0 and not restarted:
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
        one = learner.train_step(
            rows,
            micro[st.cursor : upto],
            s.tokenizer.pad_token_id,
            step_tokens[st.cursor // learner.grad_accum],
            D.world_size(),
            checkpoint=checkpoint[st.cursor : upto],
        )
        stats.add(one)
        pbar.update(upto - st.cursor)
        # refreshed every step: update() alone redraws at most every 0.1 s, and a leave=False bar is erased
        # on close, so a run of fast steps would never show its loss
        pbar.set_postfix(loss=f"{one.losses[-1]:.4f}", refresh=True)
        st.cursor, st.optimizer_steps = upto, st.optimizer_steps + 1
        _add_time(st.record, "time_train", time.perf_counter() - t1)
        if safe_point(s, st) is Outcome.STOPPED:
            pbar.close()
            return Outcome.STOPPED
    pbar.close()
    st.record.setdefault("time_train", 0.0)
    _finish_train_record(s, st, step.grow, len(micro))
    return Outcome.DONE


def sync(s: Setup, st: RunState) -> Outcome:
    """Hand the trained weights to the engine and prove it on probes (first sync of a run, or always).
    Changes st.record."""
    if s.rt.weight_sync:
        maybe_die("sync", st.epoch)
        stats = s.rt.weight_sync.sync()
        st.record.update(
            time_sync=stats.seconds, sync_bytes=stats.bytes, sync_peak_extra_mb=stats.peak_extra_bytes / 2**20
        )
        check = s.cfg.sampler.parity_check
        if check == "always" or (check == "first" and s.rt.weight_sync.n_syncs == 1):
            st.record["parity_max_diff"] = check_parity(s)
    return Outcome.DONE


def evaluate(s: Setup, st: RunState) -> Outcome:
    """Every eval_interval epochs and after the last: eval, and best_model/ when it improved.
    Changes st.record, st.best."""
    t, rec = s.cfg.train, st.record
    if s.evals and t.eval_interval > 0 and ((st.epoch + 1) % t.eval_interval == 0 or st.epoch == t.epochs - 1):
        t0 = time.perf_counter()
        rec.update(evaluation.evaluate(s.evals, eval_context(s, st), st.epoch))
        rec["time_eval"] = time.perf_counter() - t0
        if s.best is not None:
            key = best_key(s.best, rec)
            if st.best is None or rec[key] > st.best["value"]:
                st.best = {"epoch": st.epoch, "metric": key, "value": rec[key], "run_id": st.run_id}
                artifacts.save_best(s.rt.learner, s.out, s.tokenizer, st.best)
    return Outcome.DONE


def end_epoch(s: Setup, st: RunState) -> Outcome:
    """Close the epoch's record: its totals, its memory, into st.history (the loop then checkpoints when one
    is due and logs it). Changes st.history."""
    step = _step(s, st)
    rec = {
        "epoch": st.epoch,
        "grow_step": step.grow,
        "percentile": step.percentile,
        **dict.fromkeys(("time_sample", "time_score", "time_select", "time_train"), 0.0),
        **st.record,
    }
    if st.epoch == 0 and st.eval_before:  # the eval before training, metric_fn's numbers included
        rec.update({f"{k}_initial": v for k, v in st.eval_before.items()})
    rec["time_epoch"] = sum(v for k, v in rec.items() if k.startswith("time_") and k != "time_epoch")
    # the figure peers compare: tokens sampled and trained per second and device, over the epoch's wall time
    rec["tokens_per_s_per_device"] = (
        (rec.get("sampled_tokens", 0) + rec.get("trained_tokens", 0)) / max(rec["time_epoch"], 1e-9) / D.world_size()
    )
    rec.update(memory_gb())
    st.history.append(plain(rec))
    return Outcome.DONE


STAGE_FNS: dict[str, Callable[[Setup, RunState], Outcome]] = {
    "sample": sample,
    "score": score,
    "train": learn,
    "sync": sync,
    "eval": evaluate,
    "end": end_epoch,
}
assert tuple(STAGE_FNS) == STAGES


# --- safe points and the run state on disk


def safe_point(s: Setup, st: RunState, save: bool = False) -> Outcome:
    """Collective, at a point where a checkpoint can be taken (between sampling chunks, optimizer steps and
    stages). Saves when a rank got a stop signal, when a periodic save is due (train.save_every_steps /
    save_every_minutes) or `save` asks, or before Slurm ends the job; STOPPED when the run must stop. One
    all_reduce of two flags."""
    import torch

    t, rt = s.cfg.train, s.rt
    now = time.monotonic()
    rt.longest_step_s = max(rt.longest_step_s, now - rt.last_safe_point)
    periodic = (
        save
        or bool(
            t.save_every_steps and st.stage == "train" and st.cursor and st.optimizer_steps % t.save_every_steps == 0
        )
        or bool(t.save_every_minutes and now - rt.last_save_at >= 60 * t.save_every_minutes)
    )
    deadline = s.job_end is not None and deadline_reached(
        time.time(), s.job_end, rt.longest_step_s, rt.last_save_s, t.save_before_end_s
    )
    stop_flag, save_flag = D.all_reduce(
        torch.tensor([int(s.signals.received is not None or deadline), int(periodic)]), "max"
    ).tolist()
    if stop_flag or save_flag:
        save_checkpoint(s, st)
        if deadline and D.is_main():
            console.say("[rft_ds] the Slurm job ends soon: checkpointed and stopping (exit 3: requeue to continue)")
    rt.last_safe_point = time.monotonic()
    return Outcome.STOPPED if stop_flag else Outcome.DONE


def deadline_reached(now: float, job_end: float, longest_step_s: float, last_save_s: float, margin_s: float) -> bool:
    """Save and stop now if waiting for one more step and then saving could run past the job's end."""
    return now + longest_step_s + last_save_s + margin_s >= job_end


# --- helpers of the stages


def _finish_train_record(s: Setup, st: RunState, grow: bool, n_micro: int) -> None:
    """Every rank ran the same steps on the same selection (checked, not assumed); the loss is the mean over
    every label token the epoch trained on; the stale-weight check's verdict (grow steps with an engine)."""
    stats = st.local["stats"]
    per_rank = D.all_gather_object(
        (
            st.record["selection_digest"] + _draw_digest(st),
            n_micro,
            stats.ce_sum,
            stats.tokens,
            stats.input_tokens,
            st.local.get("padding", (0, 0)),
        )
    )
    st.record["checkpointed_micro_batches"] = stats.checkpointed  # the same on every rank (checkpoint_plan)
    if len({d for d, *_ in per_rank}) != 1 or len({n for _, n, *_ in per_rank}) != 1:
        raise D.RankError(
            f"epoch {st.epoch}: ranks disagree on the selection, the prompt draw or the step count: {per_rank}"
        )
    n_loss = sum(c for _, _, _, c, _, _ in per_rank)
    real, padded = (sum(p[i] for *_, p in per_rank) // s.cfg.train.sequence_parallel for i in (0, 1))
    st.record.update(
        train_loss=sum(x for _, _, x, _, _, _ in per_rank) / n_loss if n_loss else None,
        trained_tokens=sum(t for *_, t, _ in per_rank),
        computed_tokens=real,
        padding_share=1 - real / padded if padded else 0.0,
        train_steps_per_rank=[n // s.rt.learner.grad_accum for _, n, *_ in per_rank],
        lr=s.rt.learner.lr(),
        selection_digest_per_rank=[d for d, *_ in per_rank],
    )
    if s.rt.weight_sync and grow and not st.record.get("restarted_from_base"):  # did the engine sample from the
        # weights the learner trained from? (after a restart it did not, by design: it sampled the latest policy)
        st.record.update(check_stale_weights(stats, s.stale_tol))  # probes run in eval mode: no dropout


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
    prompts = s.prompts.replay.records
    rows = [
        build_row(prompts[rp["prompt"][i]].token_ids, tokens, bool(rp["eos"][i]), s.tokenizer.eos_token_id, s.max_len)
        for i, tokens in zip(mine, replay.completions(rp, mine))
    ]
    return [r for r in rows if r is not None], len(picks)


def _probe_rows(s: Setup, st: RunState) -> list[Row]:
    """The stale-weight check's probes as rows, each with the sampler's log p of its completion (and EOS)."""
    rows = []
    for pid, tokens, eos, logprobs in st.local.get("probes", []):
        prompt = s.prompts.records[pid].token_ids if s.rollout is None else ()  # a trajectory holds its prompt
        row = build_row(prompt, tokens, eos, s.tokenizer.eos_token_id, s.max_len)
        if row is not None:  # an empty completion without EOS has no label
            row.ref_logprobs = logprobs
            rows.append(row)
    return rows


class _NoPrompts:
    """rows_for_rank's prompts for trajectories: each row's prompt is in its own tokens (rollout.py)."""

    def __getitem__(self, pid: int) -> tuple:
        return ()


NO_PROMPTS = _NoPrompts()


def _say_rollout_errors(s: Setup, st: RunState) -> None:
    """Rank 0: the first rollout failure of the epoch in one line (all of them are counted in the metrics)."""
    if s.rollout.errors and D.is_main() and st.local.get("rollout_said") != st.epoch:
        st.local["rollout_said"] = st.epoch
        console.say(
            f"[rft_ds] epoch {st.epoch + 1}: a trajectory failed ({s.rollout.errors[0]}); failures are scored "
            f"rollout.failed_score and counted (rollout_failed)"
        )


def _step(s: Setup, st: RunState) -> Any:
    """This epoch's place in the schedule: a grow step or not, and its percentile."""
    m = s.cfg.method
    return schedule(st.epoch, m.start_percentile, m.end_percentile, m.n_improve_steps)


def _draw(s: Setup, st: RunState) -> None:
    """The grow step's prompts (prompt_draw.draw): data.prompts_per_grow_step of them from the seeded pass, or
    all, minus what the skip rules leave out. Pure over the shared state: the same on every rank.
    Changes st.drawn, st.draw_pass, st.draw_offset, st.prompt_history (created), st.record."""
    m, n = s.cfg.method, len(s.prompts)
    rules = SkipRules(m.skip_solved, m.skip_hopeless, m.skip_retry_after)
    budget = s.cfg.data.prompts_per_grow_step
    if not rules.active and budget is None:
        st.drawn = None  # every prompt, as always
        return
    grow_step = st.epoch // m.n_improve_steps
    if rules.active and st.prompt_history is None:
        st.prompt_history = new_history(n)
    solved, hopeless = skipped(st.prompt_history, rules, grow_step) if rules.active else (np.zeros(n, bool),) * 2
    d = draw(n, budget, s.cfg.train.seed, st.draw_pass, st.draw_offset, solved | hopeless)
    st.drawn, st.draw_pass, st.draw_offset = d.ids, d.pass_no, d.offset
    st.record.update(
        prompts_drawn=len(d.ids),
        draw_pass=d.pass_no,
        prompts_skipped_solved=int(solved[d.passed_over].sum()),
        prompts_skipped_hopeless=int(hopeless[d.passed_over].sum()),
    )
    if budget is not None and len(d.ids) < budget and D.is_main():
        console.say(
            f"[rft_ds] epoch {st.epoch + 1}: the skip rules leave {len(d.ids)} of {n} prompts to draw, fewer than "
            f"data.prompts_per_grow_step ({budget})"
        )


def _announce_lengths(s: Setup, selected: np.ndarray) -> None:
    """Collective: every rank learns the token count of each selected row's prompt (rows_for_rank decides on
    every rank which rows fit). Each prompt not yet announced is read by the rank that holds its first row
    (it sampled it: usually in its cache) and its length all-gathered; a few bytes per new prompt."""
    store = s.prompts
    pids, first = np.unique(selected["prompt_id"], return_index=True)
    new = ~store.announced[pids]  # the same on every rank: announced only changes here
    if not new.any():
        return
    mine = pids[new & (selected["owner"][first] == D.rank())]
    with D.all_ranks_or_fail("reading data.prompts"):
        store.load(mine)
    for ids, lengths in D.all_gather_object((mine, store.lengths[mine])):
        store.lengths[ids] = lengths
    store.announced[pids[new]] = True


def _draw_digest(st: RunState) -> str:
    """A fingerprint of the draw's shared state (position, drawn prompts, history): "" when no draw is on."""
    if st.drawn is None and st.prompt_history is None:
        return ""
    import hashlib

    h = hashlib.sha256(f"{st.draw_pass}:{st.draw_offset}".encode())
    for a in (st.drawn, st.prompt_history):
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return "/" + h.hexdigest()[:8]


def _drawn(s: Setup, st: RunState) -> np.ndarray | range:
    """The prompts of this grow step (dataset positions): the draw's, else every prompt."""
    return st.drawn if st.drawn is not None else range(len(s.prompts))


def _my_prompts(s: Setup, st: RunState) -> np.ndarray:
    """This rank's training prompts (dataset positions): its engine group's deal of the grow step's prompts by
    the plan the run started with."""
    drawn = _drawn(s, st)
    return np.asarray(drawn, dtype=np.int64)[np.asarray(deal_prompts(len(drawn), s.group, s.n_groups, st.shard))]


def _n_chunks(s: Setup, st: RunState) -> int:
    """Sampling chunks per grow step: the same on every rank (each chunk ends at a collective safe point)."""
    longest_shard = -(-len(_drawn(s, st)) // s.n_groups)
    return max(1, -(-longest_shard // s.cfg.sampler.chunk_prompts))


def _shown_metric(s: Setup) -> str:
    """The eval number the epoch's console line shows: train.best_metric's, else the first set's reward."""
    return s.best[0].key(s.best[1]) if s.best else s.evals[0].spec.key("reward_mean") if s.evals else ""


def _add_time(rec: dict, key: str, seconds: float) -> None:
    rec[key] = rec.get(key, 0.0) + seconds
