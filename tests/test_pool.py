"""A rank's pool shard: ownership, pruning to the global table, checkpoint form, elastic merge."""

import pickle

import numpy as np
import pytest

from rft_ds.pool import LocalPool
from rft_ds.selection import canonical, completion_digest, update_pool


def filled(rank=0):
    pool = LocalPool(rank)
    rows = pool.add([3, 3, 5], np.array([0.1, 0.9, 0.5]), [True, False, True], [[7, 8], [9], [1, 2, 3]], step=0)
    return pool, rows


def test_add_assigns_slots_and_table_rows():
    pool, rows = filled(rank=2)
    assert rows["slot"].tolist() == [0, 1, 2] and (rows["owner"] == 2).all()
    assert rows["length"].tolist() == [2, 1, 3]
    assert rows["digest"][1] == completion_digest([9], False)
    more = pool.add([5], np.array([1.0]), [True], [[4]], step=1)
    assert more["slot"].tolist() == [3] and len(pool) == 4  # slots never reused
    assert [t.tolist() for t in pool.tokens_of(np.array([3, 0]))] == [[4], [7, 8]]


def test_keep_only_what_the_global_table_holds():
    pool, rows = filled(rank=1)
    other = rows.copy()
    other["owner"] = 0  # another rank's rows with the same slots must not keep ours
    table = np.concatenate([rows[[0, 2]], other])
    pool.keep_only(table)
    assert pool.rows["slot"].tolist() == [0, 2]
    assert [t.tolist() for t in pool.tokens_of(np.array([2]))] == [[1, 2, 3]]
    with pytest.raises(KeyError, match="lacks slots"):
        pool.tokens_of(np.array([1]))


def test_latest_policy_prunes_the_shard():
    pool, rows = filled()
    table = update_pool(canonical(rows), rows[:0], 0, None, True)
    new = pool.add([3], np.array([0.3]), [True], [[6]], step=1)
    table = update_pool(table, new, 1, 1, True)
    pool.keep_only(table)
    assert len(pool) == 1 and pool.tokens[0].tolist() == [6]


def test_shard_carries_the_steps_dedup_gives_the_table():
    """A completion sampled at grow steps 0 and 1 with the same score: the pool keeps its first copy with the
    newest step (a window keeps it while any copy is in it); the shard must say so too, or a resume would
    rebuild an older step and a window would drop the completion early."""
    pool = LocalPool(0)
    table = update_pool(canonical(pool.add([3], np.array([0.5]), [True], [[7, 8]], step=0)), pool.rows[:0], 0, 2, True)
    table = update_pool(table, pool.add([3], np.array([0.5]), [True], [[7, 8]], step=1), 1, 2, True)
    assert table["slot"].tolist() == [0] and table["step"].tolist() == [1]
    pool.keep_only(table)
    assert (canonical(pool.rows, dedup=False) == table).all()


def test_checkpoint_form_round_trips_including_empty():
    pool, _ = filled(rank=1)
    back = pickle.loads(pickle.dumps(pool))
    assert (back.rows == pool.rows).all() and back.next_slot == 3 and back.rank == 1
    assert [t.tolist() for t in back.tokens] == [[7, 8], [9], [1, 2, 3]]
    empty = pickle.loads(pickle.dumps(LocalPool(3)))
    assert len(empty) == 0 and empty.tokens == [] and empty.rank == 3


def test_merge_for_another_world_size():
    a, _ = filled(rank=0)
    b = LocalPool(2)
    b.add([8], np.array([0.7]), [True], [[5, 5]], step=1)
    merged = LocalPool.merge([a, LocalPool(4), b], rank=1)  # an empty old shard among them
    assert (merged.rows["owner"] == 1).all() and merged.rows["slot"].tolist() == [0, 1, 2, 3]
    assert merged.rows["step"].tolist() == [0, 0, 0, 1]
    assert (merged.rows["digest"] == np.concatenate([a.rows["digest"], b.rows["digest"]])).all()
    assert [t.tolist() for t in merged.tokens] == [[7, 8], [9], [1, 2, 3], [5, 5]]
    assert len(LocalPool.merge([], rank=3)) == 0  # a new rank beyond the old world


@pytest.mark.parametrize("case", ["skewed", "few", "even", "even-sp2", "skewed-chunked"])
def test_rows_exchange_between_two_ranks(case, tmp_path):
    """Real gloo ranks: the selected rows end up balanced across ranks, each row once, tokens and all, and
    both ranks run the same number of micro-batches. Under sequence parallelism (-sp2: one group of both
    ranks) each rank gets every row, in the same order, and the same micro-batches."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from rft_ds.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "tests/dist/rows_exchange.py",
            case,
            str(tmp_path),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["digest"] == b["digest"] and a["n_rows"] == b["n_rows"] and a["micro"] == b["micro"] > 0
    sizes = [len(a["rows"]), len(b["rows"])]
    got = sorted(map(json.dumps, a["rows"] + b["rows"]))
    if case == "even-sp2":
        assert a["rows"] == b["rows"] and a["plan"] == b["plan"] and len(a["rows"]) == a["n_rows"] > 0
        assert a["moved"] > 0  # each rank got the rows the other holds
        got = sorted(map(json.dumps, a["rows"]))
    elif case == "few":
        assert sizes == [1, 0] and a["moved"] == 0  # rank 1 runs its step on an empty micro-batch
    else:
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == a["n_rows"]
        if case.startswith("skewed"):
            assert a["moved"] == a["n_rows"] // 2  # only the surplus moved (in many rounds when chunked)
    assert got == sorted(map(json.dumps, a["ref"]))  # the rows of the selected completions, tokens and all
