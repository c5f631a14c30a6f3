"""This rank's pool shard: the token ids of the completions it sampled that are still in the pools.

The global score table (selection.TABLE_ROW) says which completions the pools hold; each row names its owner
rank and its slot there. Only the owner keeps the tokens, so a rank's pool memory is its share of the
completions, and the tokens cross ranks only for the few rows the balancing plan moves (experience.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rft_ds.selection import TABLE_ROW, table_rows


class LocalPool:
    """Rows of the global table this rank owns (TABLE_ROW, sorted by slot) and their token ids."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.rows = np.zeros(0, TABLE_ROW)
        self.tokens: list[np.ndarray] = []
        self.next_slot = 0  # slots only grow: a slot names one completion for the whole run

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        prompt_id: Sequence[int],
        score: np.ndarray,
        eos: Sequence[bool],
        tokens: Sequence[Sequence[int]],
        step: int,
    ) -> np.ndarray:
        """Take ownership of newly scored completions; returns their table rows (the slots they got)."""
        toks = [np.array(t, dtype=np.int32) for t in tokens]  # copies: no view keeps a sampling chunk alive
        rows = table_rows(
            prompt_id, score, eos, toks, step=step, owner=self.rank, slot=self.next_slot + np.arange(len(toks))
        )
        self.rows = np.concatenate([self.rows, rows])
        self.tokens += toks
        self.next_slot += len(toks)
        return rows

    def keep_only(self, pool: np.ndarray) -> None:
        """Prune to the rows the global pool still holds with this rank as owner, and take their columns
        from it (dedup gives a kept row the newest step of its copies): the shard is what a resume rebuilds
        the pool from."""
        mine = np.sort(pool[pool["owner"] == self.rank], order="slot")
        keep = np.isin(self.rows["slot"], mine["slot"])
        if not keep.all():
            self.tokens = [t for t, k in zip(self.tokens, keep) if k]
        self.rows = mine.copy()  # the kept slots, in slot order (only step can differ from ours)

    def tokens_of(self, slots: np.ndarray) -> list[np.ndarray]:
        idx = np.searchsorted(self.rows["slot"], slots)
        if len(slots) and (idx.max() >= len(self.rows) or (self.rows["slot"][idx] != slots).any()):
            raise KeyError(f"rank {self.rank}'s pool shard lacks slots the global table gives it")
        return [self.tokens[i] for i in idx]

    # A checkpoint holds the tokens as one flat array: a pickle of 100k small arrays is slow and large.
    def __getstate__(self) -> dict[str, Any]:
        flat = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int32)
        return {"rank": self.rank, "rows": self.rows, "flat": flat, "next_slot": self.next_slot}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.rank, self.rows, self.next_slot = state["rank"], state["rows"], state["next_slot"]
        self.tokens = np.split(state["flat"], np.cumsum(self.rows["length"])[:-1]) if len(self.rows) else []

    @staticmethod
    def merge(shards: Sequence[LocalPool], rank: int) -> LocalPool:
        """One shard from several (an elastic resume: this rank takes over those old ranks' shards), owned by
        `rank` with fresh slots in (old owner, old slot) order."""
        out = LocalPool(rank)
        for shard in shards:
            if len(shard):
                r = shard.rows
                out.add(r["prompt_id"], r["score"], r["eos"], shard.tokens, step=0)
                out.rows["step"][-len(r) :] = r["step"]
        return out
