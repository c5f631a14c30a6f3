"""Training rows from token ids, and a batch plan that gives every rank the same number of steps.

Rows are never decoded and re-encoded: re-tokenising text can change the ids and so train on a sequence
the model never produced. EOS is appended only to completions that ended with EOS; one cut off by the
length limit (or a stop sequence) must not teach the model to stop there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

IGNORE_INDEX = -100


@dataclass
class Row:
    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, IGNORE_INDEX on the prompt
    # The sampler's log p of each label token, for a completion this rank sampled this epoch (the
    # stale-weight check); None otherwise.
    ref_logprobs: np.ndarray | None = None


def build_row(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos: bool, eos_id: int,
              max_len: int) -> Row | None:
    """prompt ⊕ completion ⊕ (EOS if it ended by EOS); labels only on the completion part.
    Truncated on the right to max_len; None when nothing is left to learn."""
    completion = list(completion_ids) + ([eos_id] if eos else [])
    ids = np.asarray(list(prompt_ids) + completion, dtype=np.int64)[:max_len]
    labels = np.asarray([IGNORE_INDEX] * len(prompt_ids) + completion, dtype=np.int64)[:max_len]
    if not (labels != IGNORE_INDEX).any():
        return None
    return Row(ids, labels)


def num_steps(n_rows: int, world_size: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps this epoch: the same on every rank, 0 only when nobody has any rows."""
    return math.ceil(n_rows / (world_size * micro_batch_size * grad_accum)) if n_rows else 0


def plan_micro_batches(n_rows: int, seed: int, epoch: int, rank: int, world_size: int, micro_batch_size: int,
                       grad_accum: int) -> list[np.ndarray]:
    """Row indices of this rank's micro-batches, in order.

    A deterministic shuffle from (seed, epoch); the last global batch is filled by wrapping around the
    shuffled order (as DistributedSampler pads), so every rank runs num_steps * grad_accum full
    micro-batches, including a rank that would otherwise have had no rows at all.
    """
    steps = num_steps(n_rows, world_size, micro_batch_size, grad_accum)
    if steps == 0:
        return []
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    slots = perm[np.arange(steps * grad_accum * world_size * micro_batch_size) % n_rows]
    mine = slots.reshape(steps * grad_accum, world_size, micro_batch_size)[:, rank, :]
    return list(mine)


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest row; padding is masked out of attention and labels."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r.input_ids)] = r.input_ids
        labels[i, : len(r.labels)] = r.labels
        attention[i, : len(r.input_ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
