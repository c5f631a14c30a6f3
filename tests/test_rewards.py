"""Built-in rewards, and the reward-model scorer on a tiny sequence classifier built here."""

import json

import numpy as np
import pytest

from rft_ds.rewards import RewardModel, accuracy, check_reward_model, exact_match, last_number, numeric_match


def test_last_number():
    assert last_number("The answer is 42.") == 42
    assert last_number("12 + 30 = 42") == 42
    assert last_number("-7") == -7 and last_number("about 1,234.5 apples") == 1234.5
    assert last_number("no digits") is None


def test_numeric_and_exact_match():
    outs = ["42", "The answer is 42.", "41", "", "4 2"]
    assert numeric_match([], [], outs, answer=["42"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert numeric_match([], [], ["0.5"], answer=[0.5]) == [1.0]
    assert exact_match([], [], ["  Paris. ", "paris", "Lyon"], answer=["Paris"] * 3) == [1.0, 1.0, 0.0]
    assert numeric_match([], [], ["3"], solution=["3"], answer_key="solution") == [1.0]
    with pytest.raises(KeyError, match="no 'answer' metadata"):
        numeric_match([], [], ["1"])
    assert accuracy([], [], ["42", "x"], answer=["42", "1"]) == {"accuracy": 0.5, "has_number": 0.5}


def test_reward_model_scores_are_batch_independent(classifier):
    prompts = ["abc say k:", "xy say q:", "say a:", "longer context here say z:"] * 3
    outputs = ["kkk", "q", "", "zz zz zz", "a", "b", "c", "kkkkkkkkkk", "q q", "abc", "zzz", "k"]
    one = RewardModel(str(classifier), batch_size=1)
    many = RewardModel(str(classifier), batch_size=5)
    assert not many.model.training  # eval mode
    s1 = one(prompts, prompts, outputs)
    s5 = many(prompts, prompts, outputs)
    assert len(s5) == 12 and np.allclose(s1, s5, atol=1e-5)  # padding and sorting change nothing
    assert len(set(np.round(s5, 6))) > 1  # it does tell completions apart
    assert np.allclose(s5, many(prompts, prompts, outputs), atol=0)  # deterministic despite dropout


def test_reward_model_checked_before_loading(classifier, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="not a sequence classifier"):
        check_reward_model(str(tiny_model))  # a causal LM: its score head would be random
    with pytest.raises(ValueError, match="no config.json"):
        check_reward_model(str(tmp_path))
    cfg = json.loads((classifier / "config.json").read_text())
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "bad", "1": "good"}}))
    with pytest.raises(ValueError, match="has 2 labels: set reward.reward_model_label"):
        check_reward_model(str(multi))
    with pytest.raises(ValueError, match="label 2 is out of range for 2 labels"):
        check_reward_model(str(multi), 2)
    assert check_reward_model(str(multi), 1) == 2
