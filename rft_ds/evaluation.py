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

from collections import Counter
from typing import Hashable, Sequence

from rft_ds.config import EvalSet, best_metric, parse_sets  # noqa: F401 (parsed with the config; imported from here too)

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
