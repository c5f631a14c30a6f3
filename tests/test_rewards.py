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


# ---- long completions: the reward model sees the question (DESIGN "Rules per token") ----------------------

QUESTION = "question: what is 12 + 30? say k:"  # the toy alphabet: no capitals, no / < > [ ] or newline
LONG = " first step." + " going up 1 2 3." * 120 + " going down 3 2 1." * 120 + " so the answer is 42"  # > 2k tokens


def _scores_before(rm, prompts, outputs):
    """The scorer as it was: the whole text tokenized and cut from the left to max_length (the prompt first)."""
    import torch

    rm.tokenizer.truncation_side = "left"
    enc = rm.tokenizer(
        rm.texts(prompts, outputs),
        padding=True,
        truncation=True,
        max_length=rm.max_length,
        return_tensors="pt",
        add_special_tokens=not rm.chat,
    )
    rm.tokenizer.truncation_side = "right"
    with torch.inference_mode():
        return rm.model(**enc).logits[:, 0].float().tolist()


def test_long_completion_keeps_its_question_and_its_end(classifier):
    rm = RewardModel(str(classifier), batch_size=4)
    tok = rm.tokenizer
    assert len(tok(LONG)["input_ids"]) > 2000 and rm.max_length == 512
    with pytest.warns(UserWarning, match="rft_ds: the reward model .* cut the middle out of 1 completions"):
        (ids,) = rm.encode([QUESTION], [LONG], prompt_ids=[3])
    text = tok.decode(ids)
    assert len(ids) <= 512 and len(ids) > 500  # filled, not over-cut
    assert text.startswith(QUESTION + " first step. going up")  # the whole question, then the completion's head
    assert text.endswith(" going down 3 2 1. so the answer is 42")  # and its end, where the answer is
    assert rm.n_truncated == 1 and rm.take_truncated() == 1 and rm.take_truncated() == 0
    # the middle went: about a quarter of what fits is from the head (the "up" half), the rest from the end
    up, down = text.count(" going up 1 2 3."), text.count(" going down 3 2 1.")
    assert up + down < 100 and 0.15 < up / (up + down) < 0.35, (up, down)

    # The score now depends on the question; cut from the left as before, the question was gone.
    other = "question: what is 50 - 8? say q:"
    now = rm(None, [QUESTION, other], [LONG, LONG])
    before = _scores_before(rm, [QUESTION, other], [LONG, LONG])
    assert before[0] == pytest.approx(before[1], abs=1e-6) and abs(now[0] - now[1]) > 1e-4


def test_short_samples_score_as_before(classifier):
    rm = RewardModel(str(classifier), batch_size=8)
    prompts = ["abc say k:", "xy say q:", "say a:", "longer context here say z:"]
    outputs = ["kkk", "q q", "", "zz zz zz"]
    assert np.allclose(rm(None, prompts, outputs), _scores_before(rm, prompts, outputs), atol=1e-6)
    # a long sample in the same call changes nothing for the short ones
    with pytest.warns(UserWarning, match="cut the middle"):
        mixed = rm(None, prompts + [QUESTION], outputs + [LONG])
    assert np.allclose(mixed[:4], _scores_before(rm, prompts, outputs), atol=1e-5) and rm.n_truncated == 1


def test_prompt_too_long_for_the_reward_model_is_refused(classifier):
    from rft_ds.config import ConfigError

    rm = RewardModel(str(classifier), max_length=64, max_length_field="reward.functions[1].max_length")
    long_prompt = "a very long question, " * 20
    with pytest.raises(
        ConfigError,
        match=r"reward.functions\[1\].max_length=64 cannot hold prompt 7 and any of its "
        r"completion: the prompt alone is \d+ reward-model tokens; raise",
    ):
        rm(None, ["say k:", long_prompt], ["k", "x"], prompt_ids=[2, 7])


def test_chat_template_path_keeps_the_question(classifier, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "rm_chat"
    shutil.copytree(classifier, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}{{ m.role }}! {{ m.content }} !!{% endfor %}"  # the toy alphabet
    tok.save_pretrained(path)
    rm = RewardModel(str(path))
    assert rm.chat
    with pytest.warns(UserWarning, match="cut the middle"):
        (ids,) = rm.encode([QUESTION], [LONG])
    text = rm.tokenizer.decode(ids)
    assert len(ids) <= 512 and text.startswith(f"user! {QUESTION} !!assistant!  first step.")
    assert text.endswith(" so the answer is 42 !!")
    short = rm(None, ["abc say k:", "say a:"], ["kkk", ""])  # through the template, scored as before
    assert np.allclose(short, _scores_before(rm, ["abc say k:", "say a:"], ["kkk", ""]), atol=1e-6)
    with pytest.raises(ValueError, match=r"cannot hold prompt 0 .* reward-model tokens with the chat template"):
        RewardModel(str(path), max_length=16)(None, [QUESTION], ["k"])


def test_reward_model_max_length_must_exceed_the_prompt_limit():
    from rft_ds.config import ConfigError, RFTRunConfig

    def cfg(**reward):
        return RFTRunConfig.from_dict(
            {"model": {"model_path": "m"}, "data": {"max_prompt_length": 512}, "reward": reward}
        )

    with pytest.raises(
        ConfigError,
        match=r"reward.reward_model_max_length \(512\) must exceed data.max_prompt_length "
        r"\(512\)",
    ):
        cfg(reward_model="rm")
    cfg(reward_model="rm", reward_model_max_length=1024)
    cfg(reward_fn="rft_ds.rewards:numeric_match")  # no reward model: nothing to check
    with pytest.raises(ConfigError, match=r"reward.functions\[1\].max_length \(512\) must exceed"):
        cfg(functions=["rft_ds.rewards:numeric_match", {"reward_model": "rm"}])  # 512: the entry's default
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].max_length \('x'\) must exceed"):
        cfg(functions=[{"reward_model": "rm", "max_length": "x"}])
    cfg(functions=[{"reward_model": "rm", "max_length": 600}])
