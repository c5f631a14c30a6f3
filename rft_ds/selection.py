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
from dataclasses import dataclass, field
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


@dataclass
class Samples:
    """A flat table of scored completions (columns aligned by row)."""

    prompt_id: np.ndarray  # int64, index of the prompt in the training prompt list
    score: np.ndarray  # float64
    eos: np.ndarray  # bool: the completion ended with EOS (so EOS is part of what we train on)
    tokens: list = field(default_factory=list)  # list[np.ndarray[int32]] completion token ids
    digest: Optional[np.ndarray] = None  # uint64, filled from tokens and eos when missing

    def __post_init__(self) -> None:
        self.prompt_id = np.asarray(self.prompt_id, dtype=np.int64)
        self.score = np.asarray(self.score, dtype=np.float64)
        self.eos = np.asarray(self.eos, dtype=bool)
        self.tokens = [np.asarray(t, dtype=np.int32) for t in self.tokens]
        if self.digest is None:
            self.digest = np.array([completion_digest(t, e) for t, e in zip(self.tokens, self.eos)], dtype=np.uint64)
        n = len(self.prompt_id)
        if not (len(self.score) == len(self.eos) == len(self.tokens) == len(self.digest) == n):
            raise ValueError("Samples columns must have equal lengths")

    def __len__(self) -> int:
        return len(self.prompt_id)

    def take(self, idx: np.ndarray) -> "Samples":
        idx = np.asarray(idx, dtype=np.int64)
        return Samples(self.prompt_id[idx], self.score[idx], self.eos[idx], [self.tokens[i] for i in idx],
                       self.digest[idx])

    @staticmethod
    def concat(parts: Sequence["Samples"]) -> "Samples":
        parts = [p for p in parts if p is not None]
        if not parts:
            return Samples.empty()
        return Samples(np.concatenate([p.prompt_id for p in parts]), np.concatenate([p.score for p in parts]),
                       np.concatenate([p.eos for p in parts]), [t for p in parts for t in p.tokens],
                       np.concatenate([p.digest for p in parts]))

    @staticmethod
    def empty() -> "Samples":
        return Samples(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool), [], np.zeros(0, np.uint64))


def canonical(samples: Samples, dedup: bool = True) -> Samples:
    """Sort by (prompt id, digest) and, with dedup, keep one row per (prompt, completion) with the best
    score. The result does not depend on the order the rows (or ranks' shards) arrived in."""
    if len(samples) == 0:
        return samples
    order = np.lexsort((-samples.score, samples.digest, samples.prompt_id))
    if dedup:
        pid, dig = samples.prompt_id[order], samples.digest[order]
        first = np.r_[True, (pid[1:] != pid[:-1]) | (dig[1:] != dig[:-1])]
        order = order[first]
    return samples.take(order)


class Pools:
    """Per-prompt pools of scored completions, accumulated across grow steps, kept canonical."""

    def __init__(self, dedup: bool = True) -> None:
        self.dedup = dedup
        self.samples = Samples.empty()

    def add(self, new: Samples) -> None:
        self.samples = canonical(Samples.concat([self.samples, new]), self.dedup)

    def __len__(self) -> int:
        return len(self.samples)


def _groups(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(sorted_ids) else np.zeros(0, np.int64)
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


def selection_digest(samples: Samples, mask: np.ndarray) -> str:
    """A short fingerprint of what was selected, to check that every rank selected the same."""
    h = hashlib.sha256()
    h.update(samples.prompt_id[mask].tobytes())
    h.update(samples.digest[mask].tobytes())
    return h.hexdigest()[:16]
