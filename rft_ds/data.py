"""Prompt sources -> records (id, text, token ids, metadata), validated before any model loads."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rft_ds.errors import DataError  # noqa: F401 (raised here; imported from here too)

# Keyword names reward_fn already receives; metadata may not shadow them.
RESERVED_KEYS = {"samples", "prompts", "outputs", "tokenizer", "prompt_ids"}


@dataclass
class PromptRecord:
    id: int
    text: str  # what reward functions get as the prompt (a chat prompt's last user message)
    token_ids: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSet:
    """One set of prompts as a run holds it: the training prompts, an eval set's, or the replay prompts.
    `texts` and `metadata` are read and checked first (`normalize`); `records` are filled by tokenizing them,
    which also replaces a chat prompt's text by its last user message (what reward functions get)."""

    texts: list[str]
    metadata: list[dict]
    records: list[PromptRecord] = field(default_factory=list)
    replay: PromptSet | None = None  # the training prompts' data.replay_prompts (rft_ds/replay.py)


def import_object(spec: str, what: str) -> Any:
    """Import "package.module:attr" (how YAML names reward_fn, metric_fn and prompt sources). Modules are
    found as `python -m` finds them: installed packages, and the working directory (searched last, so a
    file there never shadows an installed package), whichever command started the run."""
    import sys

    module, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"{what}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{what}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


DATA_FILE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


def load_source(
    source: Any, what: str, prompt_field: str = "prompt", split: str = "train", as_table: bool = False
) -> Any:
    """Prompts from a list; "module:function"; a .jsonl file; an HF `datasets` Dataset or DatasetDict (its
    `split`); a `save_to_disk` directory; local data files (.json/.csv/.parquet/.arrow/.txt, globs too); or
    a reasoning-gym task, "reasoning_gym:<task>?size=2000&seed=1" (rft_ds.tasks.reasoning_gym). A list of
    records; as_table: a `datasets` source stays the (memory-mapped) Dataset (prompt_store reads it by row)."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if _is_hf_dataset(source):
        return _rows(source, what, split, as_table)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise DataError(
            f"{what} must be a list, a datasets.Dataset, a file or directory path, or 'module:function', "
            f"got {type(source).__name__}"
        )
    if source.startswith("reasoning_gym:"):  # reasoning_gym:<task>?size=..&seed=..: generated, not read
        from rft_ds.tasks import reasoning_gym

        return reasoning_gym(source, what)
    if source.endswith(".jsonl"):
        return _read_jsonl(Path(source), what, prompt_field)
    path = Path(source)
    if path.is_dir():
        return _load_from_disk(path, what, split, as_table)
    suffix = path.suffix.lower()
    if suffix in DATA_FILE_BUILDERS:
        return _load_data_files(source, DATA_FILE_BUILDERS[suffix], what, as_table)
    if ":" in source:
        fn = import_object(source, what)
        items = fn() if callable(fn) else fn
        if _is_hf_dataset(items):
            return _rows(items, what, split, as_table)
        if not isinstance(items, (list, tuple)):
            raise DataError(f"{what}: {source} must return a list or a datasets.Dataset, got {type(items).__name__}")
        return list(items)
    raise DataError(
        f"{what}: {source!r} is not a directory, a data file ({', '.join(['.jsonl', *DATA_FILE_BUILDERS])}) "
        "or 'module:function'"
    )


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and type(obj).__name__ in ("Dataset", "DatasetDict")


def _rows(ds: Any, what: str, split: str, as_table: bool = False) -> Any:
    if type(ds).__name__ == "DatasetDict":
        if split not in ds:
            raise DataError(
                f"{what}: the dataset has splits {sorted(ds)}, not {split!r} (data.split / data.eval_split)"
            )
        ds = ds[split]
    return ds if as_table else ds.to_list()


def _load_from_disk(path: Path, what: str, split: str, as_table: bool = False) -> Any:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(
            f"{what}: directory {path} is not a dataset saved with save_to_disk "
            "(no dataset_info.json or dataset_dict.json)"
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises a zoo of types for a damaged directory
        raise DataError(f"{what}: cannot load dataset {path}: {_first_line(e)}") from None
    return _rows(ds, what, split, as_table)


def _load_data_files(pattern: str, builder: str, what: str, as_table: bool = False) -> Any:
    import glob

    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise DataError(f"{what}: file not found: {missing[0] if missing else pattern}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never look for a hub copy
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:
        raise DataError(f"{what}: cannot read {pattern} as {builder}: {_first_line(e)}") from None
    return ds if as_table else ds.to_list()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _read_jsonl(path: Path, what: str, prompt_field: str) -> list:
    if not path.is_file():
        raise DataError(f"{what}: file not found: {path}")
    items = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{what}: {path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or prompt_field not in obj:
                raise DataError(f"{what}: {path}:{lineno}: missing field {prompt_field!r} (data.prompt_field)")
            items.append(obj)
    return items


def normalize(
    items: Sequence, what: str, prompt_field: str = "prompt", metadata_fields: Sequence[str] | None = None
) -> tuple[list, list[dict]]:
    """trlx accepts strings or dicts with the prompt plus metadata; return (texts, metadata). A prompt may
    also be a list of chat messages ({"role", "content"}), kept as that list until `tokenize` renders it.
    metadata_fields: the fields passed on to reward_fn/metric_fn (None: every field but the prompt)."""
    if len(items) == 0:
        raise DataError(f"{what} is empty")
    pairs = [normalize_one(item, i, what, prompt_field, metadata_fields) for i, item in enumerate(items)]
    return [t for t, _ in pairs], [m for _, m in pairs]


def normalize_one(
    item: Any, i: int, what: str, prompt_field: str = "prompt", metadata_fields: Sequence[str] | None = None
) -> tuple[str | list, dict]:
    """One record of `normalize`, named `what[i]` in its errors. A prompt field that is null (a column an
    Arrow table fills for a row without it) counts as missing."""
    if isinstance(item, dict):
        if item.get(prompt_field) is None:
            raise DataError(f"{what}[{i}] has no field {prompt_field!r}")
        text = item[prompt_field]
        if metadata_fields is None:
            meta = {k: v for k, v in item.items() if k != prompt_field}
        else:
            absent = [k for k in metadata_fields if k not in item]
            if absent:
                raise DataError(f"{what}[{i}] has no field {absent[0]!r} (data.metadata_fields)")
            meta = {k: item[k] for k in metadata_fields}
        clash = RESERVED_KEYS & meta.keys()
        if clash:
            raise DataError(f"{what}[{i}] metadata key {sorted(clash)[0]!r} is reserved for reward_fn arguments")
    else:
        text, meta = item, {}
    if isinstance(text, (list, tuple)):
        text = check_messages(text, f"{what}[{i}]")
        if "messages" in meta:
            raise DataError(
                f"{what}[{i}] metadata key 'messages' is reserved: reward functions get a chat "
                "prompt's messages under that name"
            )
    elif not isinstance(text, str):
        raise DataError(f"{what}[{i}] must be a string or a list of chat messages, got {type(text).__name__}")
    if not text:
        raise DataError(f"{what}[{i}] is an empty string")
    return text, meta


def check_messages(messages: Sequence, what: str) -> list[dict]:
    """A chat prompt: a non-empty list of {"role": str, "content": str}, ending with a turn the model answers."""
    if not messages:
        raise DataError(f"{what} is an empty list of chat messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{what}[{j}] must be a chat message {{'role': str, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise DataError(f"{what} ends with an assistant message: the last turn must be one the model answers")
    return out


def chat_text(messages: Sequence[dict]) -> str:
    """A chat prompt as reward functions see it: its last user message (the question), like a string prompt."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def use_chat_template(tokenizer: Any, setting: bool | None) -> bool:
    """data.apply_chat_template: None applies the tokenizer's template when it has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting and not has:
        raise DataError("data.apply_chat_template is true but the tokenizer has no chat template")
    return has if setting is None else bool(setting)


def format_prompt(
    text: str | list, tokenizer: Any, chat: bool, system_prompt: str | None = None, tools: list | None = None
) -> str:
    """The text the model is given: the prompt as a user turn of the chat template (a chat prompt: its
    messages, after data.system_prompt unless it has its own system message), or as it is. tools (rollout.tools'
    JSON schemas) go to the template, or, when it has no place for them, into the system message."""
    if not chat:
        return text
    messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
    if tools and not template_takes_tools(tokenizer):
        system_prompt = tool_prompt(tools) + ("\n\n" + system_prompt if system_prompt else "")
        tools = None
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a `tools` argument (most tool-calling models' do)."""
    return "tools" in str(getattr(tokenizer, "chat_template", "") or "")


def tool_prompt(schemas: Sequence[dict]) -> str:
    """How the tools are described to a model whose chat template has no `tools`: a system message with each
    tool's schema and an example call of the first (its first argument), in the hermes format."""
    first = schemas[0]["function"]
    arg = next(iter(first.get("parameters", {}).get("properties", {})), None)
    example = {"name": first["name"], "arguments": {arg: "..."} if arg else {}}
    lines = [
        "You have tools. To call one, reply with only the call, for example:",
        f"<tool_call>{json.dumps(example)}</tool_call>",
        "Its result comes back in the next message. When you know the answer, reply without a tool call.",
        "Tools:",
    ]
    return "\n".join(lines + [json.dumps(s["function"]) for s in schemas])


def tokenize(
    texts: Sequence[str | list],
    metas: Sequence[dict],
    tokenizer: Any,
    max_len: int,
    what: str,
    chat: bool = False,
    system_prompt: str | None = None,
    tools: list | None = None,
) -> list[PromptRecord]:
    """Token ids of each prompt (`prompt_record`)."""
    return [
        prompt_record(i, text, meta, tokenizer, max_len, what, chat, system_prompt, tools)
        for i, (text, meta) in enumerate(zip(texts, metas))
    ]


def as_seen(text: str | list, meta: dict) -> tuple[str, dict]:
    """A prompt as reward functions see it: a chat prompt's text is its last user message, and its metadata
    gains the messages, so they get both."""
    if isinstance(text, list):
        return chat_text(text), {**meta, "messages": text}
    return text, meta


def prompt_record(
    i: int,
    text: str | list,
    meta: dict,
    tokenizer: Any,
    max_len: int,
    what: str,
    chat: bool = False,
    system_prompt: str | None = None,
    tools: list | None = None,
) -> PromptRecord:
    """Token ids of prompt i, named `what[i]` in its errors. With a chat template the template adds the special
    tokens itself. A chat prompt (a list of messages) needs the template."""
    if isinstance(text, list) and not chat:
        raise DataError(
            f"{what}[{i}] is a list of chat messages, which needs the tokenizer's chat template "
            "(data.apply_chat_template is false, or the tokenizer has none)"
        )
    ids = tokenizer(format_prompt(text, tokenizer, chat, system_prompt, tools), add_special_tokens=not chat)[
        "input_ids"
    ]
    if len(ids) > max_len:
        raise DataError(
            f"{what}[{i}] is {len(ids)} tokens, longer than the limit of {max_len} "
            "(data.max_prompt_length, and the model's positions minus max_new_tokens)"
        )
    if not ids:
        raise DataError(f"{what}[{i}] tokenizes to no tokens")
    seen, meta = as_seen(text, meta)
    return PromptRecord(i, seen, list(ids), meta)


def deal_prompts(n: int, rank: int, world_size: int, plan: str = "interleaved") -> range:
    """The prompt positions dealt to one rank (an engine group) of n prompts, by data.shard's plan; ranks
    differ by at most one. interleaved: every world_size-th prompt, so a
    dataset sorted by length or source spreads over all ranks; contiguous: one block per rank."""
    if plan == "interleaved":
        return range(rank, n, world_size)
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def resolve_callable(fn: Callable | str | None, what: str) -> Callable | None:
    if fn is None or callable(fn):
        return fn
    obj = import_object(fn, what)
    if not callable(obj):
        raise DataError(f"{what}: {fn} is not callable")
    return obj
