"""The run state: everything a resume restores, and nothing else, and the order of an epoch's stages.

    sample -> score -> train -> sync -> eval -> end -> (the next epoch's) sample

A run's position is (epoch, stage, cursor): the next thing it does. A checkpoint is named by it, and a stage
function never sets the next stage itself: the recipe's loop reads STAGES (`advance`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from rft_ds.pool import LocalPool
from rft_ds.selection import TABLE_ROW

STAGES = ("sample", "score", "train", "sync", "eval", "end")  # an epoch's stages, in order
# What checkpoints of state format 3 numbered their stages by (names `epoch_<e>.s<k>.c<c>`, meta.json
# "position" [e, k, c]); score had no number of its own: it ran inside sample.
FORMAT3_STAGES = ("sample", "train", "sync", "eval", "end")
PER_RANK = ("local", "pool", "table")  # RunState fields that are not rank 0's to save


@dataclass
class RunState:
    """Everything a resume restores, and nothing else; the recipe's `save_checkpoint` and `load_checkpoint`
    write and read exactly these fields. The shared fields are equal on every rank (rank 0 saves them); `pool`
    and `local` are this rank's own (every rank saves its own, beside its RNG states); `table` is rebuilt
    from every rank's `pool` on resume, never saved."""

    run_id: str
    prompts_digest: str  # the pools are keyed by prompt position: a resume with other prompts is refused
    shard: str = "interleaved"  # how prompts are dealt to engine groups (data.shard when the run started)
    # micro-batches grouped by row length (train.group_by_length when the run started; runs from before it: no)
    group_by_length: bool = False
    # a prompt's rows next to each other in the plan (train.share_prompt when the run started, and the model
    # allowed it; runs from before it: no)
    share_prompt: bool = False
    epoch: int = 0  # the epoch in progress
    stage: str = "sample"  # the next stage to run in it (STAGES)
    cursor: int = 0  # position inside the stage: sampling chunks done, or micro-batches trained
    record: dict = field(default_factory=dict)  # the epoch in progress: its metrics so far
    history: list = field(default_factory=list)  # one record per finished epoch (metrics.jsonl)
    eval_before: dict | None = None
    best: dict | None = None  # {"epoch", "metric", "value", "run_id"} of best_model/
    optimizer_steps: int = 0  # over the whole run (train.save_every_steps)
    # this rank's: the grow step's samples (until scored), the stale check's probes (until compared), losses so far
    local: dict = field(default_factory=dict)
    pool: LocalPool = field(default_factory=LocalPool)  # this rank's: tokens of the pool rows it owns
    # the base model's answers to data.replay_prompts (replay.pack, + "digest" of those prompts), on every rank
    replay: dict | None = None
    table: np.ndarray = field(default_factory=lambda: np.zeros(0, TABLE_ROW))  # the pools' scores, on every rank
    # The prompt draw (prompt_draw.py), the same on every rank: where the next grow step's draw starts (pass,
    # offset; data.prompts_per_grow_step), the prompts the latest grow step drew (dataset positions; None:
    # every prompt), and each prompt's history for the skip rules (prompt_draw.HISTORY; None: no rule on)
    draw_pass: int = 0
    draw_offset: int = 0
    drawn: np.ndarray | None = None
    prompt_history: np.ndarray | None = None

    def shared(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in PER_RANK}

    def position(self) -> tuple[int, str, int]:
        return self.epoch, self.stage, self.cursor


def advance(st: RunState) -> None:
    """The next stage in STAGES, at its start; after "end", the next epoch's first stage with an empty record
    (the closed one is in st.history)."""
    if st.stage == STAGES[-1]:
        st.epoch, st.stage, st.cursor, st.record, st.local = st.epoch + 1, STAGES[0], 0, {}, {}
    else:
        st.stage, st.cursor = STAGES[STAGES.index(st.stage) + 1], 0


def stage_of(saved: int | str) -> str | None:
    """A stage as a checkpoint names it: its name, or (state format 3) its number in FORMAT3_STAGES; None when
    it is neither."""
    if isinstance(saved, str):
        return saved if saved in STAGES else None
    return FORMAT3_STAGES[saved] if 0 <= saved < len(FORMAT3_STAGES) else None


def elastic(position: tuple[int, int | str, int] | list) -> bool:
    """Whether a checkpoint at this run position resumes on another world size: at an epoch's start, or after
    its training (sync, eval, end). Inside sampling, scoring or training the position is per rank (its prompt
    shard, its unscored samples, its micro-batch plan), so only the world size that wrote it can continue."""
    _, stage, cursor = position
    stage = stage_of(stage)
    return (stage == "sample" and cursor == 0) or stage in ("sync", "eval", "end")
