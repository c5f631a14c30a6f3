"""Which prompts a grow step samples: a budget drawn from seeded passes over the dataset, minus the prompts the
skip rules leave out (dynamic sampling). Pure functions over numpy arrays, the same on every rank.

A pass is a permutation of the dataset seeded by (train.seed, pass number); a grow step takes the next
`data.prompts_per_grow_step` prompts of it that no skip rule leaves out, and a new pass starts where one ends.
The position (pass, offset) and the per-prompt history live in RunState, so a resume draws what the
uninterrupted run would have. The history is a few bytes per prompt, global, built from the score table every
rank already has: nothing new crosses ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HISTORY = np.dtype(
    [
        ("attempts", np.uint16),  # grow steps that sampled the prompt (saturating)
        ("solved_streak", np.uint8),  # of those, the latest ones in a row where every sample passed
        ("failed_streak", np.uint8),  # ... where no sample passed
        ("last_drawn", np.int32),  # the last grow step that sampled it; -1: never
    ]
)  # 8 bytes per prompt: 8 MB for 1M prompts, on every rank and in each checkpoint's shared state


def new_history(n: int) -> np.ndarray:
    hist = np.zeros(n, HISTORY)
    hist["last_drawn"] = -1
    return hist


@dataclass(frozen=True)
class SkipRules:
    """method.skip_solved / skip_hopeless (k: the latest k attempts all passed / all failed; None: off) and
    skip_retry_after (a skipped prompt is drawn again once it has not been sampled for that many grow steps;
    None: never)."""

    solved: int | None = None
    hopeless: int | None = None
    retry_after: int | None = None

    @property
    def active(self) -> bool:
        return self.solved is not None or self.hopeless is not None


def skipped(hist: np.ndarray, rules: SkipRules, grow_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks over the dataset: (solved, hopeless) prompts a draw at this grow step leaves out. Disjoint: a
    prompt's latest attempt either passed in every sample or not."""
    n = len(hist)
    solved = hist["solved_streak"] >= rules.solved if rules.solved is not None else np.zeros(n, bool)
    hopeless = hist["failed_streak"] >= rules.hopeless if rules.hopeless is not None else np.zeros(n, bool)
    if rules.retry_after is not None:  # rested long enough: back in the draw, for one more attempt
        back = grow_step - hist["last_drawn"] >= rules.retry_after
        solved, hopeless = solved & ~back, hopeless & ~back
    return solved, hopeless


def pass_order(n: int, seed: int, pass_no: int) -> np.ndarray:
    """The dataset's order in one pass: a permutation seeded by (seed, pass), the same on every rank."""
    return np.random.default_rng([seed, pass_no, 0x5EED]).permutation(n)


@dataclass
class Draw:
    ids: np.ndarray  # the grow step's prompts (dataset positions), in draw order
    pass_no: int  # where the next draw starts: pass ...
    offset: int  # ... and position in it
    passed_over: np.ndarray  # prompts the scan met and a skip rule left out (dataset positions)


def draw(n: int, budget: int | None, seed: int, pass_no: int, offset: int, skip: np.ndarray) -> Draw:
    """The grow step's prompts. budget None: every prompt no rule skips, in dataset order (no skip rule: all
    of them, as without a budget). Otherwise the next `budget` prompts of the pass not in `skip`, continuing
    into the next pass when this one ends; the scan covers at most n positions, so when the rules skip nearly
    everything a draw returns fewer prompts instead of looping, and no prompt appears twice in one draw."""
    if budget is None:
        return Draw(np.flatnonzero(~skip), pass_no, offset, np.flatnonzero(skip))
    # the next n positions: the rest of this pass, then the start of the next one
    seq = np.concatenate([pass_order(n, seed, pass_no)[offset:], pass_order(n, seed, pass_no + 1)[:offset]])
    first = np.zeros(n, bool)
    first[np.unique(seq, return_index=True)[1]] = True  # across the boundary a prompt may come twice: once here
    ok = first & ~skip[seq]
    hits = np.flatnonzero(ok)
    end = int(hits[budget - 1]) + 1 if len(hits) >= budget else n  # right after the budget's last prompt
    at = offset + end
    return Draw(seq[:end][ok[:end]], pass_no + at // n, at % n, seq[:end][(first & skip[seq])[:end]])


def update_history(
    hist: np.ndarray, prompt_ids: np.ndarray, scores: np.ndarray, pass_score: float, grow_step: int
) -> np.ndarray:
    """The history after a grow step whose samples are (prompt_ids, scores), one entry per sample, every
    rank's: each sampled prompt's attempt, and its streaks of all-pass / no-pass attempts. A new array."""
    hist = hist.copy()
    if len(prompt_ids) == 0:
        return hist
    ids, inv = np.unique(prompt_ids, return_inverse=True)
    n_pass = np.bincount(inv, weights=(scores >= pass_score).astype(np.float64))
    n_all = np.bincount(inv)
    all_pass, no_pass = n_pass == n_all, n_pass == 0
    h = hist[ids]
    h["attempts"] = np.minimum(h["attempts"].astype(np.int64) + 1, np.iinfo(np.uint16).max)
    h["solved_streak"] = np.where(all_pass, np.minimum(h["solved_streak"].astype(np.int64) + 1, 255), 0)
    h["failed_streak"] = np.where(no_pass, np.minimum(h["failed_streak"].astype(np.int64) + 1, 255), 0)
    h["last_drawn"] = grow_step
    hist[ids] = h
    return hist
