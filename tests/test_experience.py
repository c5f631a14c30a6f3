import numpy as np

from rft_ds.experience import IGNORE_INDEX, build_row, collate, num_steps, plan_micro_batches


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


def test_equal_steps_per_rank_including_rank_without_rows():
    for n_rows in (0, 1, 3, 7, 16, 17, 100):
        for world in (1, 2, 3, 8):
            plans = [plan_micro_batches(n_rows, 1, 0, r, world, 4, 2) for r in range(world)]
            assert len({len(p) for p in plans}) == 1
            assert len(plans[0]) == num_steps(n_rows, world, 4, 2) * 2
            assert all(len(mb) == 4 for p in plans for mb in p)
            if n_rows:
                used = np.concatenate([mb for p in plans for mb in p])
                assert set(used.tolist()) == set(range(n_rows))  # every row trained on at least once


def test_one_row_two_ranks():
    plans = [plan_micro_batches(1, 0, 0, r, 2, 8, 1) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 1


def test_shuffle_deterministic_per_seed_and_epoch():
    a = plan_micro_batches(50, 7, 3, 0, 2, 4, 1)
    b = plan_micro_batches(50, 7, 3, 0, 2, 4, 1)
    c = plan_micro_batches(50, 7, 4, 0, 2, 4, 1)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
