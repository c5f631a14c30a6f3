"""The sharded scorer: each rank scores its own completions, then one all-gather of a compact table (scores
and ids, never token ids) gives every rank the same global table, so selection is identical everywhere
without any rank scoring twice or holding another rank's tokens."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np

from rft_ds import distributed as D
from rft_ds.pool import LocalPool
from rft_ds.selection import canonical, from_wire, to_wire


class RewardError(ValueError):
    """reward_fn misbehaved; the message names the sample."""


def _describe(i: int, prompt_ids: Sequence[int], outputs: Sequence[str], offset: int = 0) -> str:
    out = outputs[i] if i < len(outputs) else ""
    return f"sample {offset + i} (prompt {prompt_ids[i]}, output {out[:40]!r})"


def validate_scores(raw: Any, n: int, prompt_ids: Sequence[int], outputs: Sequence[str],
                    fn_name: str = "reward_fn", offset: int = 0) -> np.ndarray:
    """Turn what reward_fn returned into float64 scores, or raise naming the first bad sample."""
    if hasattr(raw, "detach"):  # a torch tensor
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1).tolist() if raw.ndim <= 1 or raw.size == n else raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise RewardError(f"{fn_name} must return a list of {n} numbers, got {type(raw).__name__}")
    if len(raw) != n:
        raise RewardError(f"{fn_name} returned {len(raw)} scores for {n} samples")
    out = np.empty(n, dtype=np.float64)
    for i, v in enumerate(raw):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise RewardError(f"{fn_name} returned {type(v).__name__} {v!r} for {_describe(i, prompt_ids, outputs, offset)}; "
                              "scores must be real numbers")
        if not math.isfinite(float(v)):
            raise RewardError(f"{fn_name} returned {float(v)} for {_describe(i, prompt_ids, outputs, offset)}; "
                              "scores must be finite")
        out[i] = float(v)
    return out


def call_reward_fn(reward_fn: Callable, samples: list[str], prompts: list[str], outputs: list[str],
                   prompt_ids: list[int], metadata: dict[str, list], tokenizer: Any, batch_size: int | None = None,
                   progress: str | None = None) -> np.ndarray:
    """trlx's call: reward_fn(samples=, prompts=, outputs=, tokenizer=, prompt_ids=, **metadata), on chunks of
    at most batch_size samples (None: all at once)."""
    from rft_ds.progress import bar

    if not samples:
        return np.zeros(0)
    step = batch_size or len(samples)
    scores = []
    pbar = bar(total=len(samples), desc=progress or "", show=bool(progress), unit="sample")
    for lo in range(0, len(samples), step):
        sl = slice(lo, lo + step)
        raw = reward_fn(samples=samples[sl], prompts=prompts[sl], outputs=outputs[sl], tokenizer=tokenizer,
                        prompt_ids=prompt_ids[sl], **{k: v[sl] for k, v in metadata.items()})
        scores.append(validate_scores(raw, len(samples[sl]), prompt_ids[sl], outputs[sl], offset=lo))
        pbar.update(len(samples[sl]))
    pbar.close()
    return np.concatenate(scores)


def decode_outputs(tokenizer: Any, tokens: Sequence[Sequence[int]], stop_sequences: Sequence[str] = ()) -> list[str]:
    """Completion text as reward_fn sees it: special tokens dropped, cut before a stop sequence (as trlx)."""
    outputs = tokenizer.batch_decode([list(t) for t in tokens], skip_special_tokens=True)
    if stop_sequences:
        outputs = [min((o[: o.find(s)] for s in stop_sequences if s in o), key=len, default=o) for o in outputs]
    return outputs


def score_shard(reward_fn: Callable, prompt_ids: Sequence[int], tokens: Sequence[Sequence[int]],
                prompt_texts: Sequence[str], metadata: Sequence[dict], tokenizer: Any, stop_sequences: Sequence[str] = (),
                batch_size: int | None = None, progress: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Score this rank's completions (reward_fn sees prompt + decoded output and the prompt's metadata).
    Returns (scores, decoded outputs). Collective only in its failure check: a failure on any rank is raised
    on all."""
    with D.all_ranks_or_fail("scoring"):
        pids = [int(p) for p in prompt_ids]
        outputs = decode_outputs(tokenizer, tokens, stop_sequences)
        prompts = [prompt_texts[p] for p in pids]
        samples = [p + o for p, o in zip(prompts, outputs)]
        meta_keys = sorted({k for p in set(pids) for k in metadata[p]})
        meta = {k: [metadata[p].get(k) for p in pids] for k in meta_keys}
        scores = call_reward_fn(reward_fn, samples, prompts, outputs, pids, meta, tokenizer, batch_size, progress)
    return scores, outputs


def gather_new_rows(rows: np.ndarray, step: int) -> np.ndarray:
    """Every rank's new TABLE rows, in rank order, the same on every rank. Sent: at most 25 bytes per
    completion (selection.WIRE, compressed) and the rank's first slot; never token ids."""
    first_slot = int(rows["slot"][0]) if len(rows) else 0
    return from_wire(D.all_gather_object((first_slot, *to_wire(rows))), step)


def gather_pool(pool: LocalPool) -> np.ndarray:
    """The global pool table rebuilt from every rank's shard (on resume): the canonical order is a total
    order on the rows, so this is the table the ranks had when they saved."""
    parts = D.all_gather_object(pool.rows)
    return canonical(np.concatenate(parts), dedup=False)
