"""A grow step's samples as compact arrays (rft_ds.samples): 4 bytes a sampled token from the sampler to the
mid-epoch checkpoint, the sampler's log-probs only for the stale-weight check's few probes."""

import pickle

import numpy as np

from rft_ds.pool import LocalPool
from rft_ds.samples import Samples, pick_probes
from rft_ds.sampling.base import Completion


def _chunk(rng, n_prompts, n, lo, hi, probe_prompts=()):
    out = []
    for p in range(n_prompts):
        cs = []
        for _ in range(n):
            ids = rng.integers(0, 50000, rng.integers(lo, hi)).astype(np.int32)
            finish = ["eos", "stop", "length"][int(rng.integers(0, 3))]
            lp = -rng.random(len(ids) + (finish == "eos")).astype(np.float32) if p in probe_prompts else None
            cs.append(Completion(ids, finish, lp))
        out.append(cs)
    return out


def test_samples_keep_every_completion_in_order_and_one_probe_per_asked_prompt():
    rng = np.random.default_rng(0)
    first, second = _chunk(rng, 3, 4, 1, 30, probe_prompts=(1,)), _chunk(rng, 2, 4, 0, 5)
    s = Samples()
    s.add(0, first)
    s.add(3, second)
    flat = [c for cs in first + second for c in cs]
    assert len(s) == 20 and s.prompt.tolist() == [p for p in range(5) for _ in range(4)]
    assert [t.tolist() for t in s.tokens()] == [c.token_ids.tolist() for c in flat]
    assert s.eos.tolist() == [c.eos for c in flat] and s.length.tolist() == [len(c.token_ids) for c in flat]
    # prompt 1 was asked for log-probs: its first sample is the probe, the other three are dropped
    assert list(s.probes) == [4] and np.array_equal(s.probes[4], first[1][0].logprobs)
    back = pickle.loads(pickle.dumps(s))  # a mid-epoch checkpoint holds it as it is
    assert [t.tolist() for t in back.tokens()] == [t.tolist() for t in s.tokens()] and list(back.probes) == [4]


def test_a_mid_epoch_checkpoint_costs_about_4_bytes_a_sampled_token():
    """The grow step's samples and the pool shard, pickled as the checkpoint does: at most ~5 bytes per sampled
    token for completions of a few hundred tokens (the old Completion lists: ~68)."""
    rng = np.random.default_rng(1)
    s = Samples()
    for k in range(4):  # 4 chunks of 8 prompts x 16 samples of 100-1000 tokens, 8 probes in the first
        s.add(8 * k, _chunk(rng, 8, 16, 100, 1000, probe_prompts=range(8) if k == 0 else ()))
    tokens = int(s.length.sum())
    assert len(s.probes) == 8
    assert len(pickle.dumps(s)) / tokens < 4.1  # int32 ids, 9 bytes a completion, the probes' float32
    pool = LocalPool(0)
    pool.add(s.prompt, rng.random(len(s)), s.eos, s.tokens(), step=0)
    assert len(pickle.dumps(pool)) / tokens < 4.2  # the pool shard: flat int32 ids + a 45-byte table row each
    old = [
        [
            Completion(
                c.token_ids.tolist(),
                c.finish_reason,
                c.logprobs.tolist() if c.logprobs is not None else (-rng.random(len(c.token_ids))).tolist(),
            )
            for c in cs
        ]
        for cs in _chunk(rng, 2, 4, 100, 200)
    ]
    old_tokens = sum(len(c.token_ids) for cs in old for c in cs)
    assert len(pickle.dumps(old)) / old_tokens > 10  # what a checkpoint held per token before (pickled lists)


def test_probe_prompts_are_seeded_and_bounded():
    a = pick_probes(256, 8, seed=1000, epoch=2, rank=1)
    assert len(a) == 8 and len(set(a.tolist())) == 8 and a.max() < 256
    assert a.tolist() == pick_probes(256, 8, 1000, 2, 1).tolist()  # a resumed run picks the same
    assert a.tolist() != pick_probes(256, 8, 1000, 3, 1).tolist()
    assert pick_probes(5, 8, 1000, 0, 0).tolist() == [0, 1, 2, 3, 4]


def test_a_rank_state_file_holds_4_bytes_a_token(tmp_path):
    """checkpoint.write_rank_state (what every mid-epoch checkpoint writes per rank): int32 tokens of a large
    vocabulary as raw bytes, not as pickle protocol 2's latin-1 text (~5 bytes a token)."""
    import torch

    from rft_ds.checkpoint import write_rank_state

    rng = np.random.default_rng(2)
    pool = LocalPool(0)
    tokens = [rng.integers(0, 128256, 2048).astype(np.int32) for _ in range(200)]
    pool.add(np.arange(200) // 8, rng.random(200), np.ones(200, bool), tokens, step=0)
    write_rank_state(tmp_path / "rank0.pt", {"local": {"pool": pool}})
    assert (tmp_path / "rank0.pt").stat().st_size / (200 * 2048) < 4.05
    back = torch.load(tmp_path / "rank0.pt", weights_only=False)["local"]["pool"]
    assert all((a == b).all() for a, b in zip(back.tokens, tokens))
