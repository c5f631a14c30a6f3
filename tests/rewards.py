"""reward_fns that misbehave on purpose, imported by the multi-process tests as 'tests.rewards:...'."""

import os

from rft_ds.toy import reward_fn as toy_reward


def fail_on_rank1(samples, prompts, outputs, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward server unreachable")
    return toy_reward(samples, prompts, outputs, **kwargs)


def nan_on_rank1(samples, prompts, outputs, **kwargs):
    scores = toy_reward(samples, prompts, outputs, **kwargs)
    if os.environ.get("RANK") == "1":
        scores[3] = float("nan")
    return scores
