"""Tools for tests/test_rollout.py's process executor: importable by name in a worker process."""

import time


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "awake"
