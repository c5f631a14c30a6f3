"""Replay: the base model's own answers on a general prompt set, mixed into every epoch's training rows.

RFT on one skill pulls the model away from what it did elsewhere (the addition demo's subtraction set drops).
Training a small share of each epoch on completions the *base* model sampled is cross-entropy towards the base
policy on those prompts, an estimate of KL(base || model) there, at the cost of the replayed rows' tokens.

`data.replay_prompts` names the prompts (any prompt source); at the start of a fresh run, before any update,
each engine group samples one completion for its share of them, and every rank gathers the whole set (once
per run: R prompts x their completion tokens x 4 bytes, meant to be small). It lives in the run state as
compact arrays, so a checkpoint carries it and a resume, on any world size, replays the same answers.
Each epoch `method.replay_share` of its rows are replay rows: a seeded draw, the same on every rank and after
a resume, dealt to the ranks that have the fewest selected rows first so every rank keeps the same steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rft_ds.errors import ConfigError


def pack(prompt: Sequence[int], eos: Sequence[bool], tokens: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """The replay set as arrays, ordered by replay prompt: 4 bytes a token, 9 a completion."""
    order = np.argsort(np.asarray(prompt, dtype=np.int64), kind="stable")
    toks = [np.asarray(tokens[i], dtype=np.int32) for i in order]
    return {
        "prompt": np.asarray(prompt, dtype=np.int32)[order] if len(order) else np.zeros(0, np.int32),
        "eos": np.asarray(eos, dtype=bool)[order] if len(order) else np.zeros(0, bool),
        "length": np.array([len(t) for t in toks], dtype=np.int32),
        "tokens": np.concatenate(toks) if toks else np.zeros(0, np.int32),
    }


def check_resume(saved: dict | None, digest: str | None, ckpt: str) -> None:
    """A checkpoint's replay set (saved) against this run's replay prompts (their digest; None: no replay).
    The base model's answers exist only from a fresh start, so a resume cannot add, drop or swap them."""
    if saved is None and digest is not None:
        raise ConfigError(
            f"data.replay_prompts: {ckpt} was written without replay, and the base model's answers are "
            "sampled at a fresh start only: start a new run to replay them"
        )
    if saved is not None and saved.get("digest") != digest:
        raise ConfigError(
            f"data.replay_prompts: {ckpt} replays the base model's answers to other prompts than these "
            "(or method.replay_share is 0 now): resume with the replay prompts it was started with"
        )


def completions(replay: dict[str, np.ndarray], picks: np.ndarray) -> list[np.ndarray]:
    """Token ids of the replay set's completions `picks` (views)."""
    starts = np.r_[0, np.cumsum(replay["length"], dtype=np.int64)[:-1]]
    return [replay["tokens"][starts[i] : starts[i] + replay["length"][i]] for i in picks]


def draw(n_rows: int, n_replay: int, share: float, seed: int, epoch: int) -> np.ndarray:
    """Which replay completions an epoch trains on: `share` of the epoch's rows (its n_rows selected rows plus
    these), at most the whole set, none when nothing was selected. Seeded by (seed, epoch): every rank draws
    the same, and a resumed run too."""
    k = min(n_replay, round(share * n_rows / (1.0 - share))) if n_rows and share > 0 else 0
    if k <= 0:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng([seed, epoch, 11]).choice(n_replay, size=k, replace=False))


def deal(counts: Sequence[int], n: int) -> list[np.ndarray]:
    """Positions 0..n-1 of an epoch's replay rows, per group of ranks that train the same rows: the groups
    with the fewest selected rows (`counts`) first, round after round, so every group ends within one row
    of the others and the epoch's step count is what the total asks for."""
    order = np.argsort(np.asarray(counts, dtype=np.int64), kind="stable")
    if not len(order):
        return []
    owner = order[np.arange(n) % len(order)]
    return [np.flatnonzero(owner == g) for g in range(len(counts))]


def sample_set(
    sampler: Any,
    records: Sequence[Any],
    group: int,
    n_groups: int,
    contributes: bool,
    gen_kwargs: dict,
    seed: int,
    label: str | None,
) -> dict[str, np.ndarray]:
    """Collective: one completion per replay prompt from the engine as it is (the base model, at a fresh
    start), each engine group sampling its share; every rank returns the whole set (pack)."""
    from rft_ds import distributed as D

    mine = np.arange(group, len(records), n_groups)
    outs = sampler.generate([records[i].token_ids for i in mine], 1, gen_kwargs, seed, label)
    part = (
        (
            [int(i) for i in mine],
            [o[0].finish_reason == "eos" for o in outs],
            [np.asarray(o[0].token_ids, dtype=np.int32) for o in outs],
        )
        if contributes
        else ([], [], [])
    )
    prompt, eos, tokens = [], [], []
    for p, e, t in D.all_gather_object(part):
        prompt += p
        eos += e
        tokens += t
    return pack(prompt, eos, tokens)
