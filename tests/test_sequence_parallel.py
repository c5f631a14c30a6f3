"""Sequence parallelism's pure parts: how a micro-batch is cut into shards, which models it can split, and
rows dealt to groups; the 2-rank ZeRO-3 step itself is in tests/dist/loss_norm.py (-sp2 settings)."""

import numpy as np
import pytest

from rft_ds.experience import IGNORE_INDEX, build_row, collate
from rft_ds.sequence_parallel import positions_of_rank, why_not


def _rows():
    # widths 8 and 3 (prompt 1, completion 2, no EOS): odd, so the last shard carries padding
    return [build_row([1, 2, 3], [4, 5, 6, 7], True, 2, 64), build_row([5], [6, 7], False, 2, 64)]


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_make_the_batch_with_labels_shifted_before_the_cut(size):
    rows = _rows()
    parts = [positions_of_rank(rows, 0, size, k) for k in range(size)]
    whole = {key: np.concatenate([p[key] for p in parts], axis=1) for key in parts[0]}
    width = whole["input_ids"].shape[1]
    assert width % size == 0 and width - size < 8 <= width  # padded to the next multiple of size
    assert len({p["input_ids"].shape for p in parts}) == 1  # every rank the same shape (Ulysses' all-to-all)
    full = collate(rows, 0)
    assert (whole["input_ids"][:, :8] == full["input_ids"]).all() and (whole["input_ids"][:, 8:] == 0).all()
    assert (whole["position_ids"] == np.arange(width)).all()
    # position t predicts token t + 1: the labels moved left by one, whatever shard the token lies on
    assert (whole["targets"][:, :7] == full["labels"][:, 1:]).all() and (whole["targets"][:, 7:] == IGNORE_INDEX).all()
    # every label token is predicted exactly once over the shards
    assert sum(int((p["targets"] != IGNORE_INDEX).sum()) for p in parts) == int((full["labels"] != IGNORE_INDEX).sum())


def test_a_label_across_the_cut_is_predicted_on_the_earlier_rank():
    row = build_row([5], [6, 7], False, 2, 64)  # ids 5 6 7, width 3 -> 4 over 2 ranks: [5 6 | 7 pad]
    first, second = positions_of_rank([row], 0, 2, 0), positions_of_rank([row], 0, 2, 1)
    assert first["targets"].tolist() == [[6, 7]]  # position 1 (token 6) predicts 7, which rank 1 holds
    assert second["input_ids"].tolist() == [[7, 0]] and second["targets"].tolist() == [[IGNORE_INDEX] * 2]


@pytest.mark.parametrize(
    "cfg,size,problem",
    [
        ({"num_attention_heads": 9, "num_key_value_heads": 3}, 1, None),
        ({"num_attention_heads": 8, "num_key_value_heads": 8}, 4, None),
        ({"num_attention_heads": 32, "num_key_value_heads": 8}, 8, None),
        ({"num_attention_heads": 16, "num_key_value_heads": 2}, 8, None),  # key/value heads replicated 4x
        ({"num_attention_heads": 12}, 4, None),  # no num_key_value_heads: as many as query heads
        ({"num_attention_heads": 2, "num_key_value_heads": 2}, 4, "2 attention heads do not split over 4 ranks"),
        ({"num_attention_heads": 12, "num_key_value_heads": 3}, 2, "3 key/value heads neither split over 2 ranks"),
        ({}, 2, "no num_attention_heads"),
        ({"num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096}, 2, "sliding-window attention"),
        ({"num_attention_heads": 32, "sliding_window": 4096, "use_sliding_window": False}, 2, None),  # Qwen2's off
        ({"num_attention_heads": 8, "layer_types": ["full_attention", "sliding_attention"]}, 2, "layer_types"),
        ({"num_attention_heads": 8, "attention_chunk_size": 8192}, 2, "chunked attention"),
    ],
)
def test_which_models_split_over_a_group(cfg, size, problem):
    got = why_not(cfg, size)
    assert got == problem if problem is None else problem in got
