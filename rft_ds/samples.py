"""This rank's completions of the grow step in progress, as compact arrays, from sampling until scoring.

A sampled token costs 4 bytes here (int32), in memory and in a mid-epoch checkpoint, plus 9 bytes per
completion; a list of Python ints cost ~36 bytes a token and a float log-prob per token 32 more (at 100M
sampled tokens per rank: 7 GB, and minutes to pickle against Slurm's 300 s warning). The sampler's log-probs
are kept only for the few completions the stale-weight check compares (`probes`), as float32, and dropped
once compared.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

FINISH = ("eos", "stop", "length")  # finish codes, in Completion.finish_reason's names


class Samples:
    """Completions in the order they were sampled: the prompt each belongs to (an index into this rank's
    prompt list), why it ended, and its token ids; each sampling chunk's arrays are kept as they came
    (no copy of everything before it per chunk) and joined when read."""

    def __init__(self) -> None:
        self._prompt: list[np.ndarray] = []  # int32
        self._finish: list[np.ndarray] = []  # int8, FINISH codes
        self._length: list[np.ndarray] = []  # int32
        self._tokens: list[np.ndarray] = []  # int32, all of a chunk's completions end to end
        # rollouts (rollout.Trajectory): the environment's reward (NaN: none) and rollout.STATS per trajectory
        self._reward: list[np.ndarray] = []  # float32
        self._stats: list[np.ndarray] = []  # int32, (n, len(STATS))
        self.probes: dict[int, np.ndarray] = {}  # completion index -> the sampler's log p of its tokens (float32)

    def add(self, first_prompt: int, completions: Sequence[Sequence[Any]]) -> None:
        """One sampling chunk: completions[i] are the samples of prompt first_prompt + i (sampling.Completion).
        Where the sampler returned log-probs (pick_probes' prompts), a prompt's first sample keeps them as a
        probe; the rest are dropped here."""
        flat = [c for cs in completions for c in cs]
        starts = len(self) + np.cumsum([0] + [len(cs) for cs in completions[:-1]])
        for start, cs in zip(starts, completions):
            if cs and cs[0].logprobs is not None:
                self.probes[int(start)] = np.asarray(cs[0].logprobs, dtype=np.float32)
        self._prompt.append(
            np.repeat(
                np.arange(first_prompt, first_prompt + len(completions), dtype=np.int32),
                [len(cs) for cs in completions],
            )
        )
        self._finish.append(np.array([FINISH.index(c.finish_reason) for c in flat], dtype=np.int8))
        self._length.append(np.array([len(c.token_ids) for c in flat], dtype=np.int32))
        self._tokens.append(
            np.concatenate([np.asarray(c.token_ids, dtype=np.int32) for c in flat]) if flat else np.zeros(0, np.int32)
        )
        if flat and hasattr(flat[0], "stats"):
            self._reward.append(np.array([c.reward for c in flat], dtype=np.float32))
            self._stats.append(np.stack([c.stats for c in flat]).astype(np.int32))

    def __setstate__(self, state: dict) -> None:  # a checkpoint from before rollouts holds no _reward/_stats
        self.__dict__.update({"_reward": [], "_stats": [], **state})

    def __len__(self) -> int:
        return sum(len(p) for p in self._prompt)

    @property
    def prompt(self) -> np.ndarray:
        return np.concatenate(self._prompt) if self._prompt else np.zeros(0, np.int32)

    @property
    def eos(self) -> np.ndarray:
        return np.concatenate(self._finish) == 0 if self._finish else np.zeros(0, bool)

    @property
    def length(self) -> np.ndarray:
        return np.concatenate(self._length) if self._length else np.zeros(0, np.int32)

    @property
    def reward(self) -> np.ndarray | None:
        """Rollouts: each trajectory's reward from its environment (NaN: none); None for plain completions."""
        return np.concatenate(self._reward) if self._reward else None

    @property
    def stats(self) -> np.ndarray | None:
        """Rollouts: each trajectory's rollout.STATS counts, (n, len(STATS)); None for plain completions."""
        return np.concatenate(self._stats) if self._stats else None

    def tokens(self) -> list[np.ndarray]:
        """Each completion's token ids (views into the chunks' arrays, no copy)."""
        out: list[np.ndarray] = []
        for flat, length in zip(self._tokens, self._length):
            out += np.split(flat, np.cumsum(length)[:-1]) if len(length) else []
        return out

    def nbytes(self) -> int:
        """What the arrays hold (a checkpoint of this object is this plus a few hundred bytes)."""
        parts = (self._prompt, self._finish, self._length, self._tokens, self._reward, self._stats)
        return sum(a.nbytes for part in parts for a in part) + sum(p.nbytes for p in self.probes.values())


def pick_probes(n_prompts: int, k: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """Which of a chunk's prompts the sampler returns log-probs for (the stale-weight check's sample): k of
    them, drawn from (seed, epoch, rank), so a resumed run picks the same; all when there are fewer."""
    if k >= n_prompts:
        return np.arange(n_prompts)
    return np.sort(np.random.default_rng([seed, epoch, rank, 7]).choice(n_prompts, size=k, replace=False))


def sample_seed(seed: int, epoch: int, group: int, stream: int, chunk: int = 0) -> int:
    """Independent, far-apart sampling seeds per (epoch, engine group, stream, sampling chunk): nearby seeds
    overlap in samplers. epoch is -1 before training (the eval before it, the replay set), hence the +1.
    Streams: 0 training samples, 1 the first eval set, 10 + i eval set i > 0, 2 the engine's own seed."""
    return int(
        np.random.SeedSequence([seed, epoch + 1, group, stream] + ([chunk] if chunk else [])).generate_state(1)[0]
    )
