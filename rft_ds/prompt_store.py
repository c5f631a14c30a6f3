"""The training prompts where they lie: a JSONL file (an index of line offsets), an Arrow table (a `datasets`
Dataset: memory-mapped from its cache, a save_to_disk directory or data files) or the Python API's list.

A prompt is read, checked and tokenized when a rank first needs it (the prompts it samples, the prompts of the
rows it trains), and kept until the next grow step's draw; no rank holds the whole set as Python objects. At
start-up a bounded sample is checked (`startup_positions`), so a broken dataset still fails before any model
loads; `rft-ds check` checks every prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from rft_ds.data import DataError, PromptRecord, as_seen, load_source, normalize_one, prompt_record

STARTUP_CHECK = 10_000  # prompts checked at start-up: all of a set up to this size, else this many spread over it
READ_BATCH = 4096  # rows read at once for a pass over the whole set (the digest, `rft-ds check`)
INDEX_CHUNK = 1 << 26  # bytes of a JSONL file scanned at once for its line starts


class JsonlRows:
    """A .jsonl file's records by position, read on demand: 20 bytes per record in memory (where its line is),
    not the record. Errors name the file and line, as when the file was read whole."""

    def __init__(self, path: Path, what: str, prompt_field: str):
        if not path.is_file():
            raise DataError(f"{what}: file not found: {path}")
        self.path, self.what, self.prompt_field = path, what, prompt_field
        nls, size = [], 0
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(INDEX_CHUNK), b""):
                nls.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
                size += len(chunk)
        nl = np.concatenate(nls) if nls else np.zeros(0, np.int64)
        start, end = np.r_[0, nl + 1], np.r_[nl, size]  # line k (1-based) is bytes start[k-1]:end[k-1]
        real = end > start  # an empty line (and the nothing after a last newline) holds no record
        with path.open("rb") as f:  # a short line may be whitespace only (as rare as it is cheap to read)
            for k in np.flatnonzero(real & (end - start < 16)):
                f.seek(int(start[k]))
                real[k] = bool(f.read(int(end[k] - start[k])).strip())
        self.start, self.end = start[real], end[real]
        self.lineno = (np.flatnonzero(real) + 1).astype(np.int32)

    def __len__(self) -> int:
        return len(self.start)

    def read(self, ids: Sequence[int]) -> list[dict]:
        out = []
        with self.path.open("rb") as f:
            if isinstance(ids, range) and ids.step == 1 and len(ids):  # a pass over the set: one read
                f.seek(int(self.start[ids.start]))
                block = f.read(int(self.end[ids.stop - 1] - self.start[ids.start]))
                base = int(self.start[ids.start])
                raws = [block[self.start[i] - base : self.end[i] - base] for i in ids]
            else:
                raws = []
                for i in ids:
                    f.seek(int(self.start[i]))
                    raws.append(f.read(int(self.end[i] - self.start[i])))
            for i, raw in zip(ids, raws):
                where = f"{self.what}: {self.path}:{int(self.lineno[i])}"
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg})") from None
                if not isinstance(obj, dict) or self.prompt_field not in obj:
                    raise DataError(f"{where}: missing field {self.prompt_field!r} (data.prompt_field)")
                out.append(obj)
        return out


class TableRows:
    """An Arrow-backed datasets.Dataset's rows by position (memory-mapped: reading one costs its bytes)."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, ids: Sequence[int]) -> list[dict]:
        contiguous = isinstance(ids, range) and ids.step == 1  # a pass over the set reads slices
        cols = self.ds[ids.start : ids.stop] if contiguous else self.ds[[int(i) for i in ids]]
        names = list(cols)
        return [dict(zip(names, vals)) for vals in zip(*(cols[k] for k in names))] if names else [{} for _ in ids]


class ListRows:
    """The Python API's list (or what "module:function" returned): already in memory, the user's."""

    def __init__(self, items: Sequence):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def read(self, ids: Sequence[int]) -> list:
        return [self.items[int(i)] for i in ids]


def open_rows(source: Any, what: str, prompt_field: str = "prompt", split: str = "train") -> Any:
    """A prompt source as rows by position, without reading its records: a .jsonl file is indexed, a
    `datasets` table memory-mapped; anything else (a list, "module:function", a reasoning-gym task) is
    what load_source makes of it."""
    from rft_ds.data import _is_hf_dataset

    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str) and source.endswith(".jsonl"):
        return JsonlRows(Path(source), what, prompt_field)
    items = load_source(source, what, prompt_field, split, as_table=True)
    return TableRows(items) if _is_hf_dataset(items) else ListRows(items)


class View(Sequence):
    """A read-only sequence whose items are computed by position (the store's texts, metadata, records)."""

    def __init__(self, n: int, get: Callable[[int], Any]):
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self.n))]
        return self.get(int(i))


class PromptStore:
    """The training prompts, read by position: `records(ids)` reads, checks and tokenizes the ones not yet
    known (errors name the prompt), and keeps them until `forget`. `texts`, `metadata` and `records` are
    views by position, as a PromptSet's lists are; `lengths` holds the token count of every prompt a
    rank has been told (-1: not yet), the same on every rank once `recipe` has gathered them."""

    def __init__(self, rows: Any, what: str, prompt_field: str, metadata_fields: Sequence[str] | None):
        if len(rows) == 0:
            raise DataError(f"{what} is empty")
        self.rows, self.what, self.prompt_field, self.metadata_fields = rows, what, prompt_field, metadata_fields
        self.fmt: tuple | None = None  # (tokenizer, max_len, chat, system_prompt): set_format
        self.cache: dict[int, PromptRecord] = {}
        self.lengths = np.full(len(rows), -1, np.int32)
        self.replay = None  # the training prompts' data.replay_prompts (a PromptSet), as PromptSet.replay
        n = len(rows)
        self.records = View(n, self.record)
        self.texts = View(n, lambda i: self.record(i).text)
        self.metadata = View(n, lambda i: self.record(i).metadata)
        self.token_ids = View(n, lambda i: self.record(i).token_ids)
        self.announced = np.zeros(n, bool)  # lengths every rank knows (set only from a gather: equal everywhere)

    def __len__(self) -> int:
        return len(self.rows)

    def set_format(
        self, tokenizer: Any, max_len: int, chat: bool, system_prompt: str | None, tools: list | None = None
    ) -> None:
        self.fmt = (tokenizer, max_len, chat, system_prompt, tools)
        self.cache.clear()

    def limit_to(self, max_len: int) -> None:
        """Refuse, when read, a prompt longer than this (a row holds it, its completion and an EOS)."""
        tokenizer, limit, *rest = self.fmt
        self.fmt = (tokenizer, min(limit, max_len), *rest)

    def load(self, ids: Sequence[int]) -> list[PromptRecord]:
        """The records of these prompts, read and tokenized where not known yet (in one read)."""
        missing = sorted({int(i) for i in ids if int(i) not in self.cache})
        for i, item in zip(missing, self.rows.read(missing)):
            self.cache[i] = self._record(i, item)
        return [self.cache[int(i)] for i in ids]

    def record(self, i: int) -> PromptRecord:
        return self.cache[i] if i in self.cache else self.load([i])[0]

    def forget(self) -> None:
        """Drop the records read so far (a new grow step's draw reads its own); lengths stay known."""
        self.cache.clear()

    def _normalized(self, item: Any, i: int) -> tuple[str | list, dict]:
        return normalize_one(item, i, self.what, self.prompt_field, self.metadata_fields)

    def _record(self, i: int, item: Any) -> PromptRecord:
        """Row i checked and tokenized (errors name it); its length is known from then on."""
        tokenizer, limit, chat, system_prompt, tools = self.fmt
        rec = prompt_record(i, *self._normalized(item, i), tokenizer, limit, self.what, chat, system_prompt, tools)
        self.lengths[i] = len(rec.token_ids)
        return rec

    def batches(self) -> Iterator[tuple[int, list]]:
        """(first position, rows) over the whole set, READ_BATCH rows at a time."""
        for start in range(0, len(self.rows), READ_BATCH):
            yield start, self.rows.read(range(start, min(start + READ_BATCH, len(self.rows))))

    def check_all(self) -> None:
        """Every prompt read, checked and tokenized (`rft-ds check`): their lengths kept, not their records."""
        for start, items in self.batches():
            for i, item in enumerate(items, start):
                self._record(i, item)

    def digest(self) -> str:
        """checkpoint.prompts_digest of the set (texts and metadata as reward functions see them), computed in
        one pass over the rows (the metadata's JSON waits in a temporary file) instead of over two lists in
        memory: the same bytes, so a checkpoint written when the prompts were read whole resumes."""
        import tempfile

        h = hashlib.blake2b(digest_size=16)
        h.update(b"[[")
        with tempfile.TemporaryFile() as metadata:  # the second list's bytes, hashed after the first's
            for start, items in self.batches():
                seen = [as_seen(*self._normalized(item, start + k)) for k, item in enumerate(items)]
                sep = ", " if start else ""
                h.update((sep + ", ".join(json.dumps(t, sort_keys=True, default=str) for t, _ in seen)).encode())
                metadata.write((sep + ", ".join(json.dumps(m, sort_keys=True, default=str) for _, m in seen)).encode())
            h.update(b"], [")
            metadata.seek(0)
            for block in iter(lambda: metadata.read(1 << 24), b""):
                h.update(block)
        h.update(b"]]")
        return h.hexdigest()


def startup_positions(n: int, k: int = STARTUP_CHECK) -> tuple[np.ndarray, int]:
    """The prompts checked at start-up: all of them up to k; else the first k/2 and k/2 spread evenly over
    the rest (a broken tail or a second file of another shape shows up too). Returns (positions, how many of
    them are a prefix of the set)."""
    if n <= k:
        return np.arange(n), n
    head = k // 2
    rest = np.unique(np.linspace(head, n - 1, k - head).round().astype(np.int64))
    return np.concatenate([np.arange(head), rest]), head
