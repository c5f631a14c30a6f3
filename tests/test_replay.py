"""Replay's pure parts (rft_ds/replay.py), without a process group: the set's arrays, the epoch's draw, and
the deal that keeps every rank's step count."""

import numpy as np
import pytest

from rft_ds import replay
from rft_ds.config import ConfigError, RFTRunConfig


def test_pack_orders_by_prompt_and_completions_round_trip():
    r = replay.pack([2, 0, 1], [True, False, True], [[7, 8], [], [5]])
    assert r["prompt"].tolist() == [0, 1, 2] and r["eos"].tolist() == [False, True, True]
    assert r["length"].tolist() == [0, 1, 2] and r["tokens"].dtype == np.int32
    assert [t.tolist() for t in replay.completions(r, np.array([2, 0, 1]))] == [[7, 8], [], [5]]
    empty = replay.pack([], [], [])
    assert len(empty["prompt"]) == 0 and replay.completions(empty, np.zeros(0, np.int64)) == []


@pytest.mark.parametrize(
    "n_selected, n_set, share, want",
    [
        (90, 100, 0.1, 10),  # 10 of the epoch's 100 rows
        (300, 100, 0.2, 75),
        (1000, 20, 0.5, 20),  # at most the whole set
        (0, 100, 0.1, 0),  # nothing selected: no replay-only steps
        (90, 100, 0.0, 0),
    ],
)
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


def test_a_resume_keeps_the_replay_set_it_started_with():
    saved = {**replay.pack([0], [True], [[5]]), "digest": "abc"}
    replay.check_resume(saved, "abc", "ckpt")
    replay.check_resume(None, None, "ckpt")
    with pytest.raises(ConfigError, match="^data.replay_prompts: ckpt was written without replay"):
        replay.check_resume(None, "abc", "ckpt")
    for digest in ("other", None):  # other prompts, or replay turned off
        with pytest.raises(ConfigError, match="^data.replay_prompts: ckpt replays the base model's answers to other"):
            replay.check_resume(saved, digest, "ckpt")


def test_replay_prompts_in_config_files_and_dumps(tmp_path):
    """Relative to the YAML like the other prompt files; given as a Python list, summarised in config.yaml."""
    (tmp_path / "r.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "run.yaml").write_text(
        "model: {model_path: m}\ndata: {prompts: rft_ds.toy:train_prompts, replay_prompts: r.jsonl}\n"
    )
    assert RFTRunConfig.load_yaml(tmp_path / "run.yaml").data.replay_prompts == str(tmp_path / "r.jsonl")
    cfg = RFTRunConfig.from_dict({"model": {"model_path": "m"}, "data": {"replay_prompts": ["a", "b", "c"]}})
    assert cfg.to_dict()["data"]["replay_prompts"] == "<list of 3 prompts, given in Python>"
    assert cfg.data.replay_prompts == ["a", "b", "c"]
