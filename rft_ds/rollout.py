"""Multi-turn rollouts: the model takes a turn, the environment answers, until the environment says done.

An environment (`rollout.env: "module:make_env"`) is any object with
    reset(prompt, **metadata) -> None | str | list of chat messages   (None: the dataset's prompt as it is)
    step(model_turn: str) -> (observation: None | str | list of messages, reward: float | None, done: bool)
and optionally close(); either method may be async. `rollout.tools` (plain Python functions) is the common
case without a class: ToolEnv parses the model's tool calls, runs them and answers with their results.

Token in, token out: the model's tokens are kept exactly as sampled; only the environment's text is tokenised
(the chat template's delta after the model's turn), so a trajectory is the sequence the model saw. A
trajectory is stored as one int32 array in which the context tokens (its prompt and everything the
environment said) are marked by a sign: id t is stored as -(t + 1). The pools, checkpoints and the row
exchange carry it as any completion; build_row turns the marks into masked labels, so training and the
stale-weight check see the model's own tokens only. A marked id that reached a model would fail loudly
(a negative embedding index), never train silently on the wrong tokens.

All active trajectories of a rank advance one turn per sampler call (the first turn samples N per prompt in
one request); every rank makes the same number of calls (one small all-reduce per turn: the HF sampler's
calls are collective under ZeRO-3). The environment's calls run in an executor with a per-call timeout: an
environment that raises, hangs or answers with the wrong types, and a tool call that cannot be parsed or run,
end that trajectory as failed (scored rollout.failed_score and counted), never the rank.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rft_ds.errors import ConfigError
from rft_ds.sampling.base import Completion

STATS = ("turns", "tool_calls", "tool_errors", "env_errors", "timeouts", "truncated", "failed")


# --- the sign marks ----------------------------------------------------------------------------------------


def context(ids: Sequence[int]) -> np.ndarray:
    """Token ids the model did not sample (the prompt, the environment's text), marked for the pools."""
    return -(np.asarray(ids, dtype=np.int32) + 1)


def unmark(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, which of them the model sampled) of a stored completion or trajectory."""
    t = np.asarray(tokens)
    own = t >= 0
    return np.where(own, t, -t - 1), own


def final_turn(tokens: np.ndarray) -> np.ndarray:
    """The trajectory's last model turn (what the reward terms score): the tokens after its last marked one."""
    t = np.asarray(tokens)
    marked = np.flatnonzero(t < 0)
    return t[marked[-1] + 1 :] if len(marked) else t


# --- tool calls --------------------------------------------------------------------------------------------


class ToolCallError(ValueError):
    """A tool call that cannot be parsed or run: the trajectory fails, counted as a tool error."""


class ToolTimeout(ToolCallError):
    """A tool that ran past rollout.step_timeout_s in its worker process (killed): counted as a timeout."""


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, fmt: str = "hermes") -> list[tuple[str, dict]]:
    """The tool calls of a model turn, as (name, arguments); [] when the turn calls none (its final answer).
    hermes (Qwen, Hermes, SmolLM3 and most open models): <tool_call>{"name": ..., "arguments": {...}}</tool_call>,
    any number; json (Llama 3): the whole turn is one {"name": ..., "parameters": {...}} object."""
    if fmt == "json":
        body = text.strip()
        if not body.startswith("{"):
            return []
        return [_one_call(body)]
    calls = [_one_call(m.group(1)) for m in TOOL_CALL.finditer(text)]
    if not calls and "<tool_call>" in text:
        raise ToolCallError("a <tool_call> without its </tool_call>")
    return calls


def _one_call(body: str) -> tuple[str, dict]:
    try:
        call = json.loads(body)
    except ValueError as e:
        raise ToolCallError(f"tool call is not JSON ({e}): {body.strip()[:80]!r}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolCallError(f'tool call has no "name": {body.strip()[:80]!r}')
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise ToolCallError(f"tool {call['name']!r}: arguments are not JSON: {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"tool {call['name']!r}: arguments must be an object, got {type(args).__name__}")
    return call["name"], args


class ToolEnv:
    """rollout.tools as an environment: a turn with tool calls gets their results (one tool message each); a
    turn without one is the final answer, which the reward terms score. A call that cannot be parsed, names
    no tool, or whose tool raises (bad arguments included) fails the trajectory: RFT keeps the best
    trajectories, and one that recovered from a broken call would teach the broken call. `call` runs a tool
    (name, arguments) -> result; default: here, in the rank's process."""

    def __init__(self, tools: dict[str, Callable], fmt: str = "hermes", call: Callable | None = None) -> None:
        self.tools, self.fmt, self.call = tools, fmt, call
        self.tool_calls = 0

    def reset(self, prompt: str, **metadata: Any) -> None:
        return None  # the dataset's prompt, rendered with the tools' schema

    def step(self, model_turn: str) -> tuple[list[dict] | None, None, bool]:
        calls = parse_tool_calls(model_turn, self.fmt)
        if not calls:
            return None, None, True
        out = []
        for name, args in calls:
            self.tool_calls += 1
            if name not in self.tools:
                raise ToolCallError(f"no tool named {name!r} (tools: {', '.join(self.tools)})")
            if self.call is not None:
                result = self.call(name, args)
            else:
                try:
                    result = self.tools[name](**args)
                except Exception as e:  # noqa: BLE001 - bad arguments (TypeError) or the tool's own error
                    raise ToolCallError(f"tool {name}({_short(args)}) raised {type(e).__name__}: {e}") from None
            out.append({"role": "tool", "name": name, "content": str(result)})
        return out, None, False


def call_tool(spec: str, arguments: dict) -> str:
    """In a worker process (rollout.executor: process): the tool "module:function" called with the model's
    arguments (JSON both ways)."""
    from rft_ds.data import import_object

    return str(import_object(spec, "rollout.tools")(**arguments))


def in_worker(specs: dict[str, str], workers: int, timeout_s: float | None) -> Callable[[str, dict], str]:
    """A ToolEnv `call` that runs each tool in rft_ds.verifier's worker processes: a tool that hangs (in C, where
    no signal reaches) or crashes is killed with its process and counted, and a CPU-bound tool runs beside the
    rank instead of holding its GIL."""
    from rft_ds import verifier

    modules = sorted({s.partition(":")[0] for s in specs.values()})
    soft_s = timeout_s if timeout_s is not None else 3600.0

    def call(name: str, args: dict) -> str:
        status, value = verifier.pool(["rft_ds.rollout", *modules], workers).check(
            "rft_ds.rollout:call_tool", [specs[name], args], soft_s
        )
        if status == "timeout":
            raise ToolTimeout(f"tool {name}({_short(args)}) ran past rollout.step_timeout_s ({soft_s} s)")
        if status != "ok":
            raise ToolCallError(f"tool {name}({_short(args)}) raised {value}")
        return value

    return call


def _short(args: dict) -> str:
    s = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return s if len(s) <= 80 else s[:77] + "..."


# --- the spec: what rollout.* names, imported and checked before any model loads ----------------------------


@dataclass
class RolloutSpec:
    """rollout.env or rollout.tools, imported and checked (load_spec); the rest of the rollout config."""

    make_env: Callable[[], Any]
    schemas: list[dict] = field(default_factory=list)  # the tools' JSON schemas (chat template `tools=`)
    cfg: Any = None  # config.RolloutConfig


def load_spec(rc: Any) -> RolloutSpec | None:
    """rollout.env / rollout.tools imported, each tool's schema built from its signature and docstring, and one
    environment made and closed: an import, a call or a missing method fails here in one line, before any
    model loads. None when rollouts are off."""
    from rft_ds.data import import_object

    if rc.env is None and not rc.tools:
        return None
    if rc.env is not None:
        make_env = import_object(rc.env, "rollout.env")
        if not callable(make_env):
            raise ConfigError(f"rollout.env {rc.env!r} is not callable (a function or class returning an environment)")
        try:
            env = make_env()
        except Exception as e:  # noqa: BLE001 - the user's code: one line naming it
            raise ConfigError(f"rollout.env {rc.env!r}() raised {type(e).__name__}: {e}") from None
        missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
        if missing:
            raise ConfigError(
                f"rollout.env {rc.env!r}() returned a {type(env).__name__} without {', '.join(missing)}()"
            )
        _close(_Live(env=env))
        return RolloutSpec(make_env, [], rc)
    from transformers.utils import get_json_schema

    tools, schemas = {}, []
    for i, name in enumerate(rc.tools):
        fn = import_object(name, f"rollout.tools[{i}]") if isinstance(name, str) else name
        if not callable(fn):
            raise ConfigError(f"rollout.tools[{i}] {name!r} is not callable")
        try:
            schema = get_json_schema(fn)
        except Exception as e:  # noqa: BLE001 - transformers says what the docstring lacks
            raise ConfigError(
                f"rollout.tools[{i}] {name!r}: no tool schema from its signature and docstring ({e})"
            ) from None
        name = schema["function"]["name"]
        if name in tools:
            raise ConfigError(
                f"rollout.tools[{i}] {name!r}: two tools named {name!r}: the model could not tell them apart"
            )
        tools[name] = fn
        schemas.append(schema)
    fmt = rc.tool_format
    call = None
    if rc.executor == "process":  # each tool by name in a worker process (the config checked they are names)
        specs = dict(zip(tools, rc.tools))
        call = in_worker(specs, rc.max_concurrency, rc.step_timeout_s)
    return RolloutSpec(lambda: ToolEnv(tools, fmt, call), schemas, rc)


# --- the executor: environment calls with a timeout, on daemon threads ---------------------------------------


TIMEOUT = object()


class Calls:
    """Runs environment calls (thread: on `workers` daemon threads, each call within timeout_s; inline: in
    this thread, no timeout). A call that hangs past its timeout is abandoned, not joined, and a fresh
    thread takes its place, so hung tools never block the rank or its exit."""

    def __init__(self, executor: str = "thread", workers: int = 16, timeout_s: float | None = None) -> None:
        self.executor, self.workers, self.timeout_s = executor, workers, timeout_s
        self._jobs: queue.Queue = queue.Queue()
        self._threads = 0

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[tuple[Any, BaseException | object | None]]:
        """Each fn's (value, None), or (None, its exception), or (None, TIMEOUT); in order."""
        if self.executor == "inline":
            return [_guarded(fn) for fn in fns]
        slots: list[dict] = [{"done": threading.Event()} for _ in fns]
        for fn, slot in zip(fns, slots):
            self._jobs.put((fn, slot))
        while self._threads < min(self.workers, len(fns)):
            self._spawn()
        out = []
        for slot in slots:
            while not slot["done"].is_set():
                started = slot.get("started")
                if started is None:
                    slot["done"].wait(0.05)
                    continue
                left = None if self.timeout_s is None else started + self.timeout_s - time.monotonic()
                if left is not None and left <= 0:
                    slot["abandoned"] = True
                    self._threads -= 1  # its thread is stuck in the call: another one takes its place
                    self._spawn()
                    break
                slot["done"].wait(left if left is not None else 0.5)
            out.append(slot["result"] if slot["done"].is_set() and not slot.get("abandoned") else (None, TIMEOUT))
        return out

    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=self._work, daemon=True, name="rft_ds-rollout").start()

    def _work(self) -> None:
        while True:
            fn, slot = self._jobs.get()
            slot["started"] = time.monotonic()
            result: tuple[Any, Any] = (None, RuntimeError("the environment call ended without a result"))
            try:
                result = _guarded(fn)
            finally:  # whatever the call raised (SystemExit, CancelledError), its slot gets an answer
                if not slot.get("abandoned"):
                    slot["result"] = result
                    slot["done"].set()
            if slot.get("abandoned"):
                return  # replaced while it hung: this thread ends here


def _guarded(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """fn's (value, None), or (None, what it raised): any exception but Ctrl-C (SystemExit and an async
    environment's CancelledError included), so an environment can fail its trajectory, not its thread."""
    try:
        return fn(), None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the environment's error fails its trajectory, counted
        return None, e


def _close(t: _Live) -> None:
    """The environment's close() if it has one (a failing close loses nothing), then its event loop."""
    close = getattr(t.env, "close", None)
    if callable(close):
        try:
            _env_call(t, close)
        except Exception:  # noqa: BLE001
            pass
    if t.loop is not None:
        t.loop.close()


def _env_call(t: _Live, fn: Callable[[], Any]) -> Any:
    """fn() for t's environment; an async method runs on the environment's own event loop, kept from reset to
    close, so what reset opened (an HTTP client, a subprocess) still works in step."""
    value = fn()
    if inspect.isawaitable(value):
        if t.loop is None:
            t.loop = asyncio.new_event_loop()
        value = t.loop.run_until_complete(_awaited(value))
    return value


async def _awaited(x: Any) -> Any:
    return await x


# --- trajectories ------------------------------------------------------------------------------------------


@dataclass
class Trajectory(Completion):
    """A Completion (samples.Samples stores it as one) whose token_ids carry the sign marks, plus what the
    environment said: its reward (NaN: none; the reward terms score the final turn) and the counts of STATS."""

    reward: float = math.nan
    stats: np.ndarray = field(default_factory=lambda: np.zeros(len(STATS), np.int32))


@dataclass
class _Live:
    env: Any = None
    # every token id so far (unmarked): what the next turn sees; int32, 4 bytes a token (a Python list: ~36)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    parts: list = field(default_factory=list)  # stored pieces: marked context, model turns
    logprobs: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: dict.fromkeys(STATS, 0))
    finish: str = "eos"
    active: bool = True
    first_error: str | None = None
    loop: Any = None  # the environment's event loop, made when an async method is first called

    def fail(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        self.stats["failed"] = 1
        self.first_error = self.first_error or message
        self.active = False


class Rollout:
    """Runs rollouts for the recipe and the evals: `generate` has the sampler's shape (token ids in, one
    list of Trajectory per prompt out)."""

    def __init__(self, spec: RolloutSpec, tokenizer: Any, chat: bool, system_prompt: str | None, eos_id: int) -> None:
        rc = spec.cfg
        self.spec, self.rc, self.tokenizer, self.chat, self.eos_id = spec, rc, tokenizer, chat, eos_id
        self.system_prompt = system_prompt
        # process: the tools run in worker processes (ToolEnv's call), the steps that wait for them on threads
        self.calls = Calls("inline" if rc.executor == "inline" else "thread", rc.max_concurrency, rc.step_timeout_s)
        self.errors: list[str] = []  # the first failure messages of the last generate (for a console line)

    def generate(
        self,
        sampler: Any,
        records: Sequence[Any],
        n: int,
        gen_kwargs: dict[str, Any],
        seed: int,
        progress: str | None = None,
        logprobs: bool | Sequence[bool] = False,
    ) -> list[list[Trajectory]]:
        """n trajectories for each prompt record (token_ids, text, metadata), in order. Collective: every rank
        makes the same number of sampler calls, one per turn."""
        from rft_ds import distributed as D

        rc = self.rc
        asked = [logprobs] * len(records) if isinstance(logprobs, bool) else list(logprobs)
        live = [[_Live() for _ in range(n)] for _ in records]
        flat = [(i, t) for i, ts in enumerate(live) for t in ts]
        results = self.calls.run([lambda t=t, r=records[i]: self._reset(t, r) for i, t in flat])
        for (i, t), (value, err) in zip(flat, results):
            self._guard(t, "reset", self._start, t, records[i], value, err)
        turn = 0
        while True:
            todo = [(i, t) for i, t in flat if t.active]
            if D.max_over_ranks(len(todo)) == 0:
                break
            budgets = [min(gen_kwargs["max_new_tokens"], rc.max_tokens - len(t.ids) - 1) for _, t in todo]
            seed_t = int(np.random.SeedSequence([seed, turn]).generate_state(1)[0])
            label = (f"{progress} turn {turn + 1}" if turn else progress) if progress else None
            outs = self._sample(sampler, todo, live, n, gen_kwargs, budgets, seed_t, label, asked, turn)
            # the environment sees every finished turn; a turn cut by a length limit ends its trajectory unseen
            shown = [k for k, c in enumerate(outs) if c.finish_reason != "length"]
            answers = dict(zip(shown, self.calls.run([self._step_call(todo[k][1], outs[k]) for k in shown])))
            for k, ((_, t), c) in enumerate(zip(todo, outs)):
                self._guard(t, "step", self._advance, t, c, *answers.get(k, (None, None)))
            turn += 1
        self.errors = [t.first_error for _, t in flat if t.first_error][:3]
        self.calls.run([lambda t=t: _close(t) for _, t in flat if t.env is not None or t.loop is not None])
        return [[self._trajectory(t) for t in ts] for ts in live]

    # --- one trajectory's steps

    def _step_call(self, t: _Live, c: Completion) -> Callable[[], Any]:
        return lambda: _env_call(t, lambda: t.env.step(self._text(c.token_ids)))

    def _reset(self, t: _Live, record: Any) -> Any:
        t.env = self.spec.make_env()
        meta = {k: v for k, v in record.metadata.items() if k not in ("prompt", "self")}  # reset's own names
        return _env_call(t, lambda: t.env.reset(record.text, **meta))

    def _guard(self, t: _Live, what: str, fn: Callable[..., None], *args: Any) -> None:
        """fn(*args): what the rank does with an environment's answer (render it with the template, read its
        counts) may fail on what the environment said; that fails the trajectory, never the rank."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            if t.active or not t.stats["failed"]:
                t.fail("env_errors", f"env.{what}'s answer could not be used: {type(e).__name__}: {e}")

    def _start(self, t: _Live, record: Any, start: Any, err: Any) -> None:
        if err is not None:
            return t.fail("timeouts" if err is TIMEOUT else "env_errors", _why("reset", err))
        if start is None:
            ids = record.token_ids
        elif isinstance(start, str) or _messages(start):
            ids = self._render(start)
        else:
            return t.fail("env_errors", f"reset returned a {type(start).__name__}: want None, text or chat messages")
        if len(ids) + 2 > self.rc.max_tokens:
            return t.fail(
                "env_errors", f"reset's prompt is {len(ids)} tokens: rollout.max_tokens is {self.rc.max_tokens}"
            )
        t.ids = np.asarray(ids, np.int32)
        t.parts = [context(t.ids)]

    def _advance(self, t: _Live, c: Completion, value: Any, err: Any) -> None:
        """Take the model's turn c and the environment's answer to it."""
        own = np.asarray(c.token_ids, np.int32)
        t.stats["turns"] += 1
        t.finish = c.finish_reason
        if c.logprobs is not None:
            t.logprobs.append(np.asarray(c.logprobs, np.float32))
        if c.finish_reason == "length":  # cut by max_new_tokens or rollout.max_tokens: never shown to the env
            t.parts.append(own)
            t.stats["truncated"], t.active = 1, False
            return
        if err is not None:
            t.parts.append(own)
            timed_out = err is TIMEOUT or isinstance(err, ToolTimeout)
            kind = "timeouts" if timed_out else "tool_errors" if isinstance(err, ToolCallError) else "env_errors"
            return t.fail(kind, _why("step", err))
        if not (isinstance(value, tuple) and len(value) == 3):
            t.parts.append(own)
            return t.fail("env_errors", f"step returned {type(value).__name__}: want (observation, reward, done)")
        obs, reward, done = value
        bad = _bad_step(obs, reward, done)
        if bad:
            t.parts.append(own)
            return t.fail("env_errors", f"step returned {bad}")
        if reward is not None:
            t.rewards.append(float(reward))
        if done or obs is None:
            t.parts.append(own)
            t.active = False
            return
        # the model's turn with the token that ended it (trained on: the model learns to end its turns), then
        # the environment's answer as the chat template renders it after that token
        end = c.end_id if c.end_id is not None else self.eos_id  # the token the model ended its turn with
        ended = np.append(own, np.int32(end)) if c.finish_reason == "eos" else own
        delta = np.asarray(self._delta(obs, end if c.finish_reason == "eos" else None), np.int32)
        if t.stats["turns"] >= self.rc.max_turns or len(t.ids) + len(ended) + len(delta) + 2 > self.rc.max_tokens:
            t.parts.append(own)
            t.finish, t.stats["truncated"], t.active = "length", 1, False  # no EOS: not a place to stop
            return
        t.parts += [ended.astype(np.int32), context(delta)]
        t.ids = np.concatenate([t.ids, ended, delta]).astype(np.int32)

    def _trajectory(self, t: _Live) -> Trajectory:
        tokens = np.concatenate(t.parts) if t.parts else np.zeros(0, np.int32)
        if t.stats["failed"]:
            reward = float(self.rc.failed_score)
        elif t.rewards:
            reward = sum(t.rewards) if self.rc.reward == "sum" else t.rewards[-1]
        else:
            reward = math.nan  # the reward terms score the final turn
        stats = np.array([t.stats[k] for k in STATS], np.int32)
        calls = getattr(t.env, "tool_calls", 0)
        stats[STATS.index("tool_calls")] = int(calls) if isinstance(calls, (int, np.integer)) else 0
        finish = "length" if t.stats["failed"] else t.finish  # a failed or cut trajectory is not trained to end
        # the sampler's log p per label of the row: each model token, and the EOS when it ended by one
        lp = np.concatenate(t.logprobs) if t.logprobs and len(t.logprobs) == t.stats["turns"] else None
        labels = int((tokens >= 0).sum()) + (finish == "eos")
        if lp is not None and len(lp) == labels + 1:
            lp = lp[:-1]  # the last turn's EOS, where the trajectory ended without one (cut by max_turns)
        lp = lp if lp is not None and len(lp) == labels else None
        return Trajectory(tokens, finish, lp, reward=reward, stats=stats)

    # --- sampling a turn

    def _sample(
        self,
        sampler: Any,
        todo: list,
        live: list,
        n: int,
        gen_kwargs: dict,
        budgets: list[int],
        seed: int,
        label: str | None,
        asked: list[bool],
        turn: int,
    ) -> list[Completion]:
        """One sampler call for every active trajectory (in `todo` order). On the first turn, when each prompt's
        n trajectories start alike (the usual case), a prompt is one request of n samples: its prefill is
        shared. Later turns are one request per trajectory, each seeing its own past in the prefix cache."""
        if (
            turn == 0
            and n > 1
            and len(todo) == n * len(live)
            and all(np.array_equal(t.ids, ts[0].ids) for ts in live for t in ts[1:])
        ):
            outs = sampler.generate(
                [ts[0].ids for ts in live],
                n,
                gen_kwargs,
                seed,
                label,
                logprobs=asked,
                max_new_tokens=budgets[::n],
                keep_cache=False,
            )
            return [c for cs in outs for c in cs]
        outs = sampler.generate(
            [t.ids for _, t in todo],
            1,
            gen_kwargs,
            seed,
            label,
            logprobs=[asked[i] and live[i][0] is t for i, t in todo],
            max_new_tokens=budgets,
            keep_cache=turn > 0,
        )
        return [cs[0] for cs in outs]

    # --- text

    def _text(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(x) for x in ids], skip_special_tokens=True)

    def _apply(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        from rft_ds.data import template_takes_tools

        tools = self.spec.schemas if self.spec.schemas and template_takes_tools(self.tokenizer) else None
        return self.tokenizer.apply_chat_template(
            msgs, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _render(self, start: str | list) -> list[int]:
        """reset's prompt as the dataset's would be (data.format_prompt: system prompt, tools)."""
        from rft_ds.data import format_prompt

        if not self.chat and not isinstance(start, str):
            start = "\n".join(m["content"] for m in start)
        text = format_prompt(start, self.tokenizer, self.chat, self.system_prompt, self.spec.schemas)
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def _delta(self, obs: str | list, end_id: int | None) -> list[int]:
        """The environment's answer as tokens after a model turn that ended with token end_id (None: by a stop
        sequence): without a chat template, its text as it is; with one, env_delta's text."""
        tok = self.tokenizer
        if not self.chat:
            text = obs if isinstance(obs, str) else "\n".join(str(m.get("content", "")) for m in obs)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        msgs = [{"role": "user", "content": obs}] if isinstance(obs, str) else list(obs)
        text = env_delta(tok, msgs, self.spec.schemas, tok.decode([end_id]) if end_id is not None else None)
        return list(tok(text, add_special_tokens=False)["input_ids"])


TURN = "RFT_DS_ASSISTANT_TURN"  # an assistant message's content, to find where the template puts it


def env_delta(tokenizer: Any, messages: list[dict], schemas: Sequence[dict] = (), end_text: str | None = None) -> str:
    """What the chat template renders after an assistant turn when these messages follow it, up to the next
    assistant turn's start: the turn's terminator, the messages, the generation prompt; minus end_text, the
    terminator the model sampled itself (None: it ended by a stop sequence and the whole terminator is
    context). Only what follows the assistant's content is read, so a template that renders earlier turns
    otherwise once more messages follow (Qwen3 drops their <think> block) gives the same delta."""
    from rft_ds.data import template_takes_tools

    tools = list(schemas) if schemas and template_takes_tools(tokenizer) else None
    convo = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": TURN}, *messages]
    extra = {"tools": tools} if tools else {}
    after = tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False, **extra)
    if TURN not in after:
        raise ConfigError("the chat template does not render an assistant turn's content")
    delta = after[after.rindex(TURN) + len(TURN) :]
    if end_text and delta.startswith(end_text):
        return delta[len(end_text) :]
    return delta


def _messages(x: Any) -> bool:
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)
    )


def _bad_step(obs: Any, reward: Any, done: Any) -> str | None:
    """What is wrong with a step's answer, or None."""
    if not (obs is None or isinstance(obs, str) or _messages(obs)):
        return f"an observation of type {type(obs).__name__}: want None, text or chat messages"
    if reward is not None and not _finite(reward):
        return f"reward {reward!r}: want a finite number or None"
    if not isinstance(done, (bool, np.bool_)):
        return f"done={done!r}: want a bool"
    return None


def _finite(x: Any) -> bool:
    """A number a reward can be (numpy's too), not a bool, and finite."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _why(what: str, err: Any) -> str:
    if err is TIMEOUT:
        return f"env.{what} timed out"
    return f"env.{what} raised {type(err).__name__}: {err}"
