"""Replay's pure parts (rft_ds/replay.py), without a process group: the set's arrays, the epoch's draw, and
the deal that keeps every rank's step count."""

import numpy as np
import pytest

from rft_ds import replay


def test_pack_orders_by_prompt_and_completions_round_trip():
    r = replay.pack([2, 0, 1], [True, False, True], [[7, 8], [], [5]])
    assert r["prompt"].tolist() == [0, 1, 2] and r["eos"].tolist() == [False, True, True]
    assert r["length"].tolist() == [0, 1, 2] and r["tokens"].dtype == np.int32
    assert [t.tolist() for t in replay.completions(r, np.array([2, 0, 1]))] == [[7, 8], [], [5]]
    empty = replay.pack([], [], [])
    assert len(empty["prompt"]) == 0 and replay.completions(empty, np.zeros(0, np.int64)) == []


@pytest.mark.parametrize("n_selected, n_set, share, want", [
    (90, 100, 0.1, 10),  # 10 of the epoch's 100 rows
    (300, 100, 0.2, 75),
    (1000, 20, 0.5, 20),  # at most the whole set
    (0, 100, 0.1, 0),  # nothing selected: no replay-only steps
    (90, 100, 0.0, 0),
])
def test_draw_is_the_share_of_the_epochs_rows(n_selected, n_set, share, want):
    picks = replay.draw(n_selected, n_set, share, seed=1, epoch=3)
    assert len(picks) == want and len(set(picks.tolist())) == want and (picks < n_set).all()


def test_draw_is_seeded_by_seed_and_epoch():
    a = replay.draw(500, 1000, 0.1, seed=1, epoch=3)
    assert (a == replay.draw(500, 1000, 0.1, seed=1, epoch=3)).all()
    assert not np.array_equal(a, replay.draw(500, 1000, 0.1, seed=1, epoch=4))
    assert not np.array_equal(a, replay.draw(500, 1000, 0.1, seed=2, epoch=3))


@pytest.mark.parametrize("counts, n", [([5, 5, 4, 4], 3), ([3, 4, 4, 3], 7), ([0, 0], 5), ([2], 4), ([9, 8, 9], 0)])
def test_deal_ends_every_group_within_one_row(counts, n):
    parts = replay.deal(counts, n)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # every position once
    totals = [c + len(p) for c, p in zip(counts, parts)]
    assert max(totals) - min(totals) <= max(1, max(counts) - min(counts) - n)
    assert all(len(p) for c, p in zip(counts, parts) if c == min(counts) and n >= len(counts))


def test_deal_fills_the_short_groups_first():
    assert [p.tolist() for p in replay.deal([5, 4, 5, 4], 2)] == [[], [0], [], [1]]
