"""Schedule and selection: pure functions, no process group."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rft_ds.selection import Pools, Samples, canonical, completion_digest, schedule, select, selection_digest


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


def make_samples(rng, n, n_prompts, vocab=5, length=3):
    tokens = [rng.integers(0, vocab, length) for _ in range(n)]
    return Samples(prompt_id=rng.integers(0, n_prompts, n), score=rng.integers(0, 3, n).astype(float),
                   eos=rng.random(n) < 0.5, tokens=tokens)


def test_dedup_by_completion_token_ids():
    s = Samples(prompt_id=[0, 0, 0, 1], score=[0.2, 0.7, 0.1, 0.2], eos=[True, True, False, True],
                tokens=[[5, 6], [5, 6], [5, 6], [5, 6]])
    c = canonical(s)
    # (0,[5,6],eos) twice -> once with the best score; the non-EOS copy is a different completion
    assert len(c) == 3
    row = [i for i in range(3) if c.prompt_id[i] == 0 and c.eos[i]][0]
    assert c.score[row] == 0.7
    assert len(canonical(s, dedup=False)) == 4


def test_pools_accumulate_across_grow_steps_with_dedup():
    pools = Pools()
    pools.add(Samples([0, 0], [0.0, 1.0], [True, True], [[1], [2]]))
    pools.add(Samples([0, 0], [0.5, 1.0], [True, True], [[3], [2]]))  # [2] again: deduplicated
    assert len(pools) == 3


def test_selection_independent_of_shard_arrival_order():
    rng = np.random.default_rng(1)
    shards = [make_samples(rng, 300, 20) for _ in range(4)]
    digests = set()
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        pools = Pools()
        pools.add(Samples.concat([shards[i] for i in perm]))
        for strategy in ("per_prompt", "top_k", "global"):
            keep, _ = select(pools.samples.prompt_id, pools.samples.score, 0.8, strategy=strategy, top_k=2)
            digests.add((strategy, selection_digest(pools.samples, keep)))
    assert len(digests) == 3  # one digest per strategy, whatever the arrival order


def test_digest_is_content_based_and_stable():
    assert completion_digest([1, 2, 3], True) == completion_digest(np.array([1, 2, 3], np.int32), True)
    assert completion_digest([1, 2, 3], True) != completion_digest([1, 2, 3], False)
    # the same in another process with another hash seed: no Python hash() anywhere
    code = "from rft_ds.selection import completion_digest; print(completion_digest([1, 2, 3], True))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
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
