"""Scorer validation, data sources and sampler post-processing (single process)."""

import math

import numpy as np
import pytest

from rft_ds.config import RewardConfig
from rft_ds.data import DataError, deal_prompts, load_source, normalize, tokenize
from rft_ds.distributed import RankError, all_ranks_or_fail
from rft_ds.reward_terms import build_terms, score_terms
from rft_ds.sampling.base import finish_completion
from rft_ds.scoring import RewardError, decode_outputs, validate_scores

OUT = ["a", "b", "c"]


@pytest.mark.parametrize(
    "raw,needle",
    [
        ([1.0, 2.0], "returned 2 scores for 3 samples"),
        ([1.0, float("nan"), 0.0], "returned nan for sample 1 (prompt 11, output 'b')"),
        ([1.0, 0.0, math.inf], "returned inf for sample 2"),
        ([1.0, None, 0.0], "returned NoneType None for sample 1"),
        ([1.0, 0.0, "high"], "returned str 'high' for sample 2"),
        ("123", "must return a list of 3 numbers, got str"),
        (None, "must return a list of 3 numbers, got NoneType"),
        ([1.0, [2.0], 0.0], "returned list [2.0] for sample 1"),
    ],
)
def test_bad_reward_values_name_the_sample(raw, needle):
    with pytest.raises(RewardError) as e:
        validate_scores(raw, 3, [10, 11, 12], OUT)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_reward_values():
    import torch

    assert validate_scores([1, 2.5, np.float32(3)], 3, [0, 1, 2], OUT).tolist() == [1.0, 2.5, 3.0]
    assert validate_scores(np.array([1, 2, 3]), 3, [0, 1, 2], OUT).dtype == np.float64
    assert validate_scores(torch.tensor([0.5, 1.5, 2.5]), 3, [0, 1, 2], OUT).tolist() == [0.5, 1.5, 2.5]
    # scores as users return them: bool, numpy scalars, 0-d tensors
    assert validate_scores([True, np.int64(2), torch.tensor(0.25)], 3, [0, 1, 2], OUT).tolist() == [1.0, 2.0, 0.25]
    assert validate_scores([np.bool_(False), np.float32(1.5), np.array(3.0)], 3, [0, 1, 2], OUT).tolist() == [0, 1.5, 3]


def test_reward_fn_gets_trlx_kwargs_and_metadata(tokenizer):
    seen = {}

    def reward_fn(samples, prompts, outputs, tokenizer, prompt_ids, target, **kw):
        seen.update(samples=samples, prompts=prompts, outputs=outputs, prompt_ids=prompt_ids, target=target, kw=kw)
        return [float(o.count(t)) for o, t in zip(outputs, target)]

    terms = build_terms(RewardConfig(), reward_fn)
    assert terms[0].style == "trlx"
    scores, _ = score_terms(
        terms, ["p0 kk", "p1 x"], ["p0 ", "p1 "], ["kk", "x"], [[5, 5], [6]], [0, 1], {"target": ["k", "x"]}, tokenizer
    )
    assert scores.tolist() == [2.0, 1.0]
    assert seen["prompt_ids"] == [0, 1] and seen["target"] == ["k", "x"] and seen["kw"] == {}


def test_rank_error_single_process():
    with pytest.raises(RankError, match="scoring failed on rank 0: ZeroDivisionError"):
        with all_ranks_or_fail("scoring"):
            _ = 1 / 0


def test_decode_and_stop_sequences(tokenizer):
    ids = tokenizer("kk. and more")["input_ids"]
    assert decode_outputs(tokenizer, [ids], [". "]) == ["kk"]
    c = finish_completion(ids, {tokenizer.eos_token_id}, [". "], tokenizer.decode)
    # the shortest token prefix containing the stop sequence (its last token may run past it)
    assert c.finish_reason == "stop" and ". " in tokenizer.decode(c.token_ids)
    assert ". " not in tokenizer.decode(c.token_ids[:-1])
    assert not c.eos
    eos = tokenizer.eos_token_id
    c = finish_completion([5, 6, eos, tokenizer.pad_token_id], {eos}, [], tokenizer.decode)
    assert (c.token_ids.tolist(), c.finish_reason, c.eos) == ([5, 6], "eos", True)
    c = finish_completion([5, 6, 7], {eos}, [], tokenizer.decode)
    assert (c.token_ids.tolist(), c.finish_reason) == ([5, 6, 7], "length")
    assert c.token_ids.dtype == np.int32  # 4 bytes a token from the start


def test_sources_list_module_and_jsonl(tmp_path):
    assert load_source(["a", "b"], "prompts") == ["a", "b"]
    assert len(load_source("rft_ds.toy:train_prompts", "prompts")) == 64
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hi", "answer": 3}\n\n{"prompt": "yo", "answer": 4}\n')
    texts, metas = normalize(load_source(str(p), "prompts"), "prompts")
    assert texts == ["hi", "yo"] and metas == [{"answer": 3}, {"answer": 4}]


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"prompt": "ok"}\n{"prompt": \n', "p.jsonl:2: malformed JSON"),
        ('{"prompt": "ok"}\n{"text": "no"}\n', "p.jsonl:2: missing field 'prompt'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, needle):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_source(str(p), "prompts")


@pytest.mark.parametrize(
    "items,needle",
    [
        ([], "prompts is empty"),
        (["ok", 3], r"prompts\[1\] must be a string or a list of chat messages, got int"),
        (["ok", ""], r"prompts\[1\] is an empty string"),
        ([{"text": "x"}], r"prompts\[0\] has no field 'prompt'"),
        ([{"prompt": "x", "tokenizer": 1}], "metadata key 'tokenizer' is reserved"),
    ],
)
def test_bad_prompts(items, needle):
    with pytest.raises(DataError, match=needle):
        normalize(items, "prompts")


def test_bad_sources():
    with pytest.raises(DataError, match="cannot import module 'nope_module'"):
        load_source("nope_module:f", "prompts")
    with pytest.raises(DataError, match="has no attribute 'nothing'"):
        load_source("rft_ds.toy:nothing", "prompts")
    with pytest.raises(DataError, match="file not found"):
        load_source("missing.jsonl", "prompts")


def test_prompt_too_long(tokenizer):
    with pytest.raises(DataError, match=r"prompts\[1\] is \d+ tokens, longer than the limit of 4"):
        tokenize(["ab", "abc say k: kkkk kkk"], [{}, {}], tokenizer, 4, "prompts")


@pytest.mark.parametrize("plan", ["interleaved", "contiguous"])
def test_shard_balanced_and_complete(plan):
    for n in (0, 1, 5, 64):
        for w in (1, 2, 3):
            parts = [list(deal_prompts(n, r, w, plan)) for r in range(w)]
            assert sorted(sum(parts, [])) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert list(deal_prompts(7, 1, 3)) == [1, 4]  # interleaved: a sorted dataset's long tail spreads over all ranks
    assert list(deal_prompts(7, 1, 3, "contiguous")) == [3, 4]


def test_toy_reward():
    from rft_ds.toy import letter_score, reward_fn

    assert letter_score("kkk", "k") == 1.0 and letter_score("kx k", "k") == pytest.approx(2 / 3)
    assert letter_score("123", "k") == 0.0
    assert reward_fn(["s"], ["p"], ["aab"], target=["a"]) == [pytest.approx(2 / 3)]


def test_a_turn_end_that_generation_config_declares_ends_a_completion(tmp_path):
    """A chat model whose generation_config.json names a second end token (Llama 3's <|eot_id|>): vLLM stops on
    it, and the sampler must take it for the end, not keep it in the completion (a row ending <eot><eos>)."""
    import json
    from types import SimpleNamespace

    from rft_ds.sampling.base import declared_eos, end_ids
    from rft_ds.sampling.vllm import VLLMSampler

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert declared_eos(tmp_path) == [2, [2, 7]] and declared_eos(tmp_path / "absent") == []
    assert end_ids(3, *declared_eos(tmp_path)) == {2, 3, 7} and end_ids(None) == set()
    sampler = object.__new__(VLLMSampler)  # the completion logic only: no engine
    sampler.eos_ids = end_ids(2, *declared_eos(tmp_path))
    out = SimpleNamespace(token_ids=[5, 6, 7], finish_reason="stop", stop_reason=7, logprobs=None)
    c = sampler._completion(out)
    assert (c.token_ids.tolist(), c.finish_reason) == ([5, 6], "eos")
    sampler.eos_ids = end_ids(2, 2)  # before: the tokenizer's and config.json's only
    assert sampler._completion(out).token_ids.tolist() == [5, 6, 7]
