"""The streaming prompt store (rft_ds/prompt_store.py): prompts read by position from a JSONL file, an Arrow
table or a list, checked and tokenized when read, with the same records and digest as the whole-set path."""

import json

import numpy as np
import pytest

from rft_ds import prompt_store
from rft_ds.checkpoint import prompts_digest
from rft_ds.data import DataError, load_source, normalize, tokenize
from rft_ds.prompt_store import JsonlRows, PromptStore, open_rows, startup_positions


class Tok:
    """A character tokenizer with a chat template: enough to tell prompts, lengths and templates apart."""

    chat_template = "x"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 97 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


ROWS = [
    {"prompt": "what is 2+2?", "answer": "4", "level": 1},
    {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3?"}],
        "answer": "6",
        "level": 2,
    },
    {"prompt": "name a colour", "answer": None, "level": 3},
]


def _store(source, chat=True, limit=200):
    store = PromptStore(open_rows(source, "prompts"), "prompts", "prompt", None)
    store.set_format(Tok(), limit, chat, None)
    return store


def _whole(source, chat=True, limit=200):
    """What rft_ds did before the store: the whole set read, normalized and tokenized at start-up."""
    texts, metas = normalize(load_source(source, "prompts"), "prompts")
    records = tokenize(texts, metas, Tok(), limit, "prompts", chat)
    return records, prompts_digest([r.text for r in records], [r.metadata for r in records])


def _jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    if blank_lines:  # blank and whitespace-only lines hold no record, and CRLF endings are fine
        lines = ["", lines[0] + "\r", "   ", *lines[1:], ""]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["list", "jsonl", "parquet", "save_to_disk"])
def test_every_source_gives_the_records_and_digest_of_the_whole_set_path(tmp_path, kind):
    import datasets

    if kind == "list":
        source = ROWS
    elif kind == "jsonl":
        source = _jsonl(tmp_path / "p.jsonl", ROWS, blank_lines=True)
    elif kind == "parquet":  # an Arrow column holds one type: text prompts here, chat prompts below
        datasets.Dataset.from_list([{**r, "prompt": str(r["prompt"])} for r in ROWS]).to_parquet(str(tmp_path / "p.pq"))
        (tmp_path / "p.pq").rename(tmp_path / "p.parquet")
        source = str(tmp_path / "p.parquet")
    else:
        chat = [{**r, "prompt": [{"role": "user", "content": str(r["prompt"])}]} for r in ROWS]
        datasets.Dataset.from_list(chat).save_to_disk(str(tmp_path / "ds"))
        source = str(tmp_path / "ds")
    store = _store(source)
    records, digest = _whole(source)
    assert len(store) == len(records)
    got = store.load([2, 0, 1])  # any order, by position
    assert [(r.id, r.text, r.token_ids, r.metadata) for r in sorted(got, key=lambda r: r.id)] == [
        (r.id, r.text, r.token_ids, r.metadata) for r in records
    ]
    assert store.texts[1] == records[1].text and store.metadata[2] == records[2].metadata
    assert store.token_ids[0] == records[0].token_ids and store.lengths.tolist() == [len(r.token_ids) for r in records]
    # a checkpoint written when every rank read the whole set resumes: the same digest, in two passes
    assert store.digest() == digest


def test_jsonl_index_survives_chunk_boundaries_and_names_lines(tmp_path, monkeypatch):
    rows = [{"prompt": f"p{i}" * (i % 5 + 1)} for i in range(40)]
    path = tmp_path / "p.jsonl"
    text = "\n".join(json.dumps(r) + ("\n" if i % 7 == 0 else "") for i, r in enumerate(rows))  # some blank lines
    path.write_text(text)  # no newline after the last record
    whole = load_source(str(path), "prompts")
    for chunk in (7, 64, 1 << 20):  # a record cut by every kind of chunk boundary
        monkeypatch.setattr(prompt_store, "INDEX_CHUNK", chunk)
        got = JsonlRows(path, "prompts", "prompt")
        assert got.read(range(len(got))) == whole
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n{oops\n')
    rows = JsonlRows(bad, "prompts", "prompt")
    assert len(rows) == 3 and rows.read([0]) == [{"prompt": "ok"}]  # nothing else read: no error yet
    with pytest.raises(DataError, match=r"bad.jsonl:3: missing field 'prompt' \(data.prompt_field\)"):
        rows.read([1])
    with pytest.raises(DataError, match=r"bad.jsonl:4: malformed JSON"):
        rows.read([2])
    with pytest.raises(DataError, match=r"file not found"):
        JsonlRows(tmp_path / "none.jsonl", "prompts", "prompt")


def test_a_bad_record_far_into_the_set_is_found_when_read_and_named(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(30_000)]
    rows[21_001] = {"answer": "no prompt"}
    ds = datasets.Dataset.from_list(rows)  # the row's prompt is null in the Arrow table
    store = PromptStore(open_rows(ds, "prompts"), "prompts", "prompt", None)
    store.set_format(Tok(), 64, False, None)
    positions, head = startup_positions(len(store))
    assert 21_001 not in positions and head == 5000 and len(positions) == 10_000
    store.load(positions)  # the start-up sample passes ...
    with pytest.raises(DataError, match=r"^prompts\[21001\] has no field 'prompt'$"):
        store.load([5, 21_001])  # ... the draw that reaches the row names it
    with pytest.raises(DataError, match=r"^prompts\[21001\] has no field 'prompt'$"):
        store.check_all()  # rft-ds check reads every row
    store.limit_to(1)
    store.forget()
    with pytest.raises(DataError, match=r"^prompts\[7\] is 2 tokens, longer than the limit of 1"):
        store.load([7])


def test_startup_positions_cover_the_head_and_spread_over_the_rest():
    assert startup_positions(5, 10)[0].tolist() == [0, 1, 2, 3, 4]
    pos, head = startup_positions(1_000_000, 10)
    assert head == 5 and pos[:5].tolist() == [0, 1, 2, 3, 4] and pos[-1] == 999_999
    assert len(pos) == 10 and np.all(np.diff(pos) > 0)


def test_records_are_kept_until_the_next_draw_forgets_them(tmp_path):
    reads = []
    store = _store(ROWS)
    real = store.rows.read
    store.rows.read = lambda ids: reads.append(list(ids)) or real(ids)
    store.load([0, 1])
    store.load([1, 2])  # only the new one is read
    assert reads == [[0, 1], [2]]
    store.forget()
    store.load([1])
    assert reads[-1] == [1] and store.lengths[0] > 0  # lengths outlive the records
    with pytest.raises(DataError, match=r"prompts is empty"):
        PromptStore(open_rows([], "prompts"), "prompts", "prompt", None)


def test_a_bad_record_met_by_a_draw_stops_every_rank_in_one_line():
    """The draw reads a rank's prompts inside all_ranks_or_fail: the rank that meets the bad record and every
    other rank raise the same RankError naming it (here one process: rank 0's), before anything samples."""
    from types import SimpleNamespace

    from rft_ds import recipe
    from rft_ds.config import RFTRunConfig
    from rft_ds.distributed import RankError
    from rft_ds.run_state import RunState

    class Engine:
        def generate(self, *args, **kwargs):
            raise AssertionError("nothing samples")

    rows = [{"prompt": f"q{i}"} for i in range(12)]
    rows[9] = {"question": "the wrong field"}
    cfg = RFTRunConfig.from_dict({"model": {"model_path": "m"}, "data": {"prompts_per_grow_step": 12}})
    s = SimpleNamespace(
        cfg=cfg, rt=SimpleNamespace(weight_sync=None), sampler=Engine(), prompts=_store(rows), group=0, n_groups=1
    )
    with pytest.raises(
        RankError, match=r"^reading data.prompts failed on rank 0: DataError: prompts\[9\] has no field"
    ):
        recipe.sample(s, RunState(run_id="r", prompts_digest="d"))
