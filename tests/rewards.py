"""reward_fns that misbehave on purpose, imported by the multi-process tests as 'tests.rewards:...'."""

import os

from rft_ds.toy import reward_fn as toy_reward


def slow_on_rank1(samples, prompts, outputs, **kwargs):
    """Hangs on rank 1 past any reasonable reward.timeout_s (a verifier stuck on one sample)."""
    import time

    if os.environ.get("RANK") == "1":
        time.sleep(600)
    return toy_reward(samples, prompts, outputs, **kwargs)


def length_penalty(prompts, completions, **kwargs):
    """TRL's signature; None for empty completions (it does not judge them)."""
    return [None if not c else -0.01 * len(c) for c in completions]


def pid_of_call(prompts, completions, **kwargs):
    """Scores every completion with the id of the process that ran the call (executor: process)."""
    return [os.getpid()] * len(completions)
