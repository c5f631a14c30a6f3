"""Every prompt source gives the same records; metadata reaches reward_fn; the chat template is applied."""

import json
import re

import pytest

from rft_ds.config import RewardConfig
from rft_ds.data import DataError, load_source, normalize, tokenize, use_chat_template
from rft_ds.reward_terms import build_terms
from rft_ds.scoring import score_shard

ROWS = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3} for i in range(6)]


def _as_prompts(items, field="question", metadata_fields=None):
    return normalize(items, "prompts", field, metadata_fields)


@pytest.fixture()
def datasets():
    return pytest.importorskip("datasets")


def test_list_and_function(tmp_path):
    texts, metas = _as_prompts(load_source(ROWS, "prompts", "question"))
    assert texts[2] == "What is 2 + 1?" and metas[2] == {"answer": "3", "level": 2}
    assert len(load_source("rft_ds.arith:eval_prompts", "prompts")) == 128


def test_jsonl_with_configured_fields(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    texts, metas = _as_prompts(load_source(str(p), "prompts", "question"), metadata_fields=["answer"])
    assert texts == [r["question"] for r in ROWS] and metas[0] == {"answer": "1"}  # only the chosen field


def test_jsonl_malformed_line_names_its_number(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"question": "x", ' + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:3: malformed JSON"):
        load_source(str(p), "prompts", "question")
    p.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: missing field 'question' \(data.prompt_field\)"):
        load_source(str(p), "prompts", "question")


def test_metadata_field_missing_is_named():
    with pytest.raises(DataError, match=r"prompts\[0\] has no field 'solution' \(data.metadata_fields\)"):
        _as_prompts(ROWS, metadata_fields=["solution"])


def test_hf_dataset_object_and_dataset_dict(datasets):
    ds = datasets.Dataset.from_list(ROWS)
    assert _as_prompts(load_source(ds, "prompts", "question")) == _as_prompts(ROWS)
    dd = datasets.DatasetDict(train=ds, test=datasets.Dataset.from_list(ROWS[:2]))
    assert len(load_source(dd, "eval_prompts", "question", split="test")) == 2
    with pytest.raises(DataError, match=r"eval_prompts: the dataset has splits \['test', 'train'\], not 'validation'"):
        load_source(dd, "eval_prompts", "question", split="validation")


def test_load_from_disk_directory(datasets, tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:4])).save_to_disk(str(tmp_path / "dd"))
    assert _as_prompts(load_source(str(tmp_path / "ds"), "prompts", "question")) == _as_prompts(ROWS)
    assert len(load_source(str(tmp_path / "dd"), "prompts", "question", split="train")) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a dataset saved with save_to_disk"):
        load_source(str(tmp_path / "empty"), "prompts")


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_local_data_files(datasets, tmp_path, fmt):
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"prompts.{fmt}"
    getattr(ds, f"to_{fmt}")(str(path))
    texts, metas = _as_prompts(load_source(str(path), "prompts", "question"))
    assert texts == [r["question"] for r in ROWS]
    assert str(metas[4]["answer"]) == "5" and int(metas[4]["level"]) == 1


def test_glob_of_data_files(datasets, tmp_path):
    for i in range(2):
        datasets.Dataset.from_list(ROWS[i * 3 : (i + 1) * 3]).to_parquet(str(tmp_path / f"part-{i}.parquet"))
    texts, _ = _as_prompts(load_source(str(tmp_path / "part-*.parquet"), "prompts", "question"))
    assert texts == [r["question"] for r in ROWS]
    with pytest.raises(DataError, match="file not found"):
        load_source(str(tmp_path / "nothing-*.parquet"), "prompts")
    with pytest.raises(DataError, match="file not found"):
        load_source(str(tmp_path / "missing.csv"), "prompts")


def test_unknown_source_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="is not a directory, a data file"):
        load_source(str(tmp_path / "prompts.xlsx"), "prompts")
    with pytest.raises(DataError, match="got int"):
        load_source(3, "prompts")


def test_metadata_flows_to_reward_fn(tokenizer):
    """Each sample's reward_fn call sees its own prompt's metadata (here: the reference answer)."""
    texts, metas = _as_prompts(ROWS)
    seen = {}

    def reward_fn(samples, prompts, outputs, answer, level, prompt_ids, **kw):
        for p, a, lv, pid in zip(prompts, answer, level, prompt_ids):
            seen[pid] = (p, a, lv)
        return [float(o == a) for o, a in zip(outputs, answer)]

    tokens = [tokenizer("6")["input_ids"], tokenizer("7")["input_ids"], tokenizer("4")["input_ids"]]
    scores, outputs, _ = score_shard(
        build_terms(RewardConfig(), reward_fn),
        [5, 0, 3],
        tokens,
        texts,
        metas,
        tokenizer,
        rc=RewardConfig(batch_size=2),
    )
    assert seen == {5: (texts[5], "6", 2), 0: (texts[0], "1", 0), 3: (texts[3], "4", 0)}
    assert scores.tolist() == [1.0, 0.0, 1.0] and outputs == ["6", "7", "4"]


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)  # in the toy tokenizer's alphabet


def test_chat_template_applied_when_present(tokenizer):
    import copy

    assert use_chat_template(tokenizer, None) is False  # the toy tokenizer has none
    with pytest.raises(DataError, match="apply_chat_template is true but the tokenizer has no chat template"):
        use_chat_template(tokenizer, True)
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = TEMPLATE
    assert use_chat_template(chat_tok, None) is True and use_chat_template(chat_tok, False) is False
    [plain] = tokenize(["abc say k:"], [{}], chat_tok, 256, "prompts", chat=False)
    [chat] = tokenize(["abc say k:"], [{}], chat_tok, 256, "prompts", chat=True, system_prompt="be brief")
    assert chat_tok.decode(chat.token_ids) == "system: be brief user: abc say k: assistant:"
    assert chat.text == plain.text == "abc say k:"  # reward_fn sees the prompt as given
    assert len(chat.token_ids) > len(plain.token_ids)


def test_chat_message_prompts(tokenizer, tmp_path):
    """A prompt may be a list of {role, content} messages (a Python list, a JSONL field, a datasets column):
    rendered with the chat template (data.system_prompt only when it has no system message of its own);
    reward functions get its last user message as the prompt and the messages as a keyword."""
    import copy

    import datasets

    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = TEMPLATE
    convo = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "abc say k:"},
        {"role": "assistant", "content": "k"},
        {"role": "user", "content": "say a:"},
    ]
    rows = [{"prompt": convo, "answer": "a"}, {"prompt": [{"role": "user", "content": "say b:"}], "answer": "b"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source in (rows, str(tmp_path / "c.jsonl"), str(tmp_path / "ds")):
        texts, metas = normalize(load_source(source, "prompts", split="train"), "prompts")
        a, b = tokenize(texts, metas, chat_tok, 256, "prompts", chat=True, system_prompt="sys")
        assert chat_tok.decode(a.token_ids) == "system: be brief user: abc say k: assistant: k user: say a: assistant:"
        assert chat_tok.decode(b.token_ids) == "system: sys user: say b: assistant:"  # system_prompt added
        assert (
            a.token_ids
            == chat_tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        assert (a.text, b.text) == ("say a:", "say b:") and a.metadata == {"answer": "a", "messages": convo}
    bad = {
        "an empty list of chat messages": [],
        "prompts[0][0] must be a chat message": [{"role": "user"}],
        "ends with an assistant message": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    }
    for needle, prompt in bad.items():
        with pytest.raises(DataError, match=re.escape(needle)):
            normalize([{"prompt": prompt}], "prompts")
    with pytest.raises(DataError, match="metadata key 'messages' is reserved"):
        normalize([{"prompt": [{"role": "user", "content": "x"}], "messages": 1}], "prompts")
    texts, metas = normalize([[{"role": "user", "content": "x"}]], "prompts")
    with pytest.raises(DataError, match=r"prompts\[0\] is a list of chat messages, which needs the tokenizer's chat"):
        tokenize(texts, metas, tokenizer, 256, "prompts", chat=False)


def test_chat_prompts_through_the_hf_sampler(tiny_model, tokenizer):
    """The HF sampler continues the rendered conversation (the vLLM sampler: test_e2e's Python API run):
    the same completions as for the same text given as a string prompt to the template."""
    import copy

    from transformers import AutoModelForCausalLM

    from rft_ds.sampling.hf import HFSampler

    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = TEMPLATE
    convo = [
        {"role": "user", "content": "abc say k:"},
        {"role": "assistant", "content": "k"},
        {"role": "user", "content": "say a:"},
    ]
    texts, metas = normalize([convo, "say a:"], "prompts")
    a, b = tokenize(texts, metas, chat_tok, 256, "prompts", chat=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    out = HFSampler(model, chat_tok, batch_size=2, device="cpu").generate([a.token_ids, b.token_ids], 1, greedy, seed=0)
    alone = HFSampler(model, chat_tok, batch_size=1, device="cpu").generate([a.token_ids], 1, greedy, seed=0)
    assert [len(cs) for cs in out] == [1, 1] and all(len(c.token_ids) for cs in out for c in cs)
    assert (
        out[0][0].token_ids.tolist() == alone[0][0].token_ids.tolist()
    )  # left padding beside a shorter prompt changes nothing


def test_module_function_found_in_the_working_directory(tmp_path, monkeypatch):
    """'module:function' finds a module in the working directory, as `python -m` would, whether the run was
    started by rft-ds, launch/train.py or the Python API."""
    import sys

    from rft_ds.data import import_object

    (tmp_path / "my_rewards_here.py").write_text("def score(samples, **kw):\n    return [1.0] * len(samples)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_object("my_rewards_here:score", "reward.reward_fn")(["a", "b"]) == [1.0, 1.0]
    assert sys.path[-1] == str(tmp_path)  # searched last: never shadows an installed package
