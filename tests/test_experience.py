import numpy as np
import pytest

from rft_ds.experience import (
    IGNORE_INDEX,
    balance_plan,
    build_row,
    collate,
    fits,
    label_tokens,
    num_steps,
    plan_micro_batches,
)


def test_labels_masked_on_prompt_and_eos_appended_only_when_finished_by_eos():
    r = build_row([10, 11, 12], [20, 21], eos=True, eos_id=2, max_len=64)
    assert r.input_ids.tolist() == [10, 11, 12, 20, 21, 2]
    assert r.labels.tolist() == [IGNORE_INDEX] * 3 + [20, 21, 2]
    r = build_row([10, 11, 12], [20, 21], eos=False, eos_id=2, max_len=64)  # hit the length limit
    assert r.input_ids.tolist() == [10, 11, 12, 20, 21]
    assert r.labels.tolist() == [IGNORE_INDEX] * 3 + [20, 21]


def test_truncation_and_nothing_to_learn():
    r = build_row([1, 2, 3], [4, 5, 6], eos=True, eos_id=0, max_len=5)
    assert r.input_ids.tolist() == [1, 2, 3, 4, 5] and r.labels.tolist() == [IGNORE_INDEX] * 3 + [4, 5]
    assert build_row([1, 2, 3], [4], eos=False, eos_id=0, max_len=3) is None
    assert build_row([1], [], eos=False, eos_id=0, max_len=8) is None
    assert build_row([1], [], eos=True, eos_id=0, max_len=8).labels.tolist() == [IGNORE_INDEX, 0]


def test_collate_pads_right_and_masks_padding():
    rows = [build_row([1], [2, 3], True, 9, 16), build_row([1, 1, 1], [4], False, 9, 16)]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9], [1, 1, 1, 4]]
    rows = [build_row([1], [2], False, 9, 16), build_row([1, 1, 1], [4], False, 9, 16)]
    b = collate(rows, pad_id=0)
    assert b["input_ids"][0].tolist() == [1, 2, 0, 0]
    assert b["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert b["labels"][0].tolist() == [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]


def test_fits_is_a_whole_row_with_something_to_learn():
    """fits: build_row makes a row from it and cuts nothing (a completion that would be cut is left out)."""
    for plen in (1, 3, 8):
        for length in (0, 1, 4, 5):
            for eos in (False, True):
                row = build_row([1] * plen, [2] * length, eos, 9, 8)
                want = row is not None and len(row.input_ids) == plen + length + eos
                assert fits(np.array([plen]), np.array([length]), np.array([eos]), 8)[0] == want, (plen, length, eos)


def check_plan(owner, world):
    plan = balance_plan(np.asarray(owner), world)
    n = len(owner)
    sizes = [len(p) for p in plan]
    assert sorted(np.concatenate(plan).tolist()) == list(range(n))  # each row exactly once
    assert max(sizes) - min(sizes) <= 1
    counts = np.bincount(owner, minlength=world) if n else np.zeros(world, int)
    moved = sum(int((np.asarray(owner)[p] != r).sum()) for r, p in enumerate(plan))
    shares = sorted(sizes, reverse=True)
    # the fewest moves for balanced shares: what no assignment can avoid
    least = sum(max(0, c - s) for c, s in zip(sorted(counts, reverse=True), shares))
    assert moved == least, (owner, plan)
    return plan


def test_balance_plan_moves_only_the_surplus():
    assert [p.tolist() for p in check_plan([0, 0, 0, 0, 1, 1], 2)] == [[0, 1, 2], [4, 5, 3]]
    assert [p.tolist() for p in check_plan([1, 1, 1], 2)] == [[2], [0, 1]]  # rank 1 holds more: its the +1
    assert [p.tolist() for p in check_plan([0, 1, 0, 1], 2)] == [[0, 2], [1, 3]]  # balanced: nothing moves
    assert [p.tolist() for p in check_plan([], 3)] == [[], [], []]
    assert [p.tolist() for p in check_plan([2], 3)] == [[], [], [0]]  # fewer rows than ranks: some get none
    rng = np.random.default_rng(0)
    for _ in range(200):
        world = int(rng.integers(1, 9))
        owner = (
            rng.integers(0, world, int(rng.integers(0, 40)))
            if rng.random() < 0.5
            else np.full(int(rng.integers(0, 20)), int(rng.integers(0, world)))
        )  # all on one rank (tensor parallel)
        check_plan(owner, world)


def test_balance_plan_is_pure():
    owner = np.random.default_rng(3).integers(0, 4, 101)
    a, b = balance_plan(owner, 4), balance_plan(owner.copy(), 4)
    assert all((x == y).all() for x, y in zip(a, b))


def test_equal_steps_per_rank_and_no_row_twice():
    for n_rows in (0, 1, 3, 7, 16, 17, 100):
        for world in (1, 2, 3, 8):
            steps = num_steps(n_rows, world, 4, 2)
            plan = balance_plan(np.zeros(n_rows, np.int64), world)
            plans = [plan_micro_batches(len(plan[r]), steps, 1, 0, r, 4, 2) for r in range(world)]
            assert len({len(p) for p in plans}) == 1  # the same number of micro-batches on every rank
            assert len(plans[0]) == steps * 2
            assert all(len(mb) <= 4 for p in plans for mb in p)
            for r, p in enumerate(plans):
                if p:
                    used = np.concatenate(p).tolist()
                    assert sorted(used) == list(range(len(plan[r])))  # every row exactly once
                    sizes = [len(mb) for mb in p]
                    assert max(sizes) - min(sizes) <= 1  # spread evenly: no full micro-batch next to an empty one


def test_shuffle_deterministic_per_seed_epoch_and_rank():
    a = plan_micro_batches(50, 13, 7, 3, 0, 4, 1)
    b = plan_micro_batches(50, 13, 7, 3, 0, 4, 1)
    c = plan_micro_batches(50, 13, 7, 4, 0, 4, 1)
    d = plan_micro_batches(50, 13, 7, 3, 1, 4, 1)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c)) and any((x != y).any() for x, y in zip(a, d))
    assert [len(mb) for mb in plan_micro_batches(0, 2, 7, 3, 0, 4, 1)] == [0, 0]  # a rank with no rows still steps
    with pytest.raises(ValueError, match="do not fit"):
        plan_micro_batches(9, 2, 7, 3, 0, 4, 1)


def test_label_tokens_per_step():
    rows = [
        build_row([1, 1], [5, 6, 7], True, 9, 64),
        build_row([1], [5], False, 9, 64),
        build_row([1, 1, 1], [5, 6], False, 9, 64),
    ]  # 4, 1 and 2 label tokens
    assert label_tokens(
        rows, [np.array([0, 1]), np.array([2]), np.array([], dtype=np.int64), np.array([1])], 2
    ).tolist() == [7, 1]


def test_group_by_length_packs_similar_rows_and_keeps_every_rule():
    """train.group_by_length: every row once, sizes as without it (so every rank still runs the same
    number of steps), deterministic, and much less padding on rows of mixed lengths."""
    from rft_ds.experience import GROUP_WINDOW, padded_tokens

    rng = np.random.default_rng(0)
    n, micro, ga = 200, 8, 2
    lengths = rng.integers(20, 600, n)
    rows = [build_row([1] * 10, [5] * int(k - 11), True, 9, 1024) for k in lengths]
    assert [len(r.input_ids) for r in rows] == lengths.tolist()
    steps = num_steps(n, 1, micro, ga)
    plain = plan_micro_batches(n, steps, 3, 1, 0, micro, ga)
    grouped = plan_micro_batches(n, steps, 3, 1, 0, micro, ga, lengths)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(n))  # every row once
    assert sorted(len(mb) for mb in grouped) == sorted(len(mb) for mb in plain)
    assert all((x == y).all() for x, y in zip(grouped, plan_micro_batches(n, steps, 3, 1, 0, micro, ga, lengths)))
    real, pad_plain = padded_tokens(rows, plain)
    real2, pad_grouped = padded_tokens(rows, grouped)
    assert real == real2 == lengths.sum()
    assert 1 - real / pad_grouped < 0.1 < 0.4 < 1 - real / pad_plain, (1 - real / pad_grouped, 1 - real / pad_plain)
    # a micro-batch holds rows of one window of GROUP_WINDOW micro-batches of the shuffle, not the whole epoch's
    # longest together: the micro-batches' order is shuffled too, so steps mix long and short
    maxima = [lengths[mb].max() for mb in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    assert GROUP_WINDOW * micro < n
    assert [len(mb) for mb in plan_micro_batches(0, 2, 7, 3, 0, 4, 1, [])] == [0, 0]  # still steps with no rows
