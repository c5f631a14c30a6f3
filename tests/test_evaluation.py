"""Eval sets (rft_ds/evaluation.py): pass@k and maj@k math against hand-computed values, parsing of
eval.sets with errors naming the field, and which metric picks best_model/. No process group."""

from __future__ import annotations

import math
import random

import pytest

from rft_ds.config import ConfigError, RFTRunConfig
from rft_ds.evaluation import best_metric, maj_at_k, parse_sets, pass_at_k


@pytest.mark.parametrize(
    "n,c,k,expect",
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 1, 4, 1.0),  # n = k: one pass among all k drawn
        (4, 0, 4, 0.0),  # n = k, none correct
        (6, 6, 3, 1.0),  # all correct
        (6, 0, 1, 0.0),  # none correct
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expect):
    assert pass_at_k(n, c, k) == pytest.approx(expect, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula_and_the_pass_rate_at_k_1():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 64)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_maj_at_k_votes_ties_and_groups():
    # "4" wins 3-1 and passes
    assert maj_at_k(["4", "4", "5", "4"], [True, True, False, True], 4) == 1.0
    # a tie between a right and a wrong answer counts half, whatever the order
    assert maj_at_k(["4", "4", "5", "5"], [True, True, False, False], 4) == 0.5
    assert maj_at_k(["5", "4", "5", "4"], [False, True, False, True], 4) == 0.5
    # a three-way tie with one right answer
    assert maj_at_k(["1", "2", "3"], [False, True, False], 3) == pytest.approx(1 / 3)
    # no answer is no vote; all missing scores 0
    assert maj_at_k(["4", None, None, "5"], [True, False, False, False], 4) == 0.5
    assert maj_at_k(["4", None, None, None], [True, False, False, False], 4) == 1.0
    assert maj_at_k([None] * 4, [False] * 4, 4) == 0.0
    # the wrong majority beats a right minority
    assert maj_at_k(["5", "5", "4"], [False, False, True], 3) == 0.0
    # n // k groups, the mean over them; the rest left out
    assert maj_at_k(["1", "1", "2", "2", "2", "3", "9"], [False, False, True, True, True, False, True], 3) == 0.5
    # k = 1 is the pass rate of answered samples
    assert maj_at_k(["1", "2", "3", "4"], [True, False, True, False], 1) == 0.5
    # one answer worded so that one sample passes and one does not: their share
    assert maj_at_k(["7", "7"], [True, False], 2) == 0.5
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)


def _cfg(**over) -> RFTRunConfig:
    d = {"model": {"model_path": "m"}, "reward": {"reward_fn": "rft_ds.toy:reward_fn"}}
    for k, v in over.items():
        sec, key = k.split("__")
        d.setdefault(sec, {})[key] = v
    return RFTRunConfig.from_dict(d)


def test_default_set_keeps_todays_fields_and_a_low_noise_best_metric():
    cfg = _cfg(data__eval_prompts="rft_ds.toy:eval_prompts", reward__metric_fn="rft_ds.toy:metric_fn")
    (s,) = parse_sets(cfg)
    assert (s.name, s.prompts, s.metric_fn, s.n_samples, s.pass_k) == (
        "eval",
        "rft_ds.toy:eval_prompts",
        "rft_ds.toy:metric_fn",
        4,
        [1, 4],
    )
    assert s.key("reward_mean") == "eval_reward_mean" and s.key("pass@4") == "eval_pass@4"
    assert best_metric("auto", [s])[1] == "reward_mean"  # 4 samples per prompt
    greedy = parse_sets(_cfg(data__eval_prompts="x:y", train__eval_gen_kwargs={"do_sample": False}))[0]
    assert greedy.n_samples == 1 and best_metric("auto", [greedy])[1] == "reward_mean"
    assert parse_sets(_cfg()) == []  # no eval prompts: no eval
    # the API's eval_prompts and metric_fn fill the default set
    (api,) = parse_sets(_cfg(), eval_prompts=["a", "b"], metric_fn=print)
    assert api.prompts == ["a", "b"] and api.metric_fn is print


def test_named_sets_and_their_keys():
    cfg = _cfg(
        eval__sets=[
            {
                "name": "add",
                "prompts": "rft_ds.arith:eval_prompts",
                "n_samples": 8,
                "greedy": True,
                "pass_k": [1, 4, 8],
                "answer_fn": "rft_ds.rewards:last_number",
                "maj_k": [8],
                "gen_kwargs": {"temperature": 0.7},
            },
            {"name": "sub", "prompts": "rft_ds.arith:eval_subtraction", "reward_fn": "rft_ds.rewards:numeric_match"},
        ],
        train__best_metric="sub/pass@1",
    )
    add, sub = parse_sets(cfg)
    assert add.gen_kwargs["temperature"] == 0.7 and add.gen_kwargs["max_new_tokens"] == 32  # over method.gen_kwargs
    assert add.metrics() == ["reward_mean", "pass@1", "pass@4", "pass@8", "maj@8", "greedy_reward_mean", "greedy_pass"]
    assert add.key("maj@8") == "eval_add_maj@8" and sub.key("pass@1") == "eval_sub_pass@1"
    assert best_metric("auto", [add, sub])[1] == "greedy_reward_mean"
    assert best_metric("sub/pass@1", [add, sub]) == (sub, "pass@1")


@pytest.mark.parametrize(
    "sets,over,message",
    [
        ([{"name": "a"}], {}, "eval.sets[0].prompts is required"),
        ([{"name": "a b", "prompts": "x:y"}], {}, "eval.sets[0].name must be a name"),
        ([{"name": "a", "prompts": "x:y"}, {"name": "a", "prompts": "x:z"}], {}, "eval.sets[1].name 'a' is used twice"),
        ([{"name": "a", "prompts": "x:y", "n_sample": 4}], {}, "unknown key 'eval.sets[0].n_sample'"),
        ([{"name": "a", "prompts": "x:y", "n_samples": 0}], {}, "eval.sets[0].n_samples must be an int >= 1"),
        (
            [{"name": "a", "prompts": "x:y", "n_samples": 4, "gen_kwargs": {"do_sample": False}}],
            {},
            "eval.sets[0].n_samples is 4 but its gen_kwargs do not sample",
        ),
        ([{"name": "a", "prompts": "x:y", "pass_k": [5]}], {}, "eval.sets[0].pass_k: k=5 is outside 1..n_samples (4)"),
        ([{"name": "a", "prompts": "x:y", "maj_k": [4]}], {}, "eval.sets[0].maj_k needs eval.sets[0].answer_fn"),
        (
            [{"name": "a", "prompts": "x:y", "gen_kwargs": {"temprature": 1.0}}],
            {},
            "unknown eval.sets[0].gen_kwargs key",
        ),
        ([{"name": "a", "prompts": "x:y", "answer_fn": "nocolon"}], {}, "eval.sets[0].answer_fn must look like"),
        (
            [{"name": "a", "prompts": "x:y", "greedy": True, "gen_kwargs": {"do_sample": False}}],
            {},
            "eval.sets[0].greedy: true would repeat its own completions",
        ),
        ([{"name": "a", "prompts": "x:y", "n_samples": 1}], {}, "train.best_metric auto: eval set 'a' samples 1"),
        (
            [{"name": "a", "prompts": "x:y"}],
            {"train__best_metric": "b/reward_mean"},
            "train.best_metric must be 'auto' or",
        ),
        (
            [{"name": "a", "prompts": "x:y"}],
            {"train__best_metric": "a/pass@8"},
            "train.best_metric 'a/pass@8': set 'a' reports",
        ),
        ([], {}, "eval.sets must be a non-empty list"),
        ([{"name": "a", "prompts": "x:y"}], {"data__eval_prompts": "x:z"}, "data.eval_prompts and eval.sets both"),
    ],
)
def test_bad_eval_sets_fail_in_one_line_naming_the_field(sets, over, message):
    with pytest.raises(ConfigError) as e:
        _cfg(eval__sets=sets, **over)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_noisy_default_set_is_fine_without_best_model():
    cfg = _cfg(eval__sets=[{"name": "a", "prompts": "x:y", "n_samples": 1}], train__save_best_model=False)
    assert parse_sets(cfg)[0].n_samples == 1
