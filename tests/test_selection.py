"""Schedule and selection: pure functions, no process group."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rft_ds.selection import (
    TABLE_ROW,
    canonical,
    cap_per_prompt,
    completion_digest,
    from_wire,
    parse_pool_policy,
    schedule,
    select,
    select_epoch,
    selection_digest,
    table_rows,
    to_wire,
    update_pool,
)

# ---- schedule -------------------------------------------------------------------------------------


def test_schedule_reaches_end_percentile_on_last_improve_step():
    ps = [schedule(e, 0.7, 0.95, 4).percentile for e in range(8)]
    assert ps[0] == pytest.approx(0.7) and ps[4] == pytest.approx(0.7)
    assert ps[3] == 0.95 and ps[7] == 0.95  # exactly, not 0.8875
    assert ps[:4] == sorted(ps[:4])


def test_schedule_is_not_trlx_off_by_one():
    trlx = [0.7 + (0.95 - 0.7) / 4 * (e % 4) for e in range(4)]
    assert max(trlx) == pytest.approx(0.8875)  # what trlx does: never reaches the end
    assert max(schedule(e, 0.7, 0.95, 4).percentile for e in range(4)) == 0.95


def test_grow_exactly_every_n_improve_steps():
    for n in (1, 2, 3, 4, 7):
        grows = [e for e in range(30) if schedule(e, 0.7, 0.95, n).grow]
        assert grows == list(range(0, 30, n))


def test_n_improve_steps_1_grows_every_epoch_at_end_percentile():
    steps = [schedule(e, 0.7, 0.95, 1) for e in range(5)]
    assert all(s.grow for s in steps)
    assert all(s.percentile == 0.95 for s in steps)


def test_schedule_linear_steps():
    ps = [schedule(e, 0.5, 0.8, 4).percentile for e in range(4)]
    assert np.allclose(np.diff(ps), 0.1)


# ---- selection ------------------------------------------------------------------------------------


def sel(pids, scores, p=0.7, **kw):
    keep, _ = select(np.array(pids), np.array(scores, float), p, **kw)
    return keep.tolist()


def test_ties_at_top_are_kept():
    # quantile at 0.95 of [0,1,1,1] is 1.0: trlx's threshold+1e-6 would drop all three successes
    assert sel([0] * 4, [0, 1, 1, 1], 0.95) == [False, True, True, True]


def test_binary_failures_never_kept():
    for p in (0.0, 0.3, 0.7, 0.95, 1.0):
        keep = sel([0] * 10, [0] * 9 + [1], p)  # the 0.7 quantile here is 0: minimum must still be excluded
        assert keep == [False] * 9 + [True]


def test_all_fail_pool_keeps_nothing():
    assert sel([0] * 5 + [1] * 5, [0] * 5 + [0, 1, 0, 1, 1], 0.7) == [False] * 5 + [False, True, False, True, True]


def test_uniform_pool_keeps_nothing_without_floor_and_all_with_passing_floor():
    assert sel([3] * 4, [1.0] * 4) == [False] * 4
    assert sel([3] * 4, [1.0] * 4, min_score=1.0) == [True] * 4
    assert sel([3] * 4, [0.0] * 4, min_score=0.5) == [False] * 4  # all failed an absolute bar


def test_min_score_floor_applies_to_every_strategy():
    pids, scores = [0] * 4, [0.1, 0.2, 0.3, 0.4]
    for strategy in ("per_prompt", "global", "top_k"):
        keep = sel(pids, scores, 0.0, strategy=strategy, top_k=4, min_score=0.25)
        assert keep == [False, False, True, True], strategy


def test_per_prompt_threshold_is_numpy_quantile():
    rng = np.random.default_rng(0)
    pids = rng.integers(0, 50, 5000)
    scores = rng.normal(size=5000)
    keep, thr = select(pids, scores, 0.83)
    for p in range(50):
        m = pids == p
        q = np.quantile(scores[m], 0.83)
        assert np.allclose(thr[m], q)
        assert (keep[m] == (scores[m] >= thr[m]) & (scores[m] > scores[m].min())).all()


def test_global_strategy_uses_one_threshold():
    pids = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.2, 0.3, 0.4]
    keep, thr = select(np.array(pids), np.array(scores), 0.5, strategy="global")
    assert len(set(thr.tolist())) == 1 and thr[0] == pytest.approx(0.35)
    assert keep.tolist() == [False, True, True, False, False, True]


def test_top_k_best_of_k_per_prompt():
    pids = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.4, 0.9, 0.1, 0.5, 3.0, 1.0, 2.0]
    assert sel(pids, scores, strategy="top_k", top_k=2) == [False, True, False, True, True, False, True]
    # K larger than the pool: everything but the pool minimum
    assert sel([0, 0, 0], [1, 2, 3], strategy="top_k", top_k=10) == [False, True, True]


def test_top_k_ties_broken_by_input_order_deterministically():
    a = sel([0] * 4, [0, 1, 1, 1], strategy="top_k", top_k=2)
    assert a == sel([0] * 4, [0, 1, 1, 1], strategy="top_k", top_k=2) and sum(a) == 2


def make_rows(rng, n, n_prompts, vocab=5, length=3, owner=0, step=0):
    tokens = [rng.integers(0, vocab, length) for _ in range(n)]
    return table_rows(
        rng.integers(0, n_prompts, n),
        rng.integers(0, 3, n).astype(float),
        rng.random(n) < 0.5,
        tokens,
        owner=owner,
        step=step,
    ), tokens


def test_dedup_by_completion_token_ids():
    s = table_rows([0, 0, 0, 1], [0.2, 0.7, 0.1, 0.2], [True, True, False, True], [[5, 6], [5, 6], [5, 6], [5, 6]])
    c = canonical(s)
    # (0,[5,6],eos) twice -> once with the best score; the non-EOS copy is a different completion
    assert len(c) == 3
    row = [i for i in range(3) if c["prompt_id"][i] == 0 and c["eos"][i]][0]
    assert c["score"][row] == 0.7
    assert len(canonical(s, dedup=False)) == 4


def test_selection_independent_of_shard_arrival_order():
    rng = np.random.default_rng(1)
    shards = [make_rows(rng, 300, 20, owner=r)[0] for r in range(4)]
    digests = set()
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        pool = canonical(np.concatenate([shards[i] for i in perm]))
        for strategy in ("per_prompt", "top_k", "global"):
            keep, _ = select(pool["prompt_id"], pool["score"], 0.8, strategy=strategy, top_k=2)
            digests.add((strategy, selection_digest(pool, keep)))
    assert len(digests) == 3  # one digest per strategy, whatever the arrival order


def test_wire_rows_are_at_most_25_bytes_and_round_trip():
    rng = np.random.default_rng(0)
    a, _ = make_rows(rng, 10, 4, owner=0)
    b, _ = make_rows(rng, 0, 4, owner=1)  # a rank with nothing new still sends its (empty) part
    c, _ = make_rows(rng, 5, 4, owner=2)
    c["slot"] += 7
    wire = [(int(x["slot"][0]) if len(x) else 0, *to_wire(x)) for x in (a, b, c)]
    back = from_wire(wire, step=0)
    assert back.dtype == TABLE_ROW and (back == np.concatenate([a, b, c])).all()
    # a grow step's rows: N per prompt, binary rewards: the columns compress to the digests and little more
    n = 32 * 500
    rows = table_rows(
        np.repeat(np.arange(500), 32),
        (rng.random(n) < 0.3).astype(float),
        rng.random(n) < 0.9,
        digest=rng.integers(0, 2**63, n),
        length=rng.integers(0, 256, n),
    )
    count, payload = to_wire(rows)
    assert count == n and len(payload) < 12 * n
    assert (from_wire([(0, count, payload)], 0) == rows).all()


# ---- what "today's code" did: every rank gathered every completion's tokens and kept them all --------


def legacy_select(steps, percentile, strategy, dedup):
    """The selection before the data plane (Pools.add on whole gathered Samples), as it was: concatenate the
    pool and the new rows in rank order, sort by (prompt, digest, -score) keeping input order, dedup."""
    pid, score, digest = np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.uint64)
    for parts in steps:
        pid = np.concatenate([pid] + [p["prompt_id"] for p in parts])
        score = np.concatenate([score] + [p["score"] for p in parts])
        digest = np.concatenate([digest] + [p["digest"] for p in parts])
        order = np.lexsort((-score, digest, pid))
        if dedup:
            first = np.r_[True, (pid[order][1:] != pid[order][:-1]) | (digest[order][1:] != digest[order][:-1])]
            order = order[first]
        pid, score, digest = pid[order], score[order], digest[order]
    keep, _ = select(pid, score, percentile, strategy=strategy, top_k=3)
    h = table_rows(pid, score, np.zeros(len(pid), bool), digest=digest, length=np.zeros(len(pid)))
    return selection_digest(h, keep), int(keep.sum())


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("strategy", ["per_prompt", "top_k", "global"])
def test_accumulate_selects_what_the_gathered_pools_did(strategy, dedup):
    rng = np.random.default_rng(7)
    steps, pool, slots = [], np.zeros(0, TABLE_ROW), [0, 0, 0]
    for g in range(3):  # three grow steps on three ranks, small vocab: many duplicates, many ties
        parts = []
        for r in range(3):
            rows, _ = make_rows(rng, 60, 8, vocab=3, length=2, owner=r, step=g)
            rows["slot"] = slots[r] + np.arange(len(rows))
            slots[r] += len(rows)
            parts.append(rows)
        steps.append(parts)
        new = from_wire([(int(p["slot"][0]), *to_wire(p)) for p in parts], step=g)
        pool = update_pool(pool, new, g, parse_pool_policy("accumulate"), dedup)
        keep, _ = select(pool["prompt_id"], pool["score"], 0.8, strategy=strategy, top_k=3)
        assert (selection_digest(pool, keep), int(keep.sum())) == legacy_select(steps, 0.8, strategy, dedup)


def test_pool_policies():
    assert [parse_pool_policy(p) for p in ("accumulate", "latest", "window:1", "window:3")] == [None, 1, 1, 3]
    for bad in ("window", "window:0", "window:-1", "window:x", "newest", "", None):
        with pytest.raises(ValueError, match="accumulate | latest | window:K"):
            parse_pool_policy(bad)
    rows = {
        g: table_rows([0, 1], [float(g), 1.0], [True, True], [[g, 9], [g, 8]], step=g, slot=[2 * g, 2 * g + 1])
        for g in range(4)
    }
    for policy, want in (
        ("accumulate", {0, 1, 2, 3}),
        ("latest", {3}),
        ("window:2", {2, 3}),
        ("window:9", {0, 1, 2, 3}),
    ):
        pool = np.zeros(0, TABLE_ROW)
        for g in range(4):
            pool = update_pool(pool, rows[g], g, parse_pool_policy(policy), dedup=True)
        assert set(pool["step"].tolist()) == want, policy
        assert len(pool) == 2 * len(want)


def test_window_keeps_a_completion_while_any_copy_is_in_it():
    first = table_rows([0], [0.9], [True], [[1, 2]], step=0, slot=[0])
    again = table_rows([0], [0.5], [True], [[1, 2]], step=1, slot=[1])
    pool = update_pool(np.zeros(0, TABLE_ROW), first, 0, 2, True)
    pool = update_pool(pool, again, 1, 2, True)
    assert len(pool) == 1 and pool["score"][0] == 0.9 and pool["step"][0] == 1  # best score, newest step
    pool = update_pool(pool, np.zeros(0, TABLE_ROW), 2, 2, True)
    assert len(pool) == 1  # sampled at step 1: still in a 2-step window at step 2
    assert len(update_pool(pool, np.zeros(0, TABLE_ROW), 3, 2, True)) == 0


def test_max_per_prompt_keeps_the_best_with_deterministic_ties():
    pid = np.array([0, 0, 0, 0, 1, 1, 2])
    score = np.array([0.5, 0.9, 0.9, 0.7, 0.3, 0.8, 1.0])
    keep = np.array([True, True, True, True, False, True, True])
    assert cap_per_prompt(pid, score, keep, 2).tolist() == [False, True, True, False, False, True, True]
    assert cap_per_prompt(pid, score, keep, 1).tolist() == [False, True, False, False, False, True, True]  # tie: first
    assert (cap_per_prompt(pid, score, keep, None) == keep).all()
    assert (cap_per_prompt(pid, score, keep, 10) == keep).all()
    assert not cap_per_prompt(pid, score, np.zeros(7, bool), 1).any()


def test_digest_is_content_based_and_stable():
    assert completion_digest([1, 2, 3], True) == completion_digest(np.array([1, 2, 3], np.int32), True)
    assert completion_digest([1, 2, 3], True) != completion_digest([1, 2, 3], False)
    # the same in another process with another hash seed: no Python hash() anywhere
    code = "from rft_ds.selection import completion_digest; print(completion_digest([1, 2, 3], True))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    assert int(out) == completion_digest([1, 2, 3], True)


def test_million_scores():
    """A million scores in one call (its speed is benchmarks/bench_selection.py's job, not a timed test's:
    a loaded CI box made the old 1 s assertion flaky)."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    pids, scores = rng.integers(0, 31_250, n), rng.random(n)
    for strategy in ("per_prompt", "global", "top_k"):
        keep, thr = select(pids, scores, 0.9, strategy=strategy, top_k=4)
        assert keep.shape == thr.shape == (n,)
        assert 0.05 * n < keep.sum() < 0.2 * n, (strategy, keep.sum())  # about the top 10 % (top_k: 4 of 32)


def test_empty_input():
    keep, thr = select(np.zeros(0, np.int64), np.zeros(0), 0.7)
    assert keep.shape == (0,) and thr.shape == (0,)


def test_epoch_selection_drops_cut_rows_then_caps():
    """select_epoch: with drop_cut_at, a completion cut at max_new_tokens (no EOS) neither trains nor raises its
    prompt's threshold; max_per_prompt keeps the best rows; the threshold mean is over the prompts that took part."""
    # prompt 0: a cut 3-token completion scoring 1.0 and three ended ones; prompt 1: only cut completions
    t = table_rows(
        [0, 0, 0, 0, 1, 1],
        [1.0, 0.2, 0.6, 0.4, 0.9, 0.8],
        [False, True, True, True, False, False],
        [[1, 2, 3], [4], [5, 6], [7], [1, 1, 1], [2, 2, 2]],
    )
    kept = lambda mask: sorted(zip(t["prompt_id"][mask].tolist(), t["score"][mask].tolist()))  # noqa: E731
    keep, thr = select_epoch(t, 0.5, "per_prompt", 1, None, None, drop_cut_at=3)
    assert kept(keep) == [(0, 0.4), (0, 0.6)] and thr == pytest.approx(0.4)  # at or above the median of 0.2, 0.4, 0.6
    keep, _ = select_epoch(t, 0.5, "per_prompt", 1, None, None, drop_cut_at=None)  # overlong: keep
    assert (0, 1.0) in kept(keep) and (1, 0.9) in kept(keep)
    keep, _ = select_epoch(t, 0.0, "per_prompt", 1, None, 1, drop_cut_at=None)  # at most one per prompt: the best
    assert kept(keep) == [(0, 1.0), (1, 0.9)]
    keep, thr = select_epoch(t[:0], 0.5, "per_prompt", 1, None, None, drop_cut_at=3)
    assert keep.shape == (0,) and thr is None
