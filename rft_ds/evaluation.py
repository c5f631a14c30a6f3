"""Evaluation: the math of each set's metrics (pure), and the driver that samples, scores and reduces a set.

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
The sets are parsed with the config (config.parse_sets).

Each rank samples its share of a set's prompts and scores them where they were sampled; per prompt, pass@k
and maj@k are summed, and one all_reduce of those named sums (a few numbers per set) gives the means.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from rft_ds import distributed as D
from rft_ds.config import EvalSet, best_metric, parse_sets  # noqa: F401 (parsed with the config; imported from here too)
from rft_ds.data import PromptSet, deal_prompts
from rft_ds.errors import ConfigError, RewardError
from rft_ds.samples import sample_seed
from rft_ds.scoring import rollout_means, score_samples, term_means


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
        a, p = answers[g * k : (g + 1) * k], passed[g * k : (g + 1) * k]
        votes = Counter(x for x in a if x is not None)
        if not votes:
            continue
        top = max(votes.values())
        winners = [x for x, v in votes.items() if v == top]
        # an answer passes when its samples do (the same answer may be worded so one passes: their share)
        total += sum(sum(pp for x, pp in zip(a, p) if x == w) / votes[w] for w in winners) / len(winners)
    return total / groups


@dataclass
class EvalData:
    """One eval set, ready: its spec (config.EvalSet), tokenized prompts and resolved callables."""

    spec: EvalSet
    prompts: PromptSet
    rewards: list  # its own reward_fn as a term, or the run's reward terms
    metric_fn: Any
    answer_fn: Any


@dataclass
class EvalContext:
    """Where and how this rank samples and scores an eval: its engine, its engine group, the run's reward
    settings. The recipe builds it once from its setup."""

    sampler: Any
    tokenizer: Any
    stop_sequences: list[str]
    reward_cfg: Any  # config.RewardConfig
    seed: int  # train.seed
    plan: str  # how prompts are dealt to engine groups (the run state's data.shard)
    group: int
    n_groups: int
    contributes: bool  # False on a tensor-parallel peer: its group leader scores the same completions
    show: bool  # progress bars
    rollout: Any = None  # rollout.Rollout: evals run multi-turn rollouts too; None: single completions
    failed_score: float = 0.0  # rollout.failed_score


def evaluate(evals: Sequence[EvalData], ctx: EvalContext, epoch: int) -> dict[str, Any]:
    """Collective: every eval set, in order, as one dict of all their metrics (EvalSet.key names them).
    epoch -1 is the eval before training."""
    result: dict[str, Any] = {}
    for i, ev in enumerate(evals):
        result.update(evaluate_set(ev, ctx, sample_seed(ctx.seed, epoch, ctx.group, 1 if i == 0 else 10 + i)))
    return result


def evaluate_set(ev: EvalData, ctx: EvalContext, seed: int) -> dict[str, Any]:
    """n_samples completions per prompt of this rank's share (and with greedy: one at do_sample false),
    scored where they were sampled; the sums reduced in one all_reduce. metric_fn runs once, on rank 0, on
    every output (gathered to rank 0 only)."""
    import torch

    spec = ev.spec
    mine = [ev.prompts.records[i] for i in deal_prompts(len(ev.prompts.records), ctx.group, ctx.n_groups, ctx.plan)]
    pids, scores, outputs, parts, spans, rollouts = _sample_and_score(
        ev, ctx, mine, spec.n_samples, spec.gen_kwargs, seed, ""
    )
    sums = {"reward": float(scores.sum()), "samples": float(len(scores)), "prompts": float(len(spans))}
    with D.all_ranks_or_fail(f"eval set {spec.name}: pass@k / maj@k"):  # answer_fn is the user's code
        passed = scores >= spec.pass_threshold
        answers = [ev.answer_fn(o) for o in outputs] if spec.maj_k else []
        for k in spec.pass_k:
            sums[f"pass@{k}"] = sum(pass_at_k(b - a, int(passed[a:b].sum()), k) for a, b in spans)
        for k in spec.maj_k:
            sums[f"maj@{k}"] = sum(maj_at_k(answers[a:b], passed[a:b].tolist(), k) for a, b in spans)
    if spec.greedy:
        _, g_scores, _, _, _, _ = _sample_and_score(
            ev, ctx, mine, 1, {**spec.gen_kwargs, "do_sample": False}, seed, " greedy"
        )
        sums.update(
            greedy_reward=float(g_scores.sum()),
            greedy_passed=float((g_scores >= spec.pass_threshold).sum()),
            greedy_samples=float(len(g_scores)),
        )
    total = dict(zip(sums, D.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    result: dict[str, Any] = {spec.key("reward_mean"): total["reward"] / max(total["samples"], 1)}
    for name in [f"pass@{k}" for k in spec.pass_k] + [f"maj@{k}" for k in spec.maj_k]:
        result[spec.key(name)] = total[name] / max(total["prompts"], 1)
    if spec.greedy:
        result[spec.key("greedy_reward_mean")] = total["greedy_reward"] / max(total["greedy_samples"], 1)
        result[spec.key("greedy_pass")] = total["greedy_passed"] / max(total["greedy_samples"], 1)
    result.update({spec.key(k): v for k, v in term_means(ev.rewards, parts).items()})
    result.update({spec.key(k): v for k, v in rollouts.items()})  # turns and tool calls per answer, failures
    if ev.metric_fn is not None:
        result.update({spec.key(k): v for k, v in _metric_fn(ev, pids, outputs, ctx.reward_cfg.timeout_s).items()})
    return result


def _sample_and_score(
    ev: EvalData, ctx: EvalContext, mine: list, n: int, gen_kwargs: dict, seed: int, what: str
) -> tuple[list[int], np.ndarray, list[str], np.ndarray, list[tuple[int, int]], dict]:
    """n completions (rollouts: trajectories) of each of this rank's prompts, scored: (prompt id per sample,
    scores, outputs (a trajectory's: its final turn), each term's scores, each prompt's span of samples, the
    rollout metrics over every rank, or {}). Every rank of an engine group generates (its collectives need
    all); only the group's leader scores and counts them."""
    name = "eval" if ev.spec.name == "eval" else f"eval {ev.spec.name}"
    label = f"{name}: sample{what}" if ctx.show else None
    if ctx.rollout is not None:
        comps = ctx.rollout.generate(ctx.sampler, mine, n, gen_kwargs, seed, label)
    else:
        comps = ctx.sampler.generate([r.token_ids for r in mine], n, gen_kwargs, seed, label)
    if not ctx.contributes:
        mine, comps = [], []
    pids = [r.id for r, cs in zip(mine, comps) for _ in cs]
    tokens = [c.token_ids for cs in comps for c in cs]
    # trajectories: the environment's rewards, else the reward terms on the final turns
    env_reward = None if ctx.rollout is None else np.array([c.reward for cs in comps for c in cs], np.float64)
    scores, outputs, parts = score_samples(
        ev.rewards,
        np.asarray(pids, dtype=np.int64),
        tokens,
        ev.prompts.texts,
        ev.prompts.metadata,
        ctx.tokenizer,
        ctx.stop_sequences,
        ctx.reward_cfg,
        f"{name}: score{what}" if ctx.show else None,
        env_reward,
        ctx.failed_score,
    )
    rollouts = {}
    if ctx.rollout is not None:
        stats = [c.stats for cs in comps for c in cs]
        rollouts = rollout_means(np.stack(stats) if stats else None)
        rollouts.pop("rollout_model_tokens")
    ends = np.cumsum([len(cs) for cs in comps]).tolist()
    return pids, scores, outputs, parts, list(zip([0] + ends[:-1], ends)), rollouts


def _metric_fn(ev: EvalData, pids: list[int], outputs: list[str], timeout_s: float | None = None) -> dict:
    """Collective: the set's metric_fn, once, on rank 0, over every rank's outputs in prompt order (a corpus
    metric needs them all); its dict broadcast to every rank. It runs within reward.timeout_s when set, and
    the other ranks wait for it on the rendezvous store, not inside a collective whose timeout it could
    outlast."""
    gathered = D.gather_object((pids, outputs))
    extra = None
    key = D.release_key()
    if not D.is_main():
        D.wait_released(key)
    with D.all_ranks_or_fail(f"eval set {ev.spec.name}: metric_fn"):
        if D.is_main():
            try:
                extra = _run_metric_fn(ev, gathered, timeout_s)
            finally:
                D.release(key)
    return D.broadcast_object(extra)


def _run_metric_fn(ev: EvalData, gathered: list, timeout_s: float | None) -> dict:
    """Rank 0: metric_fn over every output, in prompt order, within timeout_s (its thread is a daemon: one
    that hangs cannot keep the process alive)."""
    import threading

    out: dict = {}

    def call() -> None:
        try:
            pairs = sorted((p, o) for ps, os_ in gathered for p, o in zip(ps, os_))
            pids, outputs = [p for p, _ in pairs], [o for _, o in pairs]
            data = ev.prompts
            prompts = [data.texts[p] for p in pids]
            meta = {
                k: [data.metadata[p].get(k) for p in pids] for k in sorted({k for p in pids for k in data.metadata[p]})
            }
            out["r"] = ev.metric_fn(
                samples=[p + o for p, o in zip(prompts, outputs)], prompts=prompts, outputs=outputs, **meta
            )
        except BaseException as e:  # handed to the caller's thread
            out["e"] = e

    th = threading.Thread(target=call, daemon=True, name="rft_ds-metric_fn")
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise RewardError(f"metric_fn of eval set {ev.spec.name} timed out after {timeout_s:g} s (reward.timeout_s)")
    if "e" in out:
        raise out["e"]
    if not isinstance(out["r"], dict):
        raise RewardError(f"metric_fn of eval set {ev.spec.name} must return a dict, got {type(out['r']).__name__}")
    return out["r"]


def best_key(best: tuple[EvalSet, str], record: dict) -> str:
    """The record key of train.best_metric; a metric_fn key that never appeared is an error naming it."""
    spec, metric = best
    key = spec.key(metric)
    if not isinstance(record.get(key), (int, float)) or isinstance(record.get(key), bool):
        raise ConfigError(
            f"train.best_metric {spec.name}/{metric}: eval set {spec.name} reported no number {key}; it "
            f"reported {', '.join(k for k in record if k.startswith(spec.key('')))}"
        )
    return key


def summary(evals: Sequence[EvalData], result: dict) -> str:
    """One short line per eval: each set's reward mean and first pass@k / greedy numbers."""
    parts = []
    for ev in evals:
        spec = ev.spec
        shown = ["reward_mean"] + [m for m in spec.metrics()[1:] if m.startswith(("pass@", "maj@", "greedy_pass"))]
        nums = " ".join(f"{m.replace('_mean', '')} {result[spec.key(m)]:.4f}" for m in shown if spec.key(m) in result)
        parts.append(f"{spec.name}: {nums}")
    return " | ".join(parts)
