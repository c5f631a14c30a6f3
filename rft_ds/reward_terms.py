"""What a run's reward is: one or more terms (functions with trlx's or TRL's signature, async or slow ones,
an HF reward model, a remote HTTP scorer), each called on this rank's completions, combined per sample as
a weighted sum over the terms that applied (TRL's semantics: a term returns None for a sample it does not
judge). How each term is called is decided once, at start-up, from its signature, never per call."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import multiprocessing
import numbers
import pickle
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rft_ds.data import resolve_callable
from rft_ds.errors import ConfigError, RewardError

ENTRY_KEYS = ("fn", "reward_model", "url", "name", "batch_size", "executor", "kwargs", "max_length", "label")
EXECUTORS = ("inline", "thread", "process")


@dataclass
class RewardTerm:
    name: str
    fn: Callable | None  # None for a reward model until `load_reward_models` (it needs the rank's device)
    weight: float = 1.0
    style: str = "trlx"  # trlx: fn(samples=, prompts=, outputs=, ...); trl: fn(prompts=, completions=, ...)
    is_async: bool = False
    executor: str = "inline"  # inline, or a bounded pool of threads / spawned processes for slow functions
    batch_size: int | None = None  # samples per call; None: reward.batch_size
    kwargs: dict = field(default_factory=dict)  # fixed extra keyword arguments from the config
    accepts: frozenset | None = None  # keyword names fn takes; None: any (it has **kwargs)
    timeout_s: float | None = None  # per call; None: reward.timeout_s
    reward_model: dict | None = None  # {path, batch_size, max_length, label, max_length_field}
    # what fn counts besides its scores (fn.reports, e.g. ("timeouts", "errors"): it returns rft_ds.rewards.Scores),
    # and the sums since the scorer last took them (reward_<name>_<count> in the metrics)
    reports: tuple = ()
    counts: dict = field(default_factory=dict)


def call_style(fn: Callable, name: str) -> tuple[str, frozenset | None]:
    """("trlx" | "trl", the keyword names it accepts or None for **kwargs), from the signature alone."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trlx's keywords, as always
        return "trlx", None
    open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = frozenset(
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    if "completions" in names:
        return "trl", None if open_kw else names
    if names & {"samples", "outputs"} or (open_kw and not names):
        return "trlx", None if open_kw else names
    raise ConfigError(
        f"reward term {name}: cannot tell how to call it from its parameters {sorted(params)}: name "
        "them (samples, prompts, outputs, **kwargs) as trlx does or (prompts, completions, **kwargs) as TRL"
    )


def _is_async(fn: Callable) -> bool:
    # an object whose __call__ is async (callable() would not say)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _label(fn: Any, spec: Any) -> str:
    if isinstance(spec, str):
        return spec.rsplit(":", 1)[-1]
    return getattr(fn, "__name__", None) or type(fn).__name__


def _term(fn: Callable, spec: Any, entry: dict, what: str) -> RewardTerm:
    name = str(entry.get("name") or _label(fn, spec))
    style, accepts = call_style(fn, what)
    executor = entry.get("executor", "inline")
    if executor not in EXECUTORS:
        raise ConfigError(f"{what}.executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    is_async = _is_async(fn)
    if is_async and executor != "inline":
        raise ConfigError(f"{what}: an async function is awaited on this rank's event loop; executor must be inline")
    if executor == "process":
        try:
            pickle.dumps(fn)
        except Exception:
            raise ConfigError(
                f"{what}: executor process needs a function importable by name ('module:function'), "
                f"and {name} cannot be pickled"
            ) from None
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{what}.kwargs must be a mapping, got {type(kwargs).__name__}")
    bs = entry.get("batch_size")
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
        raise ConfigError(f"{what}.batch_size must be an int >= 1, got {bs!r}")
    return RewardTerm(
        name,
        fn,
        style=style,
        is_async=is_async,
        executor=executor,
        batch_size=bs,
        kwargs=kwargs,
        accepts=accepts,
        reports=tuple(getattr(fn, "reports", ())),
    )


def build_terms(r: Any, reward_fn: Any = None, optional: bool = False) -> list[RewardTerm]:
    """The run's reward terms from the `reward` config section (r) and the API's reward_fn (a callable, a
    'module:function', or a list of them), in order: reward_fn, reward.functions, reward.reward_model,
    reward.url. Checks everything a term can be checked for without loading a model. optional (rollout.env:
    the environment may give the rewards): none is no error."""
    from rft_ds.rewards import check_reward_model

    entries: list[tuple[Any, str]] = []
    given = reward_fn if reward_fn is not None else r.reward_fn
    if given is not None:
        for i, f in enumerate(given if isinstance(given, (list, tuple)) else [given]):
            entries.append((f, "reward.reward_fn" + (f"[{i}]" if isinstance(given, (list, tuple)) else "")))
    entries += [(spec, f"reward.functions[{i}]") for i, spec in enumerate(r.functions)]
    if r.reward_model:
        entries.append(
            (
                {
                    "reward_model": r.reward_model,
                    "batch_size": r.reward_model_batch_size,
                    "max_length": r.reward_model_max_length,
                    "label": r.reward_model_label,
                },
                "reward.reward_model",
            )
        )
    if r.url:
        entries.append(({"url": r.url}, "reward.url"))
    if not entries and optional:
        return []
    if not entries:
        raise ConfigError("a reward is required: reward.reward_fn, reward.functions, reward.reward_model or reward.url")

    terms = []
    for spec, what in entries:
        entry = spec if isinstance(spec, dict) else {"fn": spec}
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{what}: unknown key {unknown[0]!r} (valid: {', '.join(ENTRY_KEYS)})")
        kinds = [k for k in ("fn", "reward_model", "url") if entry.get(k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"{what} must name exactly one of fn, reward_model, url; got {kinds or 'none'}")
        if "fn" in kinds:
            fn = resolve_callable(entry["fn"], what)
            terms.append(_term(fn, entry["fn"], entry, what))
        elif "reward_model" in kinds:
            label = entry.get("label")
            check_reward_model(entry["reward_model"], label)
            rm = {
                "path": entry["reward_model"],
                "batch_size": entry.get("batch_size") or 16,
                "max_length": entry.get("max_length") or 512,
                "label": label,
                "max_length_field": f"{what}_max_length" if what == "reward.reward_model" else f"{what}.max_length",
            }
            terms.append(
                RewardTerm(
                    str(entry.get("name") or "reward_model"), None, reward_model=rm, batch_size=entry.get("batch_size")
                )
            )
        else:
            url = entry["url"]
            if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
                raise ConfigError(f"{what} must be an http:// or https:// URL, got {url!r}")
            scorer = HttpScorer(url, timeout_s=r.timeout_s or 60.0, retries=r.http_retries)
            t = _term(scorer, None, {**entry, "executor": entry.get("executor", "thread")}, what)  # named "remote"
            t.timeout_s = math.inf  # HttpScorer enforces reward.timeout_s per request itself, retries included
            terms.append(t)

    weights = r.weights if r.weights is not None else [1.0] * len(terms)
    if len(weights) != len(terms):
        raise ConfigError(
            f"reward.weights has {len(weights)} entries for {len(terms)} reward terms "
            f"({', '.join(t.name for t in terms)})"
        )
    seen: dict[str, int] = {}
    for t, w in zip(terms, weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"reward.weights: {w!r} for {t.name} is not a finite number")
        t.weight = float(w)
        n = seen[t.name] = seen.get(t.name, 0) + 1
        if n > 1:
            t.name = f"{t.name}_{n}"
    return terms


def function_term(spec: Any, what: str) -> RewardTerm:
    """One reward function ('module:function' or a callable) as a term of its own: an eval set's reward_fn."""
    return _term(resolve_callable(spec, what), spec, {"fn": spec}, what)


def check_arguments(terms: Sequence[RewardTerm], metadata_keys: set) -> None:
    """A term whose signature names no **kwargs must be able to take what it is given, and get what it
    requires: checked once the prompts' metadata keys are known, before any model loads."""
    for t in terms:
        if t.fn is None or t.accepts is None:
            continue
        offered = (
            set(t.kwargs)
            | metadata_keys
            | (
                {"samples", "prompts", "outputs", "tokenizer", "prompt_ids"}
                if t.style == "trlx"
                else {"prompts", "completions", "completion_ids"}
            )
        )
        try:
            params = inspect.signature(t.fn).parameters
        except (TypeError, ValueError):
            continue
        missing = [
            n for n, p in params.items() if p.default is inspect.Parameter.empty and n in t.accepts and n not in offered
        ]
        if missing:
            raise ConfigError(
                f"reward term {t.name} requires {missing[0]!r}, which is neither a {t.style} argument "
                "nor a metadata field of the prompts"
            )


def check_prompts(terms: Sequence[RewardTerm], metadata: Sequence[dict], where: str) -> None:
    """A term that can tell bad prompts before any sample exists (its fn.check_metadata: a code task without
    tests, a math reference that does not parse) says so in one line naming the prompt, before any model
    loads."""
    for t in terms:
        check = getattr(t.fn, "check_metadata", None)
        if check is None:
            continue
        try:
            check(metadata, **t.kwargs)
        except ValueError as e:
            raise ConfigError(f"{where}: reward term {t.name}: {e}") from None


def load_reward_models(terms: Sequence[RewardTerm]) -> None:
    """Put each reward model on this rank's device (after the process group: the device rule needs it)."""
    from rft_ds.rewards import RewardModel

    for t in terms:
        if t.reward_model is not None and t.fn is None:
            rm = t.reward_model
            t.fn = RewardModel(
                rm["path"],
                rm["batch_size"],
                rm["max_length"],
                rm["label"],
                max_length_field=rm.get("max_length_field", "reward.reward_model_max_length"),
            )
            t.style, t.accepts = "trlx", None


# ---- validating what a term returned ----


def describe_sample(i: int, prompt_ids: Sequence[int], outputs: Sequence[str], offset: int = 0) -> str:
    out = outputs[i] if i < len(outputs) else ""
    return f"sample {offset + i} (prompt {prompt_ids[i]}, output {out[:40]!r})"


def _number(v: Any) -> float | None:
    """A score as users return them (bool, int, float, numpy scalar, 0-d or 1-element tensor), or None."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        if v.numel() != 1:
            return None
        v = v.item()
    elif isinstance(v, np.ndarray):
        if v.size != 1:
            return None
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return None


def validate_scores(
    raw: Any,
    n: int,
    prompt_ids: Sequence[int],
    outputs: Sequence[str],
    fn_name: str = "reward_fn",
    offset: int = 0,
    allow_none: bool = False,
) -> np.ndarray:
    """Float64 scores from what a term returned (NaN where it returned None and None is allowed), or a
    RewardError naming the first bad sample."""
    if hasattr(raw, "detach"):
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1).tolist() if raw.ndim <= 1 or raw.size == n else raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise RewardError(f"{fn_name} must return a list of {n} numbers, got {type(raw).__name__}")
    if len(raw) != n:
        raise RewardError(f"{fn_name} returned {len(raw)} scores for {n} samples")
    out = np.empty(n, dtype=np.float64)
    for i, v in enumerate(raw):
        if v is None and allow_none:
            out[i] = np.nan
            continue
        x = _number(v)
        if x is None:
            raise RewardError(
                f"{fn_name} returned {type(v).__name__} {v!r} for "
                f"{describe_sample(i, prompt_ids, outputs, offset)}; scores must be real numbers"
            )
        if not math.isfinite(x):
            raise RewardError(
                f"{fn_name} returned {x} for {describe_sample(i, prompt_ids, outputs, offset)}; scores must be finite"
            )
        out[i] = x
    return out


def combine(
    parts: np.ndarray, weights: Sequence[float], names: Sequence[str], prompt_ids: Sequence[int], outputs: Sequence[str]
) -> np.ndarray:
    """Per sample: the weighted sum of the terms that scored it (parts: [terms, samples], NaN = did not
    apply). A sample no term scored is an error naming it."""
    applied = ~np.isnan(parts)
    if parts.shape[1] and not applied.any(0).all():
        i = int(np.flatnonzero(~applied.any(0))[0])
        raise RewardError(
            f"no reward term scored {describe_sample(i, prompt_ids, outputs)}: {', '.join(names)} all returned None"
        )
    w = np.asarray(weights, dtype=np.float64)[:, None]
    return np.where(applied, parts * w, 0.0).sum(0)


# ---- calling a term: inline, awaited, in threads, in processes ----


class _TimedOut(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _in_threads(call: Callable[[dict], Any], calls: list[dict], workers: int, timeout_s: float | None) -> list:
    """Each call in one of `workers` daemon threads, results in order. A call running past timeout_s raises
    _TimedOut(its index) at once; its thread is abandoned (a daemon: it cannot keep the process alive)."""
    n = len(calls)
    results: list = [None] * n
    errors: dict[int, BaseException] = {}
    started = [0.0] * n
    began, done = [threading.Event() for _ in range(n)], [threading.Event() for _ in range(n)]
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    stop = threading.Event()  # set when the caller gives up: no new call starts after that

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            started[i] = time.monotonic()
            began[i].set()
            try:
                results[i] = call(calls[i])
            except BaseException as e:  # handed to the caller's thread
                errors[i] = e
            done[i].set()

    for _ in range(min(workers, n)):
        threading.Thread(target=work, daemon=True, name="rft_ds-reward").start()
    try:
        for i in range(n):  # FIFO: a call that hangs is seen before any call queued behind it is waited for
            began[i].wait()
            left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started[i]))
            if not done[i].wait(left):
                raise _TimedOut(i)
            if i in errors:
                raise errors[i]
    finally:
        stop.set()
    return results


def _call_kw(fn: Callable, kw: dict) -> Any:
    return fn(**kw)


def _awaited(fn: Callable, calls: list[dict], concurrency: int, timeout_s: float | None) -> list:
    """Await fn(**kw) for every call, at most `concurrency` in flight, each within timeout_s."""

    async def main() -> list:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, kw: dict) -> Any:
            async with sem:
                try:
                    return await asyncio.wait_for(fn(**kw), timeout_s)
                except asyncio.TimeoutError:
                    raise _TimedOut(i) from None

        return await asyncio.gather(*(one(i, kw) for i, kw in enumerate(calls)))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    out: dict = {}  # called from inside a running loop (a notebook): run ours in a thread of its own
    th = threading.Thread(target=lambda: out.update(r=_capture(lambda: asyncio.run(main()))), daemon=True)
    th.start()
    th.join()
    if isinstance(out["r"], BaseException):
        raise out["r"]
    return out["r"]


def _capture(f: Callable) -> Any:
    try:
        return f()
    except BaseException as e:
        return e


def run_calls(t: RewardTerm, calls: list[dict], concurrency: int, timeout_s: float | None) -> list:
    """The raw results of t's calls, in order, run as t says (inline, awaited, threads, processes)."""
    if t.is_async:
        return _awaited(t.fn, calls, concurrency, timeout_s)
    if t.executor == "process":
        pool = multiprocessing.get_context("spawn").Pool(min(concurrency, len(calls)))
        try:  # each thread hands one call to a free process, so the timeout counts from the call's start
            return _in_threads(lambda kw: pool.apply(_call_kw, (t.fn, kw)), calls, concurrency, timeout_s)
        finally:
            pool.terminate()  # also ends a call that timed out
    if t.executor == "thread" or timeout_s is not None:  # a timeout needs a thread to give up on
        return _in_threads(lambda kw: t.fn(**kw), calls, concurrency if t.executor == "thread" else 1, timeout_s)
    return [t.fn(**kw) for kw in calls]


def as_ints(tokens: Any) -> list[int]:
    """Token ids as Python ints (an int32 array's own elements are numpy scalars: a reward function may
    serialise completion_ids as JSON)."""
    return tokens.tolist() if isinstance(tokens, np.ndarray) else [int(t) for t in tokens]


def term_calls(
    t: RewardTerm,
    samples: list[str],
    prompts: list[str],
    outputs: list[str],
    completion_ids: list,
    prompt_ids: list[int],
    metadata: dict[str, list],
    tokenizer: Any,
    batch_size: int | None,
) -> list:
    """(slice, keyword arguments) of each call of t over these samples: trlx's or TRL's keywords plus the
    prompts' metadata and the entry's fixed kwargs, cut to what t accepts when it takes no **kwargs."""
    step = t.batch_size or batch_size or len(samples) or 1
    calls = []
    for lo in range(0, len(samples), step):
        sl = slice(lo, lo + step)
        if t.style == "trl":
            kw = {"prompts": prompts[sl], "completions": outputs[sl]}
            if t.accepts is None or "completion_ids" in t.accepts:  # Python ints only where they are taken
                kw["completion_ids"] = [as_ints(c) for c in completion_ids[sl]]
        else:
            kw = {
                "samples": samples[sl],
                "prompts": prompts[sl],
                "outputs": outputs[sl],
                "tokenizer": tokenizer,
                "prompt_ids": prompt_ids[sl],
            }
        kw.update({k: v[sl] for k, v in metadata.items()})
        kw.update(t.kwargs)
        if t.accepts is not None:
            kw = {k: v for k, v in kw.items() if k in t.accepts}
        calls.append((sl, kw))
    return calls


def score_terms(
    terms: Sequence[RewardTerm],
    samples: list[str],
    prompts: list[str],
    outputs: list[str],
    completion_ids: list,
    prompt_ids: list[int],
    metadata: dict[str, list],
    tokenizer: Any,
    batch_size: int | None = None,
    max_concurrency: int = 8,
    timeout_s: float | None = None,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(combined scores [n], each term's scores [terms, n] with NaN where it did not apply)."""
    from rft_ds.progress import bar

    n = len(samples)
    parts = np.full((len(terms), n), np.nan)
    if not n:
        return np.zeros(0), parts
    pbar = bar(total=n * len(terms), desc=progress or "", show=bool(progress), unit="sample")
    for k, t in enumerate(terms):
        calls = term_calls(t, samples, prompts, outputs, completion_ids, prompt_ids, metadata, tokenizer, batch_size)
        limit = t.timeout_s if t.timeout_s is not None else timeout_s
        try:
            raw = run_calls(t, [kw for _, kw in calls], max_concurrency, None if limit == math.inf else limit)
        except _TimedOut as e:
            sl = calls[e.index][0]
            raise RewardError(
                f"reward term {t.name} timed out after {limit:g} s (reward.timeout_s) on a call of "
                f"{len(samples[sl])} samples from {describe_sample(sl.start, prompt_ids, outputs)}"
            ) from None
        for (sl, _), got in zip(calls, raw):
            parts[k, sl] = validate_scores(
                got, len(samples[sl]), prompt_ids[sl], outputs[sl], t.name, sl.start, allow_none=True
            )
            for key, n in (getattr(got, "counts", None) or {}).items():  # rft_ds.rewards.Scores: across executors
                if key in t.reports:
                    t.counts[key] = t.counts.get(key, 0) + int(n)
            pbar.update(len(samples[sl]))
    pbar.close()
    return combine(parts, [t.weight for t in terms], [t.name for t in terms], prompt_ids, outputs), parts


# ---- a remote scorer ----


class HttpScorer:
    """A reward server over HTTP: POST {"prompts", "completions", "metadata"} as JSON, read the scores (a JSON
    list, or {"rewards": [...]} as OpenRLHF's server replies, or {"scores": [...]}). Connection errors, read
    timeouts (a server busy with other ranks' requests, a lost reply) and 5xx replies are retried with
    exponential backoff, each try within reward.timeout_s; 4xx replies are not (a request the server rejects
    would only be rejected again)."""

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5) -> None:
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.__name__ = "remote"

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: Any = None, **metadata: Any) -> list:
        body = json.dumps({"prompts": prompts, "completions": completions, "metadata": metadata}, default=str).encode()
        for attempt in range(self.retries + 1):
            why = None
            try:
                req = urllib.request.Request(
                    self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    reply = resp.read()
                break
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise RewardError(f"reward.url {self.url}: HTTP {e.code} {e.reason} (not retried)") from None
                why = f"HTTP {e.code} {e.reason}"
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                    why = f"no reply within {self.timeout_s:g} s (reward.timeout_s)"
                else:
                    why = f"{type(reason).__name__}: {reason}"
            if attempt == self.retries:
                raise RewardError(f"reward.url {self.url}: {why} after {attempt + 1} tries")
            time.sleep(self.backoff_s * 2**attempt)
        try:
            got = json.loads(reply)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RewardError(f"reward.url {self.url}: the reply is not JSON: {reply[:60]!r}") from None
        if isinstance(got, dict):
            got = got.get("rewards", got.get("scores"))
        if not isinstance(got, list):
            raise RewardError(
                f"reward.url {self.url}: the reply holds no list of scores "
                "(a JSON list, or an object with 'rewards' or 'scores')"
            )
        return got
