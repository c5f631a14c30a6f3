"""2 ranks over gloo (torchrun): pool shards -> compact table all-gather -> selection -> rows where the tokens
are, the surplus moved by one all_to_all. Each rank writes what it got to OUT_DIR/rank<r>.json (lines of two
processes on one pipe can interleave). A case ending in -sp2 deals the rows to one sequence-parallel group of
both ranks (train.sequence_parallel=2): each gets every row."""

import json
import sys
from pathlib import Path

import numpy as np

from rft_ds import distributed as D
from rft_ds.experience import build_row, num_steps, plan_micro_batches, rows_for_rank
from rft_ds.pool import LocalPool
from rft_ds.scoring import gather_new_rows, gather_pool
from rft_ds.selection import parse_pool_policy, select, selection_digest, update_pool


def main(case: str, out_dir: str) -> None:
    D.init("gloo", 120)
    me = D.rank()
    if case.endswith("-chunked"):  # rounds of at most 4 values in and out of a rank: many rounds
        D.EXCHANGE_VALUES = 4
        case = case.removesuffix("-chunked")
    sp = 2 if case.endswith("-sp2") else 1
    case = case.removesuffix("-sp2")
    rng = np.random.default_rng(100 + me)
    prompts = [[1] * (3 + p % 4) for p in range(12)]
    pool = LocalPool(me)
    # "skewed": rank 0 holds every completion, rank 1 none (its shard is empty); "few": one completion in all
    n = {"skewed": (40, 0), "few": (1, 0), "even": (20, 25)}[case][me]
    # lengths 0-5: with prompts of 3-6 tokens some rows do not fit max_len 8 and are left out, never cut;
    # "few"'s one completion is a single token, so it makes a row
    toks = [rng.integers(5, 9, 1 if case == "few" else int(rng.integers(0, 6))) for _ in range(n)]
    mine = pool.add(rng.integers(0, 12, n), rng.random(n), rng.random(n) < 0.5, toks, step=0)
    table = update_pool(np.zeros(0, mine.dtype), gather_new_rows(mine, 0), 0, parse_pool_policy("accumulate"), True)
    pool.keep_only(table)
    assert (gather_pool(pool) == table).all()  # what a resume rebuilds
    keep, _ = select(table["prompt_id"], table["score"], 0.0 if case == "few" else 0.5, min_score=0.0 if case == "few" else None)
    if case == "few":
        keep[:] = True
    rows, n_rows, moved = rows_for_rank(table[keep], pool, prompts, eos_id=2, max_len=8, sp=sp)
    steps = num_steps(n_rows, D.world_size() // sp, 4, 1)
    micro = plan_micro_batches(len(rows), steps, 0, 0, me // sp, 4, 1)
    # the reference: every row built from every rank's tokens (gathered here for the test only)
    held = {(r, int(slot)): t for r, (slots, tks) in enumerate(D.all_gather_object((pool.rows["slot"], pool.tokens)))
            for slot, t in zip(slots, tks)}
    ref = [build_row(prompts[int(t["prompt_id"])], held[int(t["owner"]), int(t["slot"])], bool(t["eos"]), 2, 8)
           for t in table[keep]
           if len(prompts[int(t["prompt_id"])]) + int(t["length"]) + int(t["eos"]) <= 8]  # whole rows only: none is cut
    Path(out_dir, f"rank{me}.json").write_text(json.dumps({"rows": [[r.input_ids.tolist(), r.labels.tolist()] for r in rows],
                                  "n_rows": n_rows, "moved": moved, "micro": len(micro),
                                  "plan": [m.tolist() for m in micro],
                                  "digest": selection_digest(table, keep),
                                  "ref": [[r.input_ids.tolist(), r.labels.tolist()] for r in ref if r is not None]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    import torch.distributed as dist

    D.barrier()
    dist.destroy_process_group()  # gloo aborts at interpreter exit with a live group and pending work
