"""Evaluation sets: what each one samples, and the math of its metrics. Everything here is pure.

A run evaluates one or more named sets (`eval.sets`). Each set samples `n_samples` completions per prompt
and reports, under the key prefix `eval_` (the set named "eval") or `eval_<name>_` (any other set):

    reward_mean          mean reward over every sample (the set's own reward_fn, or the run's reward terms)
    pass@k               the unbiased estimator of Chen et al. 2021 (Codex), a sample passes when its
                         reward >= pass_threshold, for each k in pass_k
    maj@k                majority vote over k samples' answers (answer_fn), for each k in maj_k
    greedy_reward_mean   with greedy: true, one more completion per prompt at do_sample false
    greedy_pass          ... and the share of those that pass
    <metric>             what the set's metric_fn returns, over its samples

`train.best_metric: "<set>/<metric>"` picks best_model/ (higher is better); "auto" picks a low-noise one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from rft_ds.config import ConfigError, RFTRunConfig, validate_gen_kwargs

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SET_KEYS = ("name", "prompts", "split", "reward_fn", "metric_fn", "answer_fn", "n_samples", "gen_kwargs", "greedy",
            "pass_k", "maj_k", "pass_threshold")


@dataclass
class EvalSet:
    name: str
    prompts: Any  # any data source (data.prompts' forms)
    split: str = "test"  # the split of a DatasetDict source
    reward_fn: Any = None  # "module:function" or a callable; None: the run's reward terms
    metric_fn: Any = None  # returns a dict of numbers over the set's samples; None: none
    answer_fn: Any = None  # completion text -> a comparable answer (None: no answer) for maj@k
    n_samples: int = 4
    gen_kwargs: dict = field(default_factory=dict)  # method.gen_kwargs with these keys replaced
    greedy: bool = False
    pass_k: list = field(default_factory=list)
    maj_k: list = field(default_factory=list)
    pass_threshold: float = 1.0

    def key(self, metric: str) -> str:
        """The metrics.jsonl key of one of this set's metrics."""
        return f"eval_{metric}" if self.name == "eval" else f"eval_{self.name}_{metric}"

    @property
    def sampled(self) -> bool:
        return bool(self.gen_kwargs.get("do_sample", True))

    def metrics(self) -> list[str]:
        """The metric names this set reports (metric_fn's keys are known only when it has run)."""
        names = ["reward_mean"] + [f"pass@{k}" for k in self.pass_k] + [f"maj@{k}" for k in self.maj_k]
        return names + (["greedy_reward_mean", "greedy_pass"] if self.greedy else [])


def parse_sets(cfg: RFTRunConfig, eval_prompts: Any = None, metric_fn: Any = None) -> list[EvalSet]:
    """eval.sets, or the one set today's fields describe (data.eval_prompts, or the API's eval_prompts, with
    train.eval_gen_kwargs and reward.metric_fn), named "eval". Errors name the field."""
    base = cfg.method.gen_kwargs
    legacy = eval_prompts if eval_prompts is not None else cfg.data.eval_prompts
    if cfg.eval.sets is None:
        if legacy is None:
            return []
        gk = {**base, **(cfg.train.eval_gen_kwargs or {})}
        one = {"name": "eval", "prompts": legacy, "split": cfg.data.eval_split,
               "metric_fn": metric_fn if metric_fn is not None else cfg.reward.metric_fn,
               "gen_kwargs": cfg.train.eval_gen_kwargs or {}}
        return [_parse_set(one, base, "eval", gk)]
    if legacy is not None:
        where = "the eval_prompts argument" if eval_prompts is not None else "data.eval_prompts"
        raise ConfigError(f"{where} and eval.sets both name eval prompts: give the prompts as a set of eval.sets")
    if not isinstance(cfg.eval.sets, list) or not cfg.eval.sets:
        raise ConfigError(f"eval.sets must be a non-empty list of sets, got {cfg.eval.sets!r}")
    sets = [_parse_set(d, base, f"eval.sets[{i}]") for i, d in enumerate(cfg.eval.sets)]
    seen: set[str] = set()
    for i, s in enumerate(sets):
        if s.name in seen:
            raise ConfigError(f"eval.sets[{i}].name {s.name!r} is used twice")
        seen.add(s.name)
    return sets


def _parse_set(d: Any, base_gen: dict, where: str, merged: dict | None = None) -> EvalSet:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping with at least name and prompts, got {type(d).__name__}")
    unknown = sorted(set(d) - set(SET_KEYS))
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (valid: {', '.join(SET_KEYS)})")
    name = d.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{where}.name must be a name of letters, digits, _ and - (a letter first), got {name!r}")
    if d.get("prompts") is None:
        raise ConfigError(f"{where}.prompts is required (any data source: a file, 'module:function', a list)")
    own = d.get("gen_kwargs") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{where}.gen_kwargs must be a mapping, got {own!r}")
    gk = merged if merged is not None else {**base_gen, **own}
    validate_gen_kwargs(gk, f"{where}.gen_kwargs")
    sampled = bool(gk.get("do_sample", True))
    n = d.get("n_samples")
    if n is None:
        n = 4 if sampled else 1  # greedy completions are all the same: one is enough
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}.n_samples must be an int >= 1, got {n!r}")
    if n > 1 and not sampled:
        raise ConfigError(f"{where}.n_samples is {n} but its gen_kwargs do not sample (do_sample: false): "
                          "every completion would be the same")
    greedy = d.get("greedy", False)
    if not isinstance(greedy, bool):
        raise ConfigError(f"{where}.greedy must be true or false, got {greedy!r}")
    if greedy and not sampled:
        raise ConfigError(f"{where}.greedy: true would repeat its own completions: its gen_kwargs already do not "
                          "sample (do_sample: false), so reward_mean and pass@1 are the greedy numbers")
    thr = d.get("pass_threshold", 1.0)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr):
        raise ConfigError(f"{where}.pass_threshold must be a number, got {thr!r}")
    answer_fn = d.get("answer_fn")
    pass_k = _ks(d.get("pass_k"), [1] + ([n] if n > 1 else []), n, f"{where}.pass_k")
    maj_k = _ks(d.get("maj_k"), [n] if answer_fn is not None and n > 1 else [], n, f"{where}.maj_k")
    if maj_k and answer_fn is None:
        raise ConfigError(f"{where}.maj_k needs {where}.answer_fn (a completion's answer, to vote on)")
    for key in ("reward_fn", "metric_fn", "answer_fn"):
        v = d.get(key)
        if v is not None and not callable(v) and not (isinstance(v, str) and ":" in v and all(v.split(":", 1))):
            raise ConfigError(f"{where}.{key} must look like 'module:function', got {v!r}")
    split = d.get("split", "test")
    if not isinstance(split, str):
        raise ConfigError(f"{where}.split must be a string, got {split!r}")
    return EvalSet(name, d["prompts"], split, d.get("reward_fn"), d.get("metric_fn"), answer_fn, n, gk, greedy,
                   pass_k, maj_k, float(thr))


def _ks(value: Any, default: list[int], n: int, where: str) -> list[int]:
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        raise ConfigError(f"{where} must be a list of ints, got {value!r}")
    bad = [k for k in value if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"{where}: k={bad[0]} is outside 1..n_samples ({n})")
    return sorted(set(value))


def best_metric(setting: str, sets: Sequence[EvalSet]) -> tuple[EvalSet, str] | None:
    """The (set, metric) that picks best_model/. "auto": the first set's greedy reward when it has one,
    else its reward mean when that is low-noise (greedy sampling or n_samples >= 4). A single sample at
    temperature is noise, never the default: that is an error asking for a choice."""
    if not sets:
        return None
    if setting == "auto":
        s = sets[0]
        if s.greedy:
            return s, "greedy_reward_mean"
        if not s.sampled or s.n_samples >= 4:
            return s, "reward_mean"
        raise ConfigError(f"train.best_metric auto: eval set {s.name!r} samples {s.n_samples} completion(s) per prompt "
                          "at do_sample true, too noisy to pick best_model/ by; set its greedy: true or n_samples >= 4, "
                          "name a metric (train.best_metric: <set>/<metric>), or train.save_best_model: false")
    name, sep, metric = setting.partition("/")
    by_name = {s.name: s for s in sets}
    if not sep or not metric or name not in by_name:
        raise ConfigError(f"train.best_metric must be 'auto' or '<set>/<metric>' with a set of "
                          f"{', '.join(by_name)}, got {setting!r}")
    s = by_name[name]
    if metric not in s.metrics() and s.metric_fn is None:
        raise ConfigError(f"train.best_metric {setting!r}: set {name!r} reports {', '.join(s.metrics())}")
    return s, metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with c passing samples out of n (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), as a product, exact for any n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p


def maj_at_k(answers: Sequence[Hashable | None], passed: Sequence[bool], k: int) -> float:
    """maj@k of one prompt: its samples in groups of k (n // k groups; a rest shorter than k is left out),
    and in each the most frequent answer (None: no answer, not a vote) scored by whether its samples pass.
    A tie counts each tied answer equally (the expected score of a fair coin), so the result never
    depends on sample order within a group; a group with no answer scores 0. The mean over groups."""
    if len(answers) != len(passed):
        raise ValueError(f"{len(answers)} answers for {len(passed)} samples")
    groups = len(answers) // k
    if groups == 0:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(answers)}")
    total = 0.0
    for g in range(groups):
        a, p = answers[g * k:(g + 1) * k], passed[g * k:(g + 1) * k]
        votes = Counter(x for x in a if x is not None)
        if not votes:
            continue
        top = max(votes.values())
        winners = [x for x, v in votes.items() if v == top]
        # an answer passes when its samples do (the same answer may be worded so one passes: their share)
        total += sum(sum(pp for x, pp in zip(a, p) if x == w) / votes[w] for w in winners) / len(winners)
    return total / groups
