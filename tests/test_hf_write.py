"""best_model/ and final_model/ written by every rank in parallel (rft_ds/hf_write.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rft_ds.hf_write import deal
from tests.ranks import run_ranks


def test_a_small_model_is_one_file_written_by_rank_0():
    assert deal([10, 20, 30], world=64, min_share_bytes=2**30) == [0, 0, 0]
    assert deal([], world=4) == [] and deal([0, 0], world=4) == [0, 0]


def test_a_large_model_is_dealt_in_contiguous_balanced_runs_spread_over_the_ranks():
    sizes = [100] * 64  # 6400 bytes, a writer per 1000 at most: 7 writers for 64 ranks
    writers = deal(sizes, world=64, min_share_bytes=1000)
    assert writers == sorted(writers)  # contiguous runs, in tensor order
    used = sorted(set(writers))
    assert used == [k * 64 // 7 for k in range(7)]  # spread: ranks 0, 9, 18, ... (one node each, 8 per node)
    counts = [writers.count(r) for r in used]
    assert max(counts) - min(counts) <= 1  # balanced by bytes
    assert deal([5, 5, 90], world=2, min_share_bytes=1) == [0, 0, 1]  # by bytes, not by count
    assert deal([1] * 8, world=2, min_share_bytes=1) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_two_ranks_write_their_shards_and_rank_0_puts_them_together(tmp_path):
    """The same trained ZeRO-3 model written by one writer and by both ranks loads to identical tensors; the
    parallel one is two shards with their index, the mark file beside them, and no staging left."""
    from rft_ds.toy import ensure_tiny_model

    model = ensure_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    p = run_ranks(2, ["tests/dist/hf_parallel.py", str(model), str(out)], timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one = AutoModelForCausalLM.from_pretrained(out / "one").state_dict()
    both = AutoModelForCausalLM.from_pretrained(out / "both").state_dict()
    base = AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert sorted(one) == sorted(both) and all(torch.equal(one[k], both[k]) for k in one)
    assert not torch.equal(one["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # trained
    one_files, both_files = ({f.name for f in (out / d).iterdir()} for d in ("one", "both"))
    assert {"model.safetensors", "mark.json", "config.json"} <= one_files, one_files
    index = json.loads((out / "both" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], index
    assert set(shards) | {"config.json", "tokenizer.json", "mark.json"} <= both_files, both_files
    assert "model.safetensors" not in both_files and json.loads((out / "both" / "mark.json").read_text()) == {"run": 1}
    assert sorted(f.name for f in out.iterdir()) == ["both", "one"]  # no .both.shards, no .tmp left
