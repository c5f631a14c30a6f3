"""Training rows from token ids, where the tokens live, and a plan that gives every rank the same number
of steps while moving as few rows between ranks as possible.

Rows are never decoded and re-encoded: re-tokenising text can change the ids and so train on a sequence
the model never produced. EOS is appended only to completions that ended with EOS; one cut off by the
length limit (or a stop sequence) must not teach the model to stop there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

IGNORE_INDEX = -100


@dataclass
class Row:
    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, IGNORE_INDEX on the prompt
    # The sampler's log p of each label token: a probe of the stale-weight check (Learner.probe_diffs); else None.
    ref_logprobs: np.ndarray | None = None


def build_row(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], eos: bool, eos_id: int, max_len: int
) -> Row | None:
    """prompt ⊕ completion ⊕ (EOS if it ended by EOS); labels only on the completion's own tokens (a
    trajectory's context tokens, marked by rollout.context, are input only). Truncated on the right to max_len;
    None when nothing is left to learn."""
    from rft_ds.rollout import unmark

    ids, own = unmark(np.asarray(completion_ids, dtype=np.int64))
    tail = [eos_id] if eos else []
    input_ids = np.concatenate([np.asarray(prompt_ids, dtype=np.int64), ids, tail]).astype(np.int64)[:max_len]
    labels = np.concatenate(
        [np.full(len(prompt_ids), IGNORE_INDEX, np.int64), np.where(own, ids, IGNORE_INDEX), tail]
    ).astype(np.int64)[:max_len]
    if not (labels != IGNORE_INDEX).any():
        return None
    return Row(input_ids, labels)


def fits(prompt_len: np.ndarray, length: np.ndarray, eos: np.ndarray, max_len: int) -> np.ndarray:
    """Which completions make a whole row: something to learn, and prompt + completion + EOS within max_len
    (row_limit makes that every completion sampled under the run's config; one from before a forced change
    of max_new_tokens is left out, counted as rows_not_fitting, never cut). From table columns alone, so
    every rank counts the rows of every rank without their tokens."""
    tail = np.asarray(length) + np.asarray(eos, dtype=np.int64)
    return (tail > 0) & (np.asarray(prompt_len) + tail <= max_len)


def num_steps(n_rows: int, world_size: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps this epoch: the same on every rank, 0 only when nobody has any rows."""
    return math.ceil(n_rows / (world_size * micro_batch_size * grad_accum)) if n_rows else 0


def balance_plan(owner: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Which rows each rank trains on: `owner[i]` is the rank holding row i's tokens; returns, per rank, the
    row indices it gets. Pure: every rank computes the same plan from the global table.

    Ranks end within one row of each other, and the fewest rows move: a rank keeps its rows up to its
    share (its first ones, in row order), the ranks holding the most get the +1 shares, and only the
    surplus goes to ranks short of rows, in rank and row order. With fewer rows than ranks some ranks get
    none: they run their equal steps on empty micro-batches (the learner's masked rows), no row twice."""
    owner = np.asarray(owner, dtype=np.int64)
    n = len(owner)
    plan = [np.zeros(0, np.int64) for _ in range(world_size)]
    if n == 0:
        return plan
    counts = np.bincount(owner, minlength=world_size)
    share = np.full(world_size, n // world_size)
    share[np.argsort(-counts, kind="stable")[: n % world_size]] += 1
    by_owner = np.argsort(owner, kind="stable")  # one pass, not one per rank: rows in order within a rank
    rows_of = np.split(by_owner, np.cumsum(counts)[:-1])
    surplus = np.concatenate([rows_of[r][share[r] :] for r in range(world_size)])
    at = 0
    for r in range(world_size):
        kept = rows_of[r][: share[r]]
        need = share[r] - len(kept)
        plan[r] = np.concatenate([kept, surplus[at : at + need]])
        at += need
    return plan


GROUP_WINDOW = 16  # micro-batches whose rows are sorted by length together (group_by_length)


def plan_micro_batches(
    n_rows: int,
    steps: int,
    seed: int,
    epoch: int,
    rank: int,
    micro_batch_size: int,
    grad_accum: int,
    lengths: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Indices into this rank's `n_rows` rows for each of its steps * grad_accum micro-batches, in order.

    A deterministic shuffle from (seed, epoch, rank), cut into that many micro-batches of nearly equal size
    (at most micro_batch_size): every row once, none twice. A micro-batch may be empty (a rank with fewer
    rows than micro-batches): the learner still runs it, with nothing to learn, because every rank must
    take part in each of ZeRO-3's gathers.

    With `lengths` (train.group_by_length), rows of similar length share a micro-batch, so little of it is
    padding: the shuffled rows are sorted by length within windows of GROUP_WINDOW micro-batches (as HF's
    LengthGroupedSampler does with its megabatches), cut, and the micro-batches shuffled again, so a step
    is not always the window's longest rows.

    With `groups` (train.share_prompt: the prompt of each row), a prompt's rows come next to each other, so
    they share a micro-batch and the learner computes their prompt once (pack_rows); only a micro-batch
    boundary splits them. Without `groups` the plan is the same as before it existed (runs resumed from
    then keep their plan)."""
    if steps == 0:
        return []
    n_micro = steps * grad_accum
    if n_rows > n_micro * micro_batch_size:
        raise ValueError(f"{n_rows} rows do not fit {n_micro} micro-batches of {micro_batch_size}")
    rng = np.random.default_rng([seed, epoch, rank])
    perm = rng.permutation(n_rows)
    # the sort key that keeps a group together: where the group first appears in the shuffle
    together = np.arange(n_rows)
    if groups is not None and n_rows:
        _, inv = np.unique(np.asarray(groups)[perm], return_inverse=True)
        first = np.full(inv.max() + 1, n_rows)
        np.minimum.at(first, inv, np.arange(n_rows))
        together = first[inv]
        perm, together = perm[np.argsort(together, kind="stable")], np.sort(together, kind="stable")
    if lengths is None:
        return np.array_split(perm, n_micro)
    sizes = [len(mb) for mb in np.array_split(np.empty(n_rows), n_micro)]
    length = np.asarray(lengths, dtype=np.int64)[perm]
    if groups is not None and n_rows:  # a group sorts by its rows' tokens together (~ its packed length)
        total = np.zeros(n_rows, np.int64)
        np.add.at(total, together, length)
        length = total[together]
    ends = np.cumsum(sizes)
    windows = [ends[i] for i in range(GROUP_WINDOW - 1, n_micro, GROUP_WINDOW)]
    grouped = np.concatenate(
        [perm[w][np.lexsort((together[w], -length[w]))] for w in np.split(np.arange(n_rows), windows)]
    )
    micro = np.split(grouped, ends[:-1])
    return [micro[i] for i in rng.permutation(n_micro)]


def padded_tokens(
    rows: Sequence[Row], micro_batches: Sequence[np.ndarray], pack: PackSpec | None = None
) -> tuple[int, int]:
    """(tokens the learner computes, the same with padding): each micro-batch is padded to its longest
    sequence, a row or a prompt's rows packed (sequence_lengths)."""
    real = padded = 0
    for mb in micro_batches:
        if len(mb):
            seqs, _ = sequence_lengths([rows[i] for i in mb], pack)
            real, padded = real + sum(seqs), padded + len(seqs) * max(seqs)
    return int(real), int(padded)


def micro_batch_tokens(
    rows: Sequence[Row], micro_batches: Sequence[np.ndarray], pack: PackSpec | None = None
) -> np.ndarray:
    """Tokens each micro-batch computes, padding included (its sequences x the longest): what its
    activations scale with (gradient checkpointing decides on it)."""
    out = np.zeros(len(micro_batches), np.int64)
    for k, mb in enumerate(micro_batches):
        if len(mb):
            seqs, _ = sequence_lengths([rows[i] for i in mb], pack)
            out[k] = len(seqs) * max(seqs)
    return out


def label_tokens(rows: Sequence[Row], micro_batches: Sequence[np.ndarray], grad_accum: int) -> np.ndarray:
    """This rank's label tokens per optimizer step (what the loss of a step is averaged over, summed over
    ranks). A row's first position is never predicted (HF's shift), so it is not counted."""
    per_micro = [sum(int((rows[i].labels[1:] != IGNORE_INDEX).sum()) for i in idx) for idx in micro_batches]
    return (
        np.asarray(per_micro, dtype=np.int64).reshape(-1, grad_accum).sum(axis=1)
        if per_micro
        else np.zeros(0, np.int64)
    )


def rows_for_rank(
    selected: np.ndarray,
    pool: Any,
    prompts: Sequence[Sequence[int]],
    eos_id: int,
    max_len: int,
    sp: int = 1,
    prompt_len: np.ndarray | None = None,
) -> tuple[list[Row], int, int]:
    """Collective. This rank's training rows of the `selected` table rows (selection.TABLE_ROW, the same on every
    rank): those whose tokens its pool shard (pool.LocalPool) holds and balance_plan leaves here, then the
    ones the plan sends here, their token ids in one all_to_all (skipped on every rank when nothing moves;
    the sizes follow from the table). Returns (rows, rows over all ranks, row copies moved).

    sp > 1 (train.sequence_parallel): the plan deals rows to groups of sp consecutive ranks, and every rank
    of a group gets all of its group's rows, in the plan's order (each computes its shard of every row).
    prompts[pid] is read only for the rows this rank builds; prompt_len (every prompt's token count, the same
    on every rank; None: from `prompts`) decides on every rank which rows fit."""
    from rft_ds import distributed as D
    from rft_ds.faults import maybe_dump_rows

    if prompt_len is None:
        prompt_len = np.array([len(p) for p in prompts], dtype=np.int64)
    sel = selected[fits(prompt_len[selected["prompt_id"]], selected["length"], selected["eos"], max_len)]
    world, me = D.world_size(), D.rank()
    plan = balance_plan(sel["owner"] // sp, world // sp)
    plan = [plan[r // sp] for r in range(world)]

    def held_by(r: int, idx: np.ndarray) -> np.ndarray:
        return idx[sel["owner"][idx] == r]

    built = []  # (tokens, eos, row): what faults.maybe_dump_rows writes for the tests, when asked

    def row(i: int, tokens: np.ndarray) -> Row:
        pid = int(sel["prompt_id"][i])
        r = build_row(prompts[pid], tokens, bool(sel["eos"][i]), eos_id, max_len)
        built.append((tokens, bool(sel["eos"][i]), r))
        return r

    stay = held_by(me, plan[me])
    rows = [row(i, t) for i, t in zip(stay, pool.tokens_of(sel["slot"][stay]))]
    got_idx = [stay]
    moved = sum(len(plan[r]) - len(held_by(r, plan[r])) for r in range(world))
    if moved:  # the same decision on every rank: the plan is
        out = [held_by(me, plan[r]) if r != me else stay[:0] for r in range(world)]
        into = [held_by(r, plan[me]) if r != me else stay[:0] for r in range(world)]
        got = D.all_to_all_int32(
            [np.concatenate([np.zeros(0, np.int32)] + pool.tokens_of(sel["slot"][idx])) for idx in out],
            [int(sel["length"][idx].sum()) for idx in into],
        )
        for idx, flat in zip(into, got):
            rows += [row(i, t) for i, t in zip(idx, np.split(flat, np.cumsum(sel["length"][idx])[:-1]))]
            got_idx.append(idx)
    if sp > 1:  # a group's ranks hold its rows in one order: the plan's
        where = {int(i): k for k, i in enumerate(plan[me])}
        rows = [rows[k] for k in np.argsort([where[int(i)] for i in np.concatenate(got_idx)], kind="stable")]
    maybe_dump_rows(built)
    return rows, len(sel), moved


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


def prompt_length(row: Row) -> int:
    """Tokens before the first label: the row's prompt."""
    labelled = np.flatnonzero(row.labels != IGNORE_INDEX)
    return int(labelled[0]) if len(labelled) else len(row.labels)


def shared_head(row: Row) -> int:
    """Tokens of the row's prompt that its packed sequence shares with the other rows of the prompt: all but
    the last, which each row keeps so that it predicts the row's first label (none without a prompt)."""
    return max(prompt_length(row) - 1, 0)


def _prompt_groups(rows: Sequence[Row]) -> list[list[int]]:
    """Row indices grouped by identical prompt tokens, in order of first appearance; a row with no prompt
    token stays alone (its first label would otherwise be predicted from another row's last token)."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        p = prompt_length(r)
        groups.setdefault(r.input_ids[:p].tobytes() if p else ("alone", i), []).append(i)
    return list(groups.values())


def prompt_groups(rows: Sequence[Row]) -> np.ndarray:
    """A number per row, the same for rows with the same prompt tokens (plan_micro_batches' groups)."""
    out = np.zeros(len(rows), np.int64)
    for g, members in enumerate(_prompt_groups(rows)):
        out[members] = g
    return out


@dataclass(frozen=True)
class PackSpec:
    """How the learner may pack a prompt's rows (train.share_prompt). max_len: no packed sequence is longer
    (train.max_seq_length, as long as a row may be: memory and attention per sequence stay as without
    packing). attn_ratio: the model's attention FLOPs per (query, key) pair over its other FLOPs per token
    (2 * layers * heads * head_dim / body parameters), to price a micro-batch's layouts (layout_cost).
    masked_cost: how much more an attention FLOP costs under an explicit mask than the matmuls' FLOPs
    (measured: ~6 on an H200, where a mask rules out the flash kernel; 1 on CPU). unmasked_share: the part
    of the square computed without a mask (0.5: sdpa's causal kernels; 1: eager attention)."""

    max_len: int
    attn_ratio: float
    masked_cost: float = 1.0
    unmasked_share: float = 0.5


def pack_plan(rows: Sequence[Row], max_len: int) -> list[list[int]]:
    """Row indices per packed sequence: a prompt's rows in order, a new sequence (the prompt again) whenever
    the next row would make it longer than max_len; a row without a prompt token alone."""
    seqs = []
    for members in _prompt_groups(rows):
        head = shared_head(rows[members[0]])
        cur, length = [], head
        for i in members:
            tail = len(rows[i].input_ids) - head
            if cur and length + tail > max_len:
                seqs.append(cur)
                cur, length = [], head
            cur.append(i)
            length += tail
        seqs.append(cur)
    return seqs


def _packed_length(rows: Sequence[Row], members: Sequence[int]) -> int:
    head = shared_head(rows[members[0]])
    return head + sum(len(rows[i].input_ids) - head for i in members)


def layout_cost(lengths: Sequence[int], pack: PackSpec, packed: bool) -> float:
    """What a micro-batch of sequences of these lengths costs, right-padded to the longest (padding is
    computed too), in tokens: each sequence's tokens plus its attention. With a mask (packed, or padding)
    sdpa computes the whole square, at the masked kernel's cost; without one (rows of equal length) the
    causal kernel computes half of it."""
    width = max(lengths)
    masked = packed or min(lengths) < width
    attention = pack.attn_ratio * width * width * (pack.masked_cost if masked else pack.unmasked_share)
    return len(lengths) * (width + attention)


def sequence_lengths(rows: Sequence[Row], pack: PackSpec | None) -> tuple[list[int], bool]:
    """The lengths of the sequences the learner computes for this micro-batch, and whether they are packed:
    packed (pack_plan) when that costs less than row by row (layout_cost), so packing never slows a step:
    long completions of one prompt would make fewer but much longer sequences, whose attention grows with
    the square of their length."""
    plain = [len(r.input_ids) for r in rows]
    if pack is None or len(rows) < 2:
        return plain, False
    packed = [_packed_length(rows, m) for m in pack_plan(rows, pack.max_len)]
    if len(packed) < len(plain) and layout_cost(packed, pack, True) < layout_cost(plain, pack, False):
        return packed, True
    return plain, False


def layout(rows: Sequence[Row], pad_id: int, pack: PackSpec | None) -> tuple[dict[str, np.ndarray], list[int]]:
    """The learner's batch for a micro-batch: pack_rows where sequence_lengths says packing pays, else
    collate (a 2D attention mask); and the order the rows' label tokens come out in."""
    if sequence_lengths(rows, pack)[1]:
        return pack_rows(rows, pad_id, pack.max_len)
    return collate(rows, pad_id), list(range(len(rows)))


def pack_rows(rows: Sequence[Row], pad_id: int, max_len: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Rows of one prompt as one sequence, so the prompt is computed once, not once per row
    (train.share_prompt): the prompt but its last token, then per row that last token and the row's
    completion. A prefix-tree mask lets each segment see the shared prefix and itself, and each token keeps
    its position in its own row, so every label is predicted from exactly what it sees in its own row: the
    same loss. Each segment's first token carries no label, so no label is predicted across segments. A
    prompt with more rows than fit max_len tokens makes several sequences (pack_plan).

    Returns the batch (input_ids, labels, position_ids: (B, L); attention_mask: (B, 1, L, L) bool, True =
    may attend; right-padded, a padding token sees only itself) and the order of the rows in it: their
    label tokens come out row-major in that order."""
    seqs, order = [], []
    for members in pack_plan(rows, max_len):
        head = shared_head(rows[members[0]])
        ids, labels = [rows[members[0]].input_ids[:head]], [rows[members[0]].labels[:head]]
        pos, seg = [np.arange(head)], [np.zeros(head, np.int64)]
        for k, i in enumerate(members, start=1):
            r = rows[i]
            ids.append(r.input_ids[head:])
            labels.append(r.labels[head:])
            pos.append(np.arange(head, len(r.input_ids)))
            seg.append(np.full(len(r.input_ids) - head, k))
            order.append(i)
        seqs.append(tuple(np.concatenate(x) for x in (ids, labels, pos, seg)))
    width = max(len(s[0]) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(seqs), width), dtype=np.int64)
    segment = np.full((len(seqs), width), -1, dtype=np.int64)  # 0: the shared prefix, k: row k, -1: padding
    for b, (i, lab, p, g) in enumerate(seqs):
        input_ids[b, : len(i)], labels[b, : len(lab)], position_ids[b, : len(p)], segment[b, : len(g)] = i, lab, p, g
    q, kv = segment[:, :, None], segment[:, None, :]
    causal = np.tril(np.ones((width, width), dtype=bool))
    mask = causal & (q >= 0) & ((kv == q) | (kv == 0) & (q > 0))
    mask |= np.eye(width, dtype=bool)  # a padding query sees itself: no empty softmax row (NaN in backward)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
    }, order
