"""Multi-turn rollouts without an engine: tool-call parsing, the executor's timeouts, and Rollout.generate over
a scripted sampler with a character-level ChatML tokenizer, so every token of a trajectory can be checked
against what the chat template renders."""

from __future__ import annotations

import asyncio
import math
import string
import time
from types import SimpleNamespace

import numpy as np
import pytest

from rft_ds.config import RolloutConfig
from rft_ds.experience import IGNORE_INDEX, build_row, pack_rows
from rft_ds.rollout import (
    STATS,
    TIMEOUT,
    Calls,
    Rollout,
    RolloutSpec,
    ToolCallError,
    ToolEnv,
    context,
    final_turn,
    load_spec,
    parse_tool_calls,
    unmark,
)
from rft_ds.sampling.base import Completion

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TOOLS = "{% if tools %}<|im_start|>functions\n{{ tools | tojson }}<|im_end|>\n{% endif %}" + CHATML


def chat_tokenizer(template: str = CHATML):
    """One token per printable character, plus ChatML's two special tokens (EOS: <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<|im_end|>", "<|im_start|>"] + sorted(set(string.printable)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", additional_special_tokens=["<|im_start|>"]
    )
    fast.chat_template = template
    return fast


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits and + - * ( ), e.g. 12*(3+4)
    """
    if set(expression) - set("0123456789+-*() "):
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(eval(expression))  # noqa: S307 - checked above


class ScriptedSampler:
    """A sampler whose turn is script(text the model sees so far) -> (text, finish_reason); records its calls."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls = tokenizer, script, []

    def generate(
        self, prompts, n, gen_kwargs, seed, progress=None, logprobs=False, max_new_tokens=None, keep_cache=False
    ):
        self.calls.append(dict(n=n, prompts=len(prompts), max_new_tokens=max_new_tokens, keep_cache=keep_cache))
        asked = [logprobs] * len(prompts) if isinstance(logprobs, bool) else list(logprobs)
        out = []
        for p, a, limit in zip(prompts, asked, max_new_tokens or [gen_kwargs["max_new_tokens"]] * len(prompts)):
            cs = []
            for j in range(n):
                text, finish = self.script(self.tok.decode(p), j)
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) > limit:
                    ids, finish = ids[:limit], "length"
                lp = np.full(len(ids) + (finish == "eos"), -0.5, np.float32) if a else None
                cs.append(Completion(np.asarray(ids, np.int32), finish, lp))
            out.append(cs)
        return out


def record(tok, text, chat=True, tools=None):
    from rft_ds.data import format_prompt

    ids = tok(format_prompt(text, tok, chat, None, tools), add_special_tokens=not chat)["input_ids"]
    return SimpleNamespace(token_ids=ids, text=text, metadata={"answer": "42"})


def rollout(tok, make_env, schemas=(), **rc):
    cfg = RolloutConfig(**{"executor": "inline", "step_timeout_s": None, "max_tokens": 1024, **rc})
    return Rollout(RolloutSpec(make_env, list(schemas), cfg), tok, True, None, tok.eos_token_id)


def tool_spec():
    return load_spec(RolloutConfig(tools=[calculator]))


# --- parsing and the tool environment


def test_parse_tool_calls_hermes_and_json():
    assert parse_tool_calls("the answer is 4") == []
    assert parse_tool_calls('<tool_call>{"name": "calc", "arguments": {"x": "1+2"}}</tool_call>') == [
        ("calc", {"x": "1+2"})
    ]
    two = (
        '<tool_call>\n{"name": "a", "arguments": "{\\"k\\": 1}"}\n</tool_call> and <tool_call>{"name": "b"}</tool_call>'
    )
    assert parse_tool_calls(two) == [("a", {"k": 1}), ("b", {})]  # arguments as a JSON string, or none
    assert parse_tool_calls('{"name": "calc", "parameters": {"x": 1}}', "json") == [("calc", {"x": 1})]
    assert parse_tool_calls("plain text", "json") == []
    for bad, match in [
        ("<tool_call>{not json}</tool_call>", "not JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
        ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "must be an object"),
        ('<tool_call>{"name": "a"}', "without its </tool_call>"),
    ]:
        with pytest.raises(ToolCallError, match=match):
            parse_tool_calls(bad)


def test_tool_env_runs_calls_and_refuses_bad_ones():
    env = ToolEnv({"calculator": calculator})
    obs, reward, done = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>')
    assert obs == [{"role": "tool", "name": "calculator", "content": "42"}] and reward is None and not done
    assert env.step("It is 42.") == (None, None, True) and env.tool_calls == 1
    with pytest.raises(ToolCallError, match="no tool named 'search'"):
        env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    with pytest.raises(ToolCallError, match=r"calculator\(expr='1'\) raised TypeError"):  # bad arguments
        env.step('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>')
    with pytest.raises(ToolCallError, match="raised ValueError: not arithmetic"):  # the tool's own error
        env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "import os"}}</tool_call>')


def test_load_spec_builds_schemas_and_refuses_in_one_line(tmp_path, monkeypatch):
    from rft_ds.errors import ConfigError

    spec = tool_spec()
    assert spec.schemas[0]["function"]["name"] == "calculator"
    assert isinstance(spec.make_env(), ToolEnv)
    assert load_spec(RolloutConfig()) is None
    (tmp_path / "envs_mod.py").write_text(
        "def boom():\n    raise RuntimeError('no docker here')\n"
        "class NoStep:\n    def reset(self, prompt): return None\n"
        "def undocumented(x):\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for rc, match in [
        (RolloutConfig(env="envs_mod:boom"), r"rollout.env 'envs_mod:boom'\(\) raised RuntimeError: no docker here"),
        (RolloutConfig(env="envs_mod:NoStep"), "returned a NoStep without step()"),
        (RolloutConfig(env="envs_mod:missing"), "has no attribute 'missing'"),
        (RolloutConfig(env="no_such_module_xyz:f"), "cannot import module"),
        (RolloutConfig(tools=["envs_mod:undocumented"]), r"rollout.tools\[0\] 'envs_mod:undocumented': no tool schema"),
    ]:
        with pytest.raises((ConfigError, ValueError), match=match) as e:
            load_spec(rc)
        assert "\n" not in str(e.value)


def test_calls_time_out_hung_calls_and_keep_going():
    calls = Calls("thread", workers=2, timeout_s=0.3)

    def later():
        time.sleep(0.01)
        return "later"

    t0 = time.monotonic()
    out = calls.run([lambda: time.sleep(30), lambda: 1, lambda: 1 / 0, later, lambda: time.sleep(30), lambda: 2])
    assert time.monotonic() - t0 < 5  # the two hung calls are abandoned at their timeouts, not joined
    assert out[0] == (None, TIMEOUT) and out[4] == (None, TIMEOUT)
    assert out[1] == (1, None) and out[5] == (2, None) and out[3] == ("later", None)
    assert isinstance(out[2][1], ZeroDivisionError)
    assert calls.run([lambda: 3]) == [(3, None)]  # replacement threads serve later calls
    assert Calls("inline").run([lambda: 4, lambda: 1 / 0])[0] == (4, None)


# --- trajectories


def tool_script(text, j):
    """A model that calls the calculator, then answers with what it returned."""
    if "<|im_start|>tool" not in text:
        return '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>', "eos"
    return f"The answer is {text.rsplit('<|im_start|>tool', 1)[1].split('<|im_end|>')[0].strip()}.", "eos"


@pytest.mark.parametrize("template", [CHATML, CHATML_TOOLS])
def test_tool_trajectory_is_the_conversation_the_template_renders(template):
    tok = chat_tokenizer(template)
    spec = tool_spec()
    ro = Rollout(spec, tok, True, None, tok.eos_token_id)
    ro.rc = RolloutConfig(executor="inline", max_tokens=2048)
    sampler = ScriptedSampler(tok, tool_script)
    rec = record(tok, "What is 6*7?", tools=spec.schemas)
    [[t0, t1]] = ro.generate(sampler, [rec], 2, {"max_new_tokens": 200}, seed=1, logprobs=[True])
    ids, own = unmark(t0.token_ids)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    convo = [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "calculator", "content": "42"},
        {"role": "assistant", "content": "The answer is 42."},
    ]
    from rft_ds.data import template_takes_tools, tool_prompt

    tools = spec.schemas if template_takes_tools(tok) else None
    system = [] if tools else [{"role": "system", "content": tool_prompt(spec.schemas)}]
    rendered = tok.apply_chat_template(system + convo, tools=tools, tokenize=False)
    # token in, token out: the trajectory is exactly the rendered conversation, minus the final turn's end
    assert tok.decode(ids) + "<|im_end|>\n" == rendered
    assert tok.decode(ids[own]) == call + "<|im_end|>" + "The answer is 42."  # the model's own tokens
    assert list(ids[: len(rec.token_ids)]) == list(rec.token_ids) and not own[: len(rec.token_ids)].any()
    assert t0.finish_reason == "eos" and math.isnan(t0.reward)  # the reward terms score the final turn
    assert tok.decode(final_turn(t0.token_ids)) == "The answer is 42."
    assert dict(zip(STATS, t0.stats)) == dict(
        turns=2, tool_calls=1, tool_errors=0, env_errors=0, timeouts=0, truncated=0, failed=0
    )
    # the row trains on the model's tokens and the final EOS only; the sampler's log p lines up with those labels
    row = build_row((), t0.token_ids, True, tok.eos_token_id, 4096)
    labels = row.labels[row.labels != IGNORE_INDEX]
    assert tok.decode(labels) == call + "<|im_end|>The answer is 42.<|im_end|>"
    assert t0.logprobs is not None and len(t0.logprobs) == len(labels)
    assert t1.logprobs is None  # only a probe prompt's first trajectory carries them
    # the first turn is one request of n; the second one request per trajectory, reusing the prefix cache
    assert [(c["n"], c["prompts"], c["keep_cache"]) for c in sampler.calls] == [(2, 1, False), (1, 2, True)]
    # two trajectories of one prompt pack into one sequence (train.share_prompt): same labels, prompt once
    row1 = build_row((), t1.token_ids, True, tok.eos_token_id, 4096)
    batch, order = pack_rows([row, row1], tok.pad_token_id, 4096)
    assert (batch["labels"] != IGNORE_INDEX).sum() == (row.labels != IGNORE_INDEX).sum() * 2
    assert batch["input_ids"].shape[1] < len(row.input_ids) * 2


def test_a_plain_model_without_chat_template_gets_the_observation_as_text(tokenizer):
    class Echo:
        def reset(self, prompt, **meta):
            return None

        def step(self, turn):
            return (" key q:", 0.25, False) if "key" not in turn else (None, 1.0, True)

    def script(text, j):
        return ("ab", "eos") if "key q:" not in text else ("key", "eos")

    cfg = RolloutConfig(env="x:y", executor="inline", max_tokens=200)
    ro = Rollout(RolloutSpec(Echo, [], cfg), tokenizer, False, None, tokenizer.eos_token_id)
    rec = SimpleNamespace(token_ids=tokenizer("abc say:")["input_ids"], text="abc say:", metadata={})
    [[t]] = ro.generate(ScriptedSampler(tokenizer, script), [rec], 1, {"max_new_tokens": 8}, seed=0)
    ids, own = unmark(t.token_ids)
    assert tokenizer.decode(ids) == "abc say:ab<eos> key q:key"
    assert t.reward == 1.25  # rollout.reward sum
    ro.rc = RolloutConfig(env="x:y", executor="inline", max_tokens=200, reward="last")
    [[t]] = ro.generate(ScriptedSampler(tokenizer, script), [rec], 1, {"max_new_tokens": 8}, seed=0)
    assert t.reward == 1.0


class BadEnv:
    """reset/step misbehave as the prompt's metadata says."""

    def __init__(self):
        self.mode = None

    def reset(self, prompt, mode="ok", **meta):
        self.mode = mode
        if mode == "reset_raises":
            raise RuntimeError("reset failed")
        if mode == "reset_type":
            return 42
        return None

    def step(self, turn):
        if self.mode == "raises":
            raise KeyError("broken")
        if self.mode == "hangs":
            time.sleep(60)
        if self.mode == "tuple":
            return "obs", 1.0
        if self.mode == "reward_nan":
            return None, float("nan"), True
        if self.mode == "done_str":
            return None, 1.0, "yes"
        if self.mode == "forever":
            return "again", 0.0, False
        return None, 1.0, True


@pytest.mark.parametrize(
    "mode, stat, message",
    [
        ("reset_raises", "env_errors", "env.reset raised RuntimeError: reset failed"),
        ("reset_type", "env_errors", "reset returned a int"),
        ("raises", "env_errors", "env.step raised KeyError"),
        ("hangs", "timeouts", "env.step timed out"),
        ("tuple", "env_errors", "want (observation, reward, done)"),
        ("reward_nan", "env_errors", "reward nan: want a finite number"),
        ("done_str", "env_errors", "done='yes': want a bool"),
        ("forever", "truncated", None),
    ],
)
def test_a_misbehaving_environment_fails_its_trajectory_never_the_rank(tokenizer, mode, stat, message):
    cfg = RolloutConfig(
        env="x:y", executor="thread", step_timeout_s=0.5, max_tokens=200, max_turns=3, failed_score=-1.0
    )
    ro = Rollout(RolloutSpec(BadEnv, [], cfg), tokenizer, False, None, tokenizer.eos_token_id)
    good = SimpleNamespace(token_ids=tokenizer("abc")["input_ids"], text="abc", metadata={"mode": "ok"})
    bad = SimpleNamespace(token_ids=tokenizer("abd")["input_ids"], text="abd", metadata={"mode": mode})
    sampler = ScriptedSampler(tokenizer, lambda text, j: ("xy", "eos"))
    [[ok], [t]] = ro.generate(sampler, [good, bad], 1, {"max_new_tokens": 8}, seed=0)
    assert ok.reward == 1.0 and not ok.stats[STATS.index("failed")]
    assert t.stats[STATS.index(stat)] == 1
    if message:
        assert t.reward == -1.0 and t.finish_reason == "length" and t.stats[STATS.index("failed")] == 1
        assert any(message in e for e in ro.errors), ro.errors
    else:  # cut by max_turns: not failed, but no EOS (never trained to stop there)
        assert t.stats[STATS.index("turns")] == 3 and t.finish_reason == "length" and t.reward == 0.0


def test_max_tokens_bounds_every_turn_and_the_whole_trajectory(tokenizer):
    class Chatty:
        def reset(self, prompt, **meta):
            return None

        def step(self, turn):
            return " more:", None, False

    cfg = RolloutConfig(env="x:y", executor="inline", max_tokens=24, max_turns=50)
    ro = Rollout(RolloutSpec(Chatty, [], cfg), tokenizer, False, None, tokenizer.eos_token_id)
    rec = SimpleNamespace(token_ids=tokenizer("abc")["input_ids"], text="abc", metadata={})
    sampler = ScriptedSampler(tokenizer, lambda text, j: ("abcdefgh", "eos"))
    [[t]] = ro.generate(sampler, [rec], 1, {"max_new_tokens": 6}, seed=0)
    assert len(t.token_ids) + 1 <= 24 and t.stats[STATS.index("truncated")] == 1 and t.finish_reason == "length"
    assert all(m <= 6 for c in sampler.calls for m in c["max_new_tokens"])


def test_marks_round_trip():
    ids = np.array([0, 5, 127], np.int32)
    marked = np.concatenate([context(ids), ids])
    back, own = unmark(marked)
    assert back.tolist() == [0, 5, 127, 0, 5, 127] and own.tolist() == [False] * 3 + [True] * 3
    assert final_turn(marked).tolist() == [0, 5, 127]


def test_the_hf_sampler_runs_the_same_rollouts(tiny_model, tokenizer):
    """GPU machines without vLLM sample with HF generate: the same loop, per-trajectory limits honoured."""
    from transformers import AutoModelForCausalLM

    from rft_ds import toy
    from rft_ds.sampling.hf import HFSampler

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sampler = HFSampler(model, tokenizer, batch_size=4, stop_sequences=[" "], device="cpu")
    cfg = RolloutConfig(env="rft_ds.toy:HintEnv", max_turns=2, max_tokens=40, executor="inline")
    ro = Rollout(load_spec(cfg), tokenizer, False, None, tokenizer.eos_token_id)
    recs = [
        SimpleNamespace(
            token_ids=tokenizer(p["prompt"])["input_ids"], text=p["prompt"], metadata={"target": p["target"]}
        )
        for p in toy.train_prompts(6)
    ]
    out = ro.generate(sampler, recs, 3, {"max_new_tokens": 12}, seed=5)
    assert [len(ts) for ts in out] == [3] * 6
    for rec, ts in zip(recs, out):
        for t in ts:
            ids, own = unmark(t.token_ids)
            hidden = rec.text.split(" say ")[0] + " hint:"  # HintEnv.reset's prompt replaces the dataset's
            assert tokenizer.decode(ids).startswith(hidden) and not own[: len(tokenizer(hidden)["input_ids"])].any()
            assert len(t.token_ids) + 1 <= 40 and t.stats[STATS.index("failed")] == 0
            if t.stats[STATS.index("turns")] == 2:  # the environment's hint is context, between the two turns
                assert " say " + rec.metadata["target"] + ":" in tokenizer.decode(
                    ids[len(tokenizer(hidden)["input_ids"]) :]
                )
                # scored by the environment, or cut by a limit (then the reward terms score the final turn)
                assert math.isnan(t.reward) == (t.finish_reason == "length")
    assert sum(t.stats[STATS.index("turns")] == 2 for ts in out for t in ts) > 0


def test_the_guides_environment_runs(tokenizer):
    """docs/guides/agents.md's GuessEnv, as printed there, through a rollout."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "agents.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "class GuessEnv" in b)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the guide's own example
    guesses = iter(["50", "30", "37"])
    cfg = RolloutConfig(env="my_env:GuessEnv", executor="inline", max_tokens=200, max_turns=3)
    ro = Rollout(RolloutSpec(scope["GuessEnv"], [], cfg), tokenizer, False, None, tokenizer.eos_token_id)
    rec = SimpleNamespace(token_ids=tokenizer("guess:")["input_ids"], text="guess:", metadata={"secret": "37"})
    [[t]] = ro.generate(
        ScriptedSampler(tokenizer, lambda text, j: (next(guesses), "eos")), [rec], 1, {"max_new_tokens": 4}, 0
    )
    ids, _ = unmark(t.token_ids)
    assert tokenizer.decode(ids) == "guess:50<eos>lower30<eos>higher37" and t.reward == 1.0


def test_a_turn_cut_by_its_length_is_never_shown_to_the_environment(tokenizer):
    seen = []

    class Recorder:
        def reset(self, prompt, **meta):
            return None

        def step(self, turn):
            seen.append(turn)
            return None, 1.0, True

    cfg = RolloutConfig(env="x:y", executor="inline", max_tokens=200)
    ro = Rollout(RolloutSpec(Recorder, [], cfg), tokenizer, False, None, tokenizer.eos_token_id)
    recs = [SimpleNamespace(token_ids=tokenizer(p)["input_ids"], text=p, metadata={}) for p in ("abc", "abd")]
    sampler = ScriptedSampler(tokenizer, lambda text, j: ("abcdefgh" if text.startswith("abc") else "ab", "eos"))
    [[cut], [ok]] = ro.generate(sampler, recs, 1, {"max_new_tokens": 4}, seed=0)
    assert seen == ["ab"]  # only the turn that ended
    assert cut.finish_reason == "length" and cut.stats[STATS.index("truncated")] == 1 and math.isnan(cut.reward)
    assert ok.reward == 1.0 and ok.finish_reason == "eos"


def test_the_process_executor_runs_tools_in_workers_and_kills_hung_ones(tokenizer):
    """rollout.executor process: each tool call in a verifier worker; a call past step_timeout_s is ended there
    and counted as a timeout; bad arguments are a tool error; the rank's own threads are never held."""
    from rft_ds.config import ConfigError, RFTRunConfig

    cfg = RolloutConfig(
        tools=["rft_ds.arith:calculator", "tests.rollout_tools:nap"], executor="process", step_timeout_s=1.0
    )
    env = load_spec(cfg).make_env()
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "347 * 29"}}</tool_call>'
    assert env.step(call)[0][0]["content"] == "10063"
    with pytest.raises(ToolCallError, match="unexpected keyword argument 'expr'"):
        env.step(call.replace('"expression"', '"expr"'))
    t0 = time.monotonic()
    from rft_ds.rollout import ToolTimeout

    with pytest.raises(ToolTimeout, match="ran past rollout.step_timeout_s"):
        env.step('<tool_call>{"name": "nap", "arguments": {"seconds": 60}}</tool_call>')
    assert time.monotonic() - t0 < 10
    assert env.step(call)[0][0]["content"] == "10063"  # a fresh worker took the hung one's place
    with pytest.raises(ConfigError, match="rollout.executor process runs rollout.tools named"):
        RFTRunConfig.from_dict(
            {"model": {"model_path": "m"}, "rollout": {"env": "rft_ds.toy:HintEnv", "executor": "process"}}
        )


# --- what a review of the first version found


def test_a_call_that_raises_systemexit_or_is_cancelled_answers_its_slot():
    def leave():
        raise SystemExit(3)

    def cancelled():
        raise asyncio.CancelledError()

    for executor in ("thread", "inline"):
        out = Calls(executor, workers=1, timeout_s=None).run([leave, cancelled, lambda: 5])
        assert isinstance(out[0][1], SystemExit) and isinstance(out[1][1], asyncio.CancelledError)
        assert out[2] == (5, None)  # the one worker thread survived both


GEMMA = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN3 = (  # the last assistant turn gets an empty <think> block; earlier ones are rendered without it
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def special_tokenizer(template: str, specials: list[str], eos: str):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", *specials] + sorted(set(string.printable)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<pad>",
        additional_special_tokens=[x for x in specials if x != eos],
    )
    fast.chat_template = template
    return fast


def test_a_turn_keeps_the_end_token_the_model_sampled():
    """Gemma ends a turn with <end_of_turn>, not its EOS <eos>: the trajectory keeps the sampled token, and the
    environment's text follows it as the template renders it."""
    tok = special_tokenizer(GEMMA, ["<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>")
    end = tok.convert_tokens_to_ids("<end_of_turn>")

    class EndOfTurn(ScriptedSampler):
        def generate(self, *a, **k):
            return [
                [Completion(c.token_ids, c.finish_reason, c.logprobs, end) for c in cs]
                for cs in super().generate(*a, **k)
            ]

    spec = tool_spec()
    ro = Rollout(spec, tok, True, None, tok.eos_token_id)
    ro.rc = RolloutConfig(executor="inline", max_tokens=2048)
    rec = record(tok, "What is 6*7?", tools=spec.schemas)

    def script(text, j):  # tool_script, reading Gemma's markers
        return tool_script(
            text.replace("<start_of_turn>tool", "<|im_start|>tool").replace("<end_of_turn>", "<|im_end|>"), j
        )

    [[t]] = ro.generate(EndOfTurn(tok, script), [rec], 1, {"max_new_tokens": 200}, seed=1)
    ids, own = unmark(t.token_ids)
    text = tok.decode(ids)
    assert (
        "</tool_call><end_of_turn>\n<start_of_turn>tool\n42<end_of_turn>\n<start_of_turn>model\nThe answer is 42."
        in text
    )
    assert "<eos>" not in text and end in ids[own]  # the model's own end-of-turn token, trained on


def calculator_trajectory(tok):
    """One trajectory of tool_script's model with the calculator, and its Rollout (for .errors)."""
    spec = tool_spec()
    ro = Rollout(spec, tok, True, None, tok.eos_token_id)
    ro.rc = RolloutConfig(executor="inline", max_tokens=2048)
    rec = record(tok, "What is 6*7?", tools=spec.schemas)
    [[t]] = ro.generate(ScriptedSampler(tok, tool_script), [rec], 1, {"max_new_tokens": 200}, 1)
    return t, ro


def test_a_template_that_rerenders_earlier_turns_still_gives_the_delta():
    """Qwen3 renders the last assistant turn with an empty <think> block and earlier ones without: only what
    follows the turn's content is taken, so the environment's text is right, and nothing fails."""
    tok = special_tokenizer(QWEN3, ["<|im_end|>", "<|im_start|>"], "<|im_end|>")
    t, ro = calculator_trajectory(tok)
    text = tok.decode(unmark(t.token_ids)[0])
    assert t.stats[STATS.index("failed")] == 0, ro.errors
    assert text.endswith(
        "</tool_call><|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\nThe answer is 42."
    )


def test_a_template_that_cannot_render_the_answer_fails_the_trajectory_and_is_refused_at_start(tiny_model):
    from rft_ds.config import ConfigError, RFTRunConfig
    from rft_ds.preflight import check_env_template

    strict = CHATML.replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}",
    )
    tok = chat_tokenizer(strict)
    t, ro = calculator_trajectory(tok)
    assert t.stats[STATS.index("env_errors")] == 1 and "no tool role" in ro.errors[0]
    cfg = RFTRunConfig.from_dict(
        {"model": {"model_path": str(tiny_model)}, "rollout": {"tools": ["rft_ds.arith:calculator"]}}
    )
    with pytest.raises(ConfigError, match="the chat template cannot render a 'tool' message after an assistant turn"):
        check_env_template(cfg, tok, tool_spec())


def test_an_async_environment_keeps_its_loop_from_reset_to_close(tokenizer):
    closed = []

    class Queued:
        async def reset(self, prompt, **meta):
            self.q = asyncio.Queue()  # bound to the loop it was made on
            await self.q.put(" say k:")
            return None

        async def step(self, turn):
            if self.q.empty():
                return None, np.float32(0.5), True  # a numpy reward is a number too
            return await self.q.get(), None, False

        async def close(self):
            closed.append(True)

    cfg = RolloutConfig(env="x:y", executor="thread", max_tokens=200, step_timeout_s=5)
    ro = Rollout(RolloutSpec(Queued, [], cfg), tokenizer, False, None, tokenizer.eos_token_id)
    rec = SimpleNamespace(
        token_ids=tokenizer("abc")["input_ids"], text="abc", metadata={"prompt": "shadowed", "target": "k"}
    )
    [[t1, t2]] = ro.generate(
        ScriptedSampler(tokenizer, lambda text, j: ("kk", "eos")), [rec], 2, {"max_new_tokens": 4}, 0
    )
    for t in (t1, t2):
        assert t.stats[STATS.index("failed")] == 0 and t.stats[STATS.index("turns")] == 2 and t.reward == 0.5, ro.errors
    assert closed == [True, True]


def test_two_tools_of_one_name_are_refused(monkeypatch, tmp_path):
    from rft_ds.errors import ConfigError

    (tmp_path / "dup_tools.py").write_text(
        'def calculator(expression: str) -> str:\n    """Other.\n\n    Args:\n'
        '        expression: text\n    """\n    return ""\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="two tools named 'calculator'"):
        load_spec(RolloutConfig(tools=["rft_ds.arith:calculator", "dup_tools:calculator"]))
