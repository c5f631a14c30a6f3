"""The prompt draw and the skip rules (rft_ds/prompt_draw.py): pure, no process group."""

import numpy as np
import pytest

from rft_ds.prompt_draw import SkipRules, draw, new_history, pass_order, skipped, update_history
from rft_ds.selection import TABLE_ROW, select_epoch, solved_prompts


def test_no_budget_and_no_rule_is_every_prompt_in_order():
    d = draw(10, None, 1, 0, 0, np.zeros(10, bool))
    assert d.ids.tolist() == list(range(10)) and (d.pass_no, d.offset) == (0, 0) and len(d.passed_over) == 0


def test_budgets_walk_seeded_passes_and_cover_each_pass_once():
    n, budget, seed = 23, 5, 7
    pass_no, offset, seen = 0, 0, []
    for _ in range(9):  # 45 prompts: one pass of 23, then 22 of the next
        d = draw(n, budget, seed, pass_no, offset, np.zeros(n, bool))
        assert len(d.ids) == budget and len(set(d.ids.tolist())) == budget
        seen += d.ids.tolist()
        pass_no, offset = d.pass_no, d.offset
    first = pass_order(n, seed, 0).tolist()
    assert seen[:23] == first and sorted(seen[:23]) == list(range(n))  # pass 0 exactly, in its order
    assert seen[23:] == pass_order(n, seed, 1).tolist()[:22]  # then pass 1 (a new permutation)
    assert first != pass_order(n, seed, 1).tolist() and first != pass_order(n, seed + 1, 0).tolist()
    assert (pass_no, offset) == (1, 22)
    # the same position gives the same draw: what a resume relies on
    again = draw(n, budget, seed, 1, 20, np.zeros(n, bool))
    assert again.ids.tolist() == draw(n, budget, seed, 1, 20, np.zeros(n, bool)).ids.tolist()


def test_a_draw_across_a_pass_boundary_never_takes_a_prompt_twice():
    n = 6
    for seed in range(40):
        d = draw(n, n, seed, 0, 4, np.zeros(n, bool))  # 2 left in pass 0, then 4 from pass 1
        assert len(set(d.ids.tolist())) == len(d.ids)
        met = set(pass_order(n, seed, 0)[4:].tolist()) | set(pass_order(n, seed, 1)[:4].tolist())
        assert set(d.ids.tolist()) == met and (d.pass_no, d.offset) == (1, 4)
    assert any(len(draw(n, n, seed, 0, 4, np.zeros(n, bool)).ids) < n for seed in range(40))  # a repeat was met


def test_skipped_prompts_are_passed_over_and_the_budget_refilled():
    n = 20
    skip = np.zeros(n, bool)
    skip[pass_order(n, 3, 0)[:4]] = True  # the pass's first four prompts are skipped
    d = draw(n, 5, 3, 0, 0, skip)
    order = pass_order(n, 3, 0)
    assert d.ids.tolist() == order[4:9].tolist()  # refilled from the next prompts of the pass
    assert sorted(d.passed_over.tolist()) == sorted(order[:4].tolist()) and d.offset == 9
    # everything skipped: an empty draw that covered one pass's worth of positions, no endless loop
    d = draw(n, 5, 3, 0, 7, np.ones(n, bool))
    assert len(d.ids) == 0 and (d.pass_no, d.offset) == (1, 7)
    # no budget: every prompt not skipped, in dataset order
    d = draw(n, None, 3, 0, 0, skip)
    assert d.ids.tolist() == [i for i in range(n) if not skip[i]]


def test_history_streaks_and_the_skip_rules():
    hist = new_history(4)
    # grow step 0: prompt 0 all pass, 1 none pass, 2 mixed, 3 not sampled
    pids = np.array([0, 0, 1, 1, 2, 2])
    hist = update_history(hist, pids, np.array([1.0, 1.0, 0.0, 0.2, 1.0, 0.0]), 1.0, 0)
    assert hist["attempts"].tolist() == [1, 1, 1, 0] and hist["last_drawn"].tolist() == [0, 0, 0, -1]
    assert hist["solved_streak"].tolist() == [1, 0, 0, 0] and hist["failed_streak"].tolist() == [0, 1, 0, 0]
    rules = SkipRules(solved=2, hopeless=1)
    solved, hopeless = skipped(hist, rules, 1)
    assert solved.tolist() == [False] * 4 and hopeless.tolist() == [False, True, False, False]
    hist = update_history(hist, np.array([0, 0]), np.array([1.0, 1.0]), 1.0, 1)  # prompt 0 solved again
    solved, _ = skipped(hist, rules, 2)
    assert solved.tolist() == [True, False, False, False]
    # a pass breaks a failure streak, a failure a solved streak
    hist = update_history(hist, np.array([0, 1]), np.array([0.0, 1.0]), 1.0, 2)
    assert hist["solved_streak"][0] == 0 and hist["failed_streak"][1] == 0
    # retry: a prompt skipped and not sampled for retry_after grow steps comes back
    h = update_history(new_history(2), np.array([0, 1]), np.array([0.0, 0.0]), 0.5, 3)
    rules = SkipRules(hopeless=1, retry_after=2)
    assert skipped(h, rules, 4)[1].tolist() == [True, True]
    assert skipped(h, rules, 5)[1].tolist() == [False, False]
    # the streak saturates instead of wrapping
    for step in range(300):
        h = update_history(h, np.array([0]), np.array([0.0]), 0.5, step)
    assert h["failed_streak"][0] == 255 and h["attempts"][0] == 301


def test_reject_both_ends_drops_prompts_whose_rows_all_pass():
    table = np.zeros(6, TABLE_ROW)
    table["prompt_id"] = [0, 0, 1, 1, 2, 2]
    table["score"] = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert solved_prompts(table["prompt_id"], table["score"], 1.0).tolist() == [True, True] + [False] * 4
    keep, _ = select_epoch(table, 0.5, "per_prompt", 1, 0.5, None, None, 1.0)
    assert keep.tolist() == [False, False, True, False, False, False]  # prompt 0 solved, prompt 2 nothing passes
    keep, _ = select_epoch(table, 0.5, "per_prompt", 1, 0.5, None, None)
    assert keep[:2].all()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"method": {"skip_solved": 0}}, "method.skip_solved must be null or an int >= 1, got 0"),
        ({"method": {"skip_hopeless": 2}}, "method.skip_hopeless needs a pass threshold: set method.pass_score"),
        ({"selection": {"drop_solved": True}}, "selection.drop_solved needs a pass threshold"),
        ({"data": {"prompts_per_grow_step": 0}}, "data.prompts_per_grow_step must be null or an int >= 1"),
    ],
)
def test_bad_draw_settings_are_one_line_errors(override, message):
    from rft_ds.config import ConfigError, RFTRunConfig, validate

    base = {"model": {"model_path": "m"}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(RFTRunConfig.from_dict({**base, **override}))
