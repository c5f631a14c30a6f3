"""Prompt sources -> records (id, text, token ids, metadata), validated before any model loads."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# Keyword names reward_fn already receives; metadata may not shadow them.
RESERVED_KEYS = {"samples", "prompts", "outputs", "tokenizer", "prompt_ids"}


class DataError(ValueError):
    """Bad prompt data; the message names the prompt, file line or field."""


@dataclass
class PromptRecord:
    id: int
    text: str
    token_ids: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


def import_object(spec: str, what: str) -> Any:
    """Import "package.module:attr" (how YAML names reward_fn, metric_fn and prompt sources)."""
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"{what}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{what}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_source(source: Any, what: str, prompt_field: str = "prompt") -> list:
    """A list as is; "module:function" called; a .jsonl path read line by line."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if isinstance(source, str) and source.endswith(".jsonl"):
        return _read_jsonl(Path(source), what, prompt_field)
    if isinstance(source, str) and ":" in source:
        fn = import_object(source, what)
        items = fn() if callable(fn) else fn
        if not isinstance(items, (list, tuple)):
            raise DataError(f"{what}: {source} must return a list, got {type(items).__name__}")
        return list(items)
    raise DataError(f"{what} must be a list, a .jsonl path or 'module:function', got {source!r}")


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
                raise DataError(f"{what}: {path}:{lineno}: missing field {prompt_field!r}")
            items.append(obj)
    return items


def normalize(items: Sequence, what: str, prompt_field: str = "prompt") -> tuple[list[str], list[dict]]:
    """trlx accepts strings or dicts with the prompt plus metadata; return (texts, metadata)."""
    if len(items) == 0:
        raise DataError(f"{what} is empty")
    texts, metas = [], []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if prompt_field not in item:
                raise DataError(f"{what}[{i}] has no field {prompt_field!r}")
            text = item[prompt_field]
            meta = {k: v for k, v in item.items() if k != prompt_field}
            clash = RESERVED_KEYS & meta.keys()
            if clash:
                raise DataError(f"{what}[{i}] metadata key {sorted(clash)[0]!r} is reserved for reward_fn arguments")
        else:
            text, meta = item, {}
        if not isinstance(text, str):
            raise DataError(f"{what}[{i}] must be a string, got {type(text).__name__}")
        if not text:
            raise DataError(f"{what}[{i}] is an empty string")
        texts.append(text)
        metas.append(meta)
    return texts, metas


def tokenize(texts: Sequence[str], metas: Sequence[dict], tokenizer: Any, max_len: int, what: str) -> list[PromptRecord]:
    records = []
    for i, (text, meta) in enumerate(zip(texts, metas)):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_len:
            raise DataError(f"{what}[{i}] is {len(ids)} tokens, longer than the limit of {max_len} "
                            "(data.max_prompt_length, and the model's positions minus max_new_tokens)")
        if not ids:
            raise DataError(f"{what}[{i}] tokenizes to no tokens")
        records.append(PromptRecord(i, text, list(ids), meta))
    return records


def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced shards: ranks differ by at most one prompt."""
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
