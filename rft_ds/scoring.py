"""The sharded scorer: each rank scores its own completions, then one all-gather of a compact table (scores
and ids, never token ids) gives every rank the same global table, so selection is identical everywhere
without any rank scoring twice or holding another rank's tokens."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rft_ds import distributed as D
from rft_ds.config import RewardConfig
from rft_ds.pool import LocalPool
from rft_ds.reward_terms import RewardError, RewardTerm, as_ints, score_terms, validate_scores  # noqa: F401 (re-exported)
from rft_ds.selection import canonical, from_wire, to_wire


def decode_outputs(tokenizer: Any, tokens: Sequence[Sequence[int]], stop_sequences: Sequence[str] = ()) -> list[str]:
    """Completion text as reward_fn sees it: special tokens dropped, cut before a stop sequence (as trlx)."""
    outputs = []
    for lo in range(0, len(tokens), 1024):  # Python ints for a batch at a time, not for a whole shard
        outputs += tokenizer.batch_decode([as_ints(t) for t in tokens[lo : lo + 1024]], skip_special_tokens=True)
    if stop_sequences:
        outputs = [min((o[: o.find(s)] for s in stop_sequences if s in o), key=len, default=o) for o in outputs]
    return outputs


def score_shard(
    terms: Sequence[RewardTerm],
    prompt_ids: Sequence[int],
    tokens: Sequence[Sequence[int]],
    prompt_texts: Sequence[str],
    metadata: Sequence[dict],
    tokenizer: Any,
    stop_sequences: Sequence[str] = (),
    rc: Any = None,
    progress: str | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Score this rank's completions with every reward term (each sees prompt + decoded output and the
    prompt's metadata; rc is the `reward` config: batch size, concurrency, timeout). Returns (combined
    scores, decoded outputs, each term's scores with NaN where it did not apply). Collective only in its
    failure check: a failure on any rank is raised on all."""
    rc = rc or RewardConfig()
    with D.all_ranks_or_fail("scoring"):
        pids = [int(p) for p in prompt_ids]
        outputs = decode_outputs(tokenizer, tokens, stop_sequences)
        prompts = [prompt_texts[p] for p in pids]
        samples = [p + o for p, o in zip(prompts, outputs)]
        meta_keys = sorted({k for p in set(pids) for k in metadata[p]})
        meta = {k: [metadata[p].get(k) for p in pids] for k in meta_keys}
        scores, parts = score_terms(
            terms,
            samples,
            prompts,
            outputs,
            list(tokens),
            pids,
            meta,
            tokenizer,
            rc.batch_size,
            D.node_share(rc.max_concurrency, os.environ),  # per node: this rank's share
            rc.timeout_s,
            progress,
        )
    return scores, outputs, parts


def score_samples(
    terms: Sequence[RewardTerm],
    prompt_ids: np.ndarray,
    tokens: Sequence[np.ndarray],
    prompt_texts: Sequence[str],
    metadata: Sequence[dict],
    tokenizer: Any,
    stop_sequences: Sequence[str] = (),
    rc: Any = None,
    progress: str | None = None,
    env_reward: np.ndarray | None = None,
    failed_score: float = 0.0,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """score_shard, for completions and for trajectories (rollout.py) alike. env_reward None: completions,
    score_shard's scores. Else trajectories: the environment's reward where it gave one (a failed trajectory's
    is rollout.failed_score), else the reward terms on the final model turn (no terms: failed_score); the
    outputs are the final turns' text. Collective as score_shard: every rank calls it, whatever it holds."""
    if env_reward is None:
        return score_shard(terms, prompt_ids, tokens, prompt_texts, metadata, tokenizer, stop_sequences, rc, progress)
    from rft_ds.rollout import final_turn

    finals = [final_turn(t) for t in tokens]
    need = np.flatnonzero(np.isnan(env_reward))
    scores = np.asarray(env_reward, dtype=np.float64).copy()
    parts = np.full((len(terms), len(finals)), np.nan)
    outputs = decode_outputs(tokenizer, finals, stop_sequences)
    if terms:
        sub, _, p = score_shard(
            terms,
            np.asarray(prompt_ids)[need],
            [finals[i] for i in need],
            prompt_texts,
            metadata,
            tokenizer,
            stop_sequences,
            rc,
            progress,
        )
        scores[need], parts[:, need] = sub, p
    else:
        scores[need] = failed_score
    return scores, outputs, parts


def rollout_means(stats: np.ndarray | None, model_tokens: int = 0) -> dict[str, float]:
    """Collective (one all-reduce of len(STATS) + 2 numbers): the rollouts of every rank, as metrics: turns and
    tool calls per trajectory, how many had tool errors, environment errors, timeouts, were truncated (cut by
    rollout.max_turns, max_tokens or max_new_tokens) or failed, and the tokens the model sampled in them
    (rollout_model_tokens: a trajectory's prompt and environment text are not sampled). stats None: this rank
    has no trajectories."""
    import torch

    from rft_ds.rollout import STATS

    n_here = len(stats) if stats is not None else 0
    sums_here = stats.sum(0) if n_here else np.zeros(len(STATS))
    local = np.concatenate([[n_here, model_tokens], sums_here]).astype(np.float64)
    tot = D.all_reduce(torch.from_numpy(local)).numpy()
    n, sums = tot[0], dict(zip(STATS, tot[2:]))
    out = {
        "rollout_model_tokens": int(tot[1]),
        "rollout_turns_mean": float(sums["turns"] / n) if n else 0.0,
        "rollout_tool_calls_mean": float(sums["tool_calls"] / n) if n else 0.0,
    }
    out.update({f"rollout_{k}": int(sums[k]) for k in STATS if k not in ("turns", "tool_calls")})
    return out


def term_means(terms: Sequence[RewardTerm], parts: np.ndarray) -> dict[str, float]:
    """Each term's mean over the samples it scored on all ranks, as reward_<name>_mean (none for a single
    term: its mean is the reward mean); for each reward model the samples whose completion it cut to fit
    its max_length since the last call, as reward_<name>_truncated (so nothing is cut unseen); and what a
    term reports besides its scores (a verifier's timeouts and errors) since the last call, as
    reward_<name>_<count>. One all-reduce of 2 numbers per term, 1 per reward model and 1 per reported
    count; none for a single function term that reports nothing."""
    models = [t for t in terms if t.reward_model is not None]  # from the config: the same on every rank
    reported = [(t, key) for t in terms for key in t.reports]  # the functions': the same on every rank
    if len(terms) < 2 and not models and not reported:
        return {}
    import torch

    applied = ~np.isnan(parts)
    cut = [t.fn.take_truncated() if hasattr(t.fn, "take_truncated") else 0 for t in models]
    counts = [t.counts.pop(key, 0) for t, key in reported]
    local = np.concatenate([np.where(applied, parts, 0.0).sum(1), applied.sum(1), cut, counts])
    tot = D.all_reduce(torch.from_numpy(local)).numpy()
    k, m = len(terms), len(models)
    out = {f"reward_{t.name}_mean": float(tot[i] / tot[k + i]) for i, t in enumerate(terms) if k > 1 and tot[k + i] > 0}
    out.update({f"reward_{t.name}_truncated": int(tot[2 * k + j]) for j, t in enumerate(models)})
    out.update({f"reward_{t.name}_{key}": int(tot[2 * k + m + j]) for j, (t, key) in enumerate(reported)})
    return out


def gather_new_rows(rows: np.ndarray, step: int) -> np.ndarray:
    """Every rank's new table rows, in rank order, the same on every rank. Sent: at most 25 bytes per
    completion (selection.WIRE, compressed) and the rank's first slot; never token ids."""
    first_slot = int(rows["slot"][0]) if len(rows) else 0
    return from_wire(D.all_gather_object((first_slot, *to_wire(rows))), step)


def gather_pool(pool: LocalPool) -> np.ndarray:
    """The global pool table rebuilt from every rank's shard (on resume): the canonical order is a total
    order on the rows, so this is the table the ranks had when they saved."""
    parts = D.all_gather_object(pool.rows)
    return canonical(np.concatenate(parts), dedup=False)
