"""Where the run state comes from and where it goes: `start_fresh` (a new run), `load_checkpoint` (a resume:
the state, the engine's weights and its check) and `save_checkpoint` (at a safe point, collective, atomic)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from rft_ds import artifacts, console, evaluation, replay
from rft_ds import distributed as D
from rft_ds.config import yaml_safe
from rft_ds.evaluation import best_key
from rft_ds.faults import maybe_die
from rft_ds.pool import LocalPool
from rft_ds.run_setup import Setup, check_parity, eval_context, replay_digest
from rft_ds.run_state import STAGES, RunState
from rft_ds.samples import Samples, sample_seed
from rft_ds.scoring import gather_pool


def start_fresh(s: Setup) -> RunState:
    """A new run: a run id every rank shares, the replay set's answers, and the eval before training."""
    st = RunState(
        run_id=D.broadcast_object(uuid.uuid4().hex[:12] if D.is_main() else None),
        prompts_digest=s.prompts_digest,
        shard=s.cfg.data.shard,
        pool=LocalPool(D.rank()),
        group_by_length=s.cfg.train.group_by_length,
        share_prompt=s.rt.learner.share_prompt,
    )
    artifacts.warn_foreign_best_model(s.out, st.run_id)
    if s.rt.weight_sync:  # the engine started from dummy weights: the learner's fill it, and are checked
        fill_engine(s, st.record, "engine filled from the learner's weights")
    if s.prompts.replay is not None:  # before any update: the base model's answers
        t0 = time.perf_counter()
        st.replay = replay.sample_set(
            s.sampler,
            s.prompts.replay.records,
            s.group,
            s.n_groups,
            s.contributes,
            s.cfg.method.gen_kwargs,
            sample_seed(s.cfg.train.seed, -1, s.group, 2),
            "replay: sample" if s.show else None,
        )
        st.replay["digest"] = replay_digest(s)
        st.record["time_replay_sample"] = time.perf_counter() - t0
    if s.evals and s.cfg.train.eval_interval > 0:
        st.eval_before = evaluation.evaluate(s.evals, eval_context(s, st), -1)
        if s.best is not None:
            best_key(
                s.best, st.eval_before
            )  # a best_metric that metric_fn does not report fails now, not after an epoch
        if D.is_main():
            console.say(f"[rft_ds] eval before training: {evaluation.summary(s.evals, st.eval_before)}")
    return st


def fill_engine(s: Setup, record: dict, what: str) -> None:
    """The engine gets the learner's weights (it started from dummy ones, or a checkpoint restored others) and
    the parity check proves it, unless sampler.parity_check is off; `record` gets the sync's time and bytes
    and the check's result (epoch 0's record, for a fresh run)."""
    t0 = time.perf_counter()
    record["sync_bytes_start"] = s.rt.weight_sync.sync().bytes
    record["time_sync_start"] = time.perf_counter() - t0
    if s.cfg.sampler.parity_check != "off":
        record["parity_max_diff"] = diff = check_parity(s)
        if D.is_main():
            console.say(f"[rft_ds] {what}; parity max |logprob diff| {diff:.2g}")


def save_checkpoint(s: Setup, st: RunState) -> None:
    """Collective: the run state (the shared part by rank 0; its pool shard, `local` and its RNG by every
    rank) and the DeepSpeed engine, atomically. The epoch record just closed gets the checkpoint's own time."""
    from rft_ds import checkpoint

    t0 = time.perf_counter()
    boundary = st.stage == STAGES[0] and st.cursor == 0 and bool(st.history)  # an end-of-epoch checkpoint

    def finalize(seconds: float) -> dict:  # rank 0, once every rank's files are written and sealed
        if boundary:
            st.history[-1]["time_checkpoint"] = seconds
            st.history[-1]["time_epoch"] += seconds
        return st.shared()

    checkpoint.save(
        s.out / "checkpoints",
        checkpoint.checkpoint_name(*st.position()),
        s.rt.learner.engine,
        None,
        s.tokenizer,
        s.cfg.train.keep_last,
        die_hook=maybe_die,
        finalize_state=finalize,
        local_state={"pool": st.pool, "local": st.local},
        meta={
            "run_id": st.run_id,
            "position": list(st.position()),
            "config": yaml_safe(s.cfg.to_dict()),
            "shard": {"plan": st.shard, "groups": s.n_groups},
        },
    )
    s.rt.last_save_s = time.perf_counter() - t0
    s.rt.last_save_at = time.monotonic()
    if boundary:
        st.history[-1].setdefault("time_checkpoint", s.rt.last_save_s)


def load_checkpoint(s: Setup, ckpt: Path) -> RunState:
    """The mirror of save_checkpoint: engine, RNG, run state; then the engine gets the restored weights (a
    sync, never the original model path) and is checked."""
    import dataclasses

    from rft_ds import checkpoint

    shared, mine = checkpoint.load(ckpt, s.rt.learner.engine, verified=True, universal=s.universal)
    checkpoint.check_compatible(shared, s.prompts_digest)
    if s.universal:  # another world size (at an elastic position): this rank takes over some old ranks' shards
        pool, local = LocalPool.merge([m["pool"] for m in mine], D.rank()), {}
    else:
        pool, local = mine["pool"], mine["local"]
    old = local.pop("completions", None)  # written before samples.Samples: Completion lists
    if old is not None and shared["stage"] in ("sample", "score"):  # still to be scored (log-probs not kept)
        local["samples"] = Samples()
        local["samples"].add(0, [[dataclasses.replace(c, logprobs=None) for c in cs] for cs in old])
    st = RunState(**shared, local=local, pool=pool, table=gather_pool(pool))
    replay.check_resume(st.replay, replay_digest(s) if s.prompts.replay is not None else None, str(ckpt))
    st.best = artifacts.resumed_best(
        st.best,
        s.out,
        st.run_id,
        s.best[0].key(s.best[1]) if s.best else None,
        f"{s.best[0].name}/{s.best[1]}" if s.best else None,
    )
    if s.rt.weight_sync and st.stage != "sync":  # at "sync", the stage itself syncs (and checks) next
        fill_engine(s, {}, "engine synced from the checkpoint")
    if D.is_main():
        console.say(
            f"[rft_ds] resumed from {ckpt} at epoch {st.epoch + 1}/{s.cfg.train.epochs} ({st.stage}"
            + (f" {st.cursor}" if st.cursor else "")
            + ")"
            + (f" on {D.world_size()} ranks, written by {checkpoint.written_by(ckpt)}" if s.universal else "")
        )
    return st
