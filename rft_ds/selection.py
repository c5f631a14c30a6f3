"""Which completions to train on: the percentile schedule, per-prompt pools and the selection rules.

Pure numpy, no torch.distributed: every rank runs these on the same all-gathered table and must get the
same answer, so nothing here depends on arrival order, Python `hash()` or set iteration.

Selection rules (all strategies):
  * per_prompt: keep a completion if its score >= the quantile of its prompt's pool at the percentile
    (numpy's linear interpolation). `>=` keeps ties at the top, unlike trlx's `threshold + 1e-6`.
  * global: the same, with one quantile over every score in the pools.
  * top_k: keep the K best of each pool (ties at the K boundary broken by the pool's canonical order).
  * In a pool whose scores differ, a completion scoring the pool's minimum is never kept, whatever the
    strategy: with binary rewards a failure is never trained on.
  * A pool whose scores are all equal carries no preference: it keeps nothing, unless `min_score` is set
    and its score reaches it (then every completion of it is kept: all of them passed an absolute bar).
    So a pool where every completion failed is never trained on.
  * `min_score`, when set, is a floor on top of everything else.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Step:
    epoch: int
    grow: bool  # sample new completions this epoch
    percentile: float


def schedule(epoch: int, start: float, end: float, n_improve_steps: int) -> Step:
    """Grow at epochs 0, n, 2n, ...; the percentile goes linearly from `start` on the first improve step
    of a cycle to exactly `end` on its last (trlx's `start + (end-start)/n * k` stops one step short).
    With n_improve_steps=1 every epoch is both first and last: it grows and uses `end`."""
    k = epoch % n_improve_steps
    p = end if n_improve_steps == 1 else start + (end - start) * k / (n_improve_steps - 1)
    return Step(epoch=epoch, grow=k == 0, percentile=float(min(max(p, 0.0), 1.0)))


def completion_digest(token_ids: Sequence[int], eos: bool) -> int:
    """A content key for dedup and canonical order: the same on every rank and every run."""
    h = hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=8)
    h.update(b"\x01" if eos else b"\x00")
    return int.from_bytes(h.digest(), "little")


# The global score table: one fixed-width row per completion in the pools, the same on every rank. Token ids
# are not in it: they stay on the rank that sampled them (`owner`, in its pool shard under `slot`).
TABLE_ROW = np.dtype(
    [
        ("prompt_id", "<i8"),
        ("score", "<f8"),
        ("digest", "<u8"),
        ("length", "<i4"),
        ("eos", "?"),
        ("step", "<i4"),
        ("owner", "<i4"),
        ("slot", "<i8"),
    ]
)
# What a rank sends for each new completion (25 bytes before compression): owner and slot follow from who
# sent it and where in its list, and step is the grow step every rank is in.
WIRE = np.dtype([("prompt_id", "<i4"), ("score", "<f8"), ("digest", "<u8"), ("length", "<i4"), ("eos", "?")])

POOL_POLICIES = "accumulate | latest | window:K"


def truncated(rows: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Completions cut by the length limit: no EOS and max_new_tokens long (an EOS counts against the limit,
    so one that ended by EOS is shorter; a stop sequence that ends exactly at the limit counts as cut)."""
    return ~rows["eos"] & (rows["length"] >= max_new_tokens)


def table_rows(
    prompt_id: Sequence[int],
    score: Sequence[float],
    eos: Sequence[bool],
    tokens: Sequence[Sequence[int]] = (),
    *,
    digest: Sequence[int] | None = None,
    length: Sequence[int] | None = None,
    step: int | Sequence[int] = 0,
    owner: int | Sequence[int] = 0,
    slot: Sequence[int] | None = None,
) -> np.ndarray:
    """Table rows (TABLE_ROW) from columns; digest and length come from `tokens` when not given."""
    n = len(prompt_id)
    t = np.zeros(n, TABLE_ROW)
    t["prompt_id"], t["score"], t["eos"] = prompt_id, score, eos
    t["digest"] = digest if digest is not None else [completion_digest(k, e) for k, e in zip(tokens, eos)]
    t["length"] = length if length is not None else [len(k) for k in tokens]
    t["step"], t["owner"] = step, owner
    t["slot"] = slot if slot is not None else np.arange(n)
    return t


def to_wire(rows: np.ndarray) -> tuple[int, bytes]:
    """(row count, payload) of rows as a rank sends them: the WIRE columns one after another, compressed.
    Column after column, zlib finds the runs: a prompt's N completions share its id, rewards often take a
    few values, lengths and EOS flags are small; the 8-byte digests are what remains."""
    cols = b"".join(np.ascontiguousarray(rows[name], dtype=WIRE[name]).tobytes() for name in WIRE.names)
    return len(rows), zlib.compress(cols, 1)


def from_wire(parts: Sequence[tuple[int, int, bytes]], step: int) -> np.ndarray:
    """The table rows of what every rank sent ((its first slot, to_wire(its rows)), in rank order)."""
    out = []
    for owner, (first_slot, n, payload) in enumerate(parts):
        buf, at = zlib.decompress(payload), 0
        t = np.zeros(n, TABLE_ROW)
        for name in WIRE.names:
            t[name] = np.frombuffer(buf, WIRE[name], n, at)
            at += n * WIRE[name].itemsize
        t["step"], t["owner"], t["slot"] = step, owner, first_slot + np.arange(n)
        out.append(t)
    return np.concatenate(out) if out else np.zeros(0, TABLE_ROW)


def canonical(rows: np.ndarray, dedup: bool = True) -> np.ndarray:
    """Sort by (prompt id, digest, best score first, owner, slot) and, with dedup, keep one row per
    (prompt, completion): the best-scoring copy, with the newest copy's step. A total order on the rows' content
    and keys, so it does not depend on the order the rows (or ranks' shards) arrived in."""
    if len(rows) == 0:
        return rows
    order = np.lexsort((rows["slot"], rows["owner"], -rows["score"], rows["digest"], rows["prompt_id"]))
    if not dedup:
        return rows[order]
    pid, dig = rows["prompt_id"][order], rows["digest"][order]
    first = np.flatnonzero(np.r_[True, (pid[1:] != pid[:-1]) | (dig[1:] != dig[:-1])])
    out = rows[order[first]]
    out["step"] = np.maximum.reduceat(rows["step"][order], first)  # in the pool while any copy is
    return out


def parse_pool_policy(policy: str) -> int | None:
    """The number of grow steps a pool keeps: None for accumulate (all), 1 for latest, K for window:K.
    Raises ValueError naming the accepted forms."""
    if policy == "accumulate":
        return None
    if policy == "latest":
        return 1
    head, _, k = str(policy).partition(":")
    if head == "window" and k.isdigit() and int(k) >= 1:
        return int(k)
    raise ValueError(f"must be {POOL_POLICIES} (K >= 1), got {policy!r}")


def update_pool(pool: np.ndarray, new: np.ndarray, step: int, keep_steps: int | None, dedup: bool) -> np.ndarray:
    """The pool after grow step `step` added `new`: rows older than the last `keep_steps` grow steps pruned
    first (None: none), then canonical. A completion sampled more than once counts with the best score of
    its copies in the pool, and stays in a window while its newest copy does."""
    if keep_steps is not None:
        pool = pool[pool["step"] > step - keep_steps]
    return canonical(np.concatenate([pool, new]), dedup)


def _groups(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts = (
        np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(sorted_ids) else np.zeros(0, np.int64)
    )
    sizes = np.diff(np.r_[starts, len(sorted_ids)])
    group = np.repeat(np.arange(len(starts)), sizes)
    return starts, sizes, group


def select(
    prompt_id: np.ndarray,
    score: np.ndarray,
    percentile: float,
    strategy: str = "per_prompt",
    top_k: int = 1,
    min_score: Optional[float] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (keep mask, per-row threshold) aligned with the input rows. Rows of one prompt form its
    pool. Ties (equal prompt and score) are ordered by input position, so pass canonical rows."""
    prompt_id = np.asarray(prompt_id, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0)
    order = np.lexsort((score, prompt_id))  # stable: equal keys keep input order
    pid, s = prompt_id[order], score[order]
    starts, sizes, group = _groups(pid)
    ends = starts + sizes - 1
    pmin, pmax = s[starts], s[ends]

    if strategy == "per_prompt":
        h = (sizes - 1) * percentile
        lo = np.floor(h).astype(np.int64)
        hi = np.minimum(lo + 1, sizes - 1)
        a, b = s[starts + lo], s[starts + hi]
        q = np.where(a == b, a, a + (h - lo) * (b - a))  # equal neighbours give exactly that score
        thr = q[group]
    elif strategy == "global":
        thr = np.full(n, np.quantile(s, percentile))
    elif strategy == "top_k":
        thr = s[np.maximum(ends - (top_k - 1), starts)][group]
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}")

    if strategy == "top_k":
        keep = (ends[group] - np.arange(n)) < top_k  # position from the top of the sorted pool
    else:
        keep = s >= thr
    spread = (pmax > pmin)[group]
    keep &= np.where(spread, s > pmin[group], min_score is not None)
    if min_score is not None:
        keep &= s >= min_score

    mask = np.empty(n, bool)
    mask[order] = keep
    threshold = np.empty(n)
    threshold[order] = thr
    return mask, threshold


def cap_per_prompt(prompt_id: np.ndarray, score: np.ndarray, keep: np.ndarray, cap: int | None) -> np.ndarray:
    """ReST-EM's cap: at most `cap` kept completions per prompt, the highest scores; equal scores keep input
    order (canonical rows: by digest), so the choice is the same on every rank and every run."""
    if cap is None or not keep.any():
        return keep
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((idx, -score[idx], prompt_id[idx]))]
    starts, sizes, group = _groups(prompt_id[order])
    rank_in_prompt = np.arange(len(order)) - starts[group]
    out = np.zeros_like(keep)
    out[order[rank_in_prompt < cap]] = True
    return out


def solved_prompts(prompt_ids: np.ndarray, scores: np.ndarray, pass_score: float) -> np.ndarray:
    """A mask over rows: the rows of prompts whose rows all pass (selection.drop_solved: nothing to learn
    from them, RAFT++'s "reject both ends"). Pure."""
    if len(prompt_ids) == 0:
        return np.zeros(0, bool)
    ids, inv = np.unique(prompt_ids, return_inverse=True)
    fails = np.bincount(inv, weights=(scores < pass_score).astype(np.float64), minlength=len(ids))
    return fails[inv] == 0


def select_epoch(
    table: np.ndarray,
    percentile: float,
    strategy: str,
    top_k: int,
    min_score: float | None,
    max_per_prompt: int | None,
    drop_cut_at: int | None,
    drop_solved_at: float | None = None,
) -> tuple[np.ndarray, float | None]:
    """An epoch's selection over the pools' table: which rows train (a mask) and the mean threshold over the
    prompts that took part. drop_cut_at (method.overlong: drop, the max_new_tokens): a completion cut short
    takes no part, so it neither trains nor raises its prompt's threshold (DAPO's overlong filtering);
    drop_solved_at (selection.drop_solved, the pass score): nor do the rows of a prompt whose rows all pass;
    then at most max_per_prompt rows per prompt (ReST-EM). Pure: the same table gives the same mask on every
    rank."""
    usable = ~truncated(table, drop_cut_at) if drop_cut_at is not None else np.ones(len(table), bool)
    if drop_solved_at is not None:
        usable &= ~solved_prompts(table["prompt_id"], table["score"], drop_solved_at)
    keep, thr = np.zeros(len(table), bool), np.full(len(table), np.nan)
    keep[usable], thr[usable] = select(
        table["prompt_id"][usable], table["score"][usable], percentile, strategy, top_k, min_score
    )
    pid = table["prompt_id"][usable]
    first = np.r_[True, pid[1:] != pid[:-1]] if len(pid) else np.zeros(0, bool)  # each usable prompt's first row
    keep = cap_per_prompt(table["prompt_id"], table["score"], keep, max_per_prompt)
    return keep, float(thr[usable][first].mean()) if usable.any() else None


def selection_digest(rows: np.ndarray, mask: np.ndarray) -> str:
    """A short fingerprint of what was selected, to check that every rank selected the same."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(rows["prompt_id"][mask], dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(rows["digest"][mask], dtype=np.uint64).tobytes())
    return h.hexdigest()[:16]
