"""The rollout data plane, old and new, side by side on synthetic completions (no model, no sampling).

    python benchmarks/bench_data_plane.py [--prompts 20000 --n 32 --tokens 256 --world 2]

Each of `world` gloo ranks (torchrun, started by this script) holds the completions of its prompt shard
(interleaved), N per prompt, T tokens each, with synthetic scores. Then, timed per rank, from "scored
completions in hand" to "this rank's training rows":
  new: pool shard -> all-gather of 25-byte table rows -> select -> rows where the tokens are, the surplus
       moved by one all_to_all (rft_ds today);
  old: all-gather of every completion with its token ids -> canonical pools on every rank -> select ->
       every rank builds every row -> its micro-batches (rft_ds before the data plane, re-implemented here).
Bytes sent and received are counted at torch.distributed (what the collectives really carry, padding
included); peak RSS above the phase's start is sampled every 5 ms; pool memory is what each path keeps
between epochs. Both paths must select the same set (same selection digest). Last, a projection to
64 ranks x 100k prompts x 32 x 300 tokens from the measured per-completion sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import common
import numpy as np

COUNT = {"sent": 0, "received": 0}


def count_bytes() -> None:
    """Wrap the torch.distributed calls the two paths use so every byte on the wire is counted."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    gather, a2a = c10d.all_gather, c10d.all_to_all_single

    def all_gather(tensor_list, tensor, *a, **k):
        size = tensor.numel() * tensor.element_size()
        COUNT["sent"] += size * (len(tensor_list) - 1)
        COUNT["received"] += sum(t.numel() * t.element_size() for t in tensor_list) - size
        return gather(tensor_list, tensor, *a, **k)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        me, el = dist.get_rank(), input.element_size()
        COUNT["sent"] += (input.numel() - input_split_sizes[me]) * el
        COUNT["received"] += (output.numel() - output_split_sizes[me]) * el
        return a2a(output, input, output_split_sizes, input_split_sizes, *a, **k)

    c10d.all_gather = all_gather
    c10d.all_to_all_single = dist.all_to_all_single = all_to_all_single


class PeakRSS:
    """Peak resident memory above the start of a `with` block, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.proc, self.peak, self.done = psutil.Process(), 0, False
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.done = True
        self.thread.join()


def synthetic(prompts: list[int], n: int, tokens: int, rank: int, scores: str):
    """This rank's completions: token ids, EOS flags and scores: "quarter" (0, 0.25, ..., 1: ties, as
    binary and rule-based rewards have) or "continuous" (a reward model's: every score distinct)."""
    rng = np.random.default_rng([7, rank])
    pids = np.repeat(np.asarray(prompts, dtype=np.int64), n)
    toks = list(rng.integers(3, 49_000, (len(pids), tokens), dtype=np.int32))
    eos = rng.random(len(pids)) < 0.8
    score = rng.random(len(pids))
    return pids, toks, eos, np.round(score * 4) / 4 if scores == "quarter" else score


def new_path(pids, toks, eos, scores, prompt_ids, max_len, world):
    from rft_ds import distributed as D
    from rft_ds.experience import num_steps, plan_micro_batches, rows_for_rank
    from rft_ds.pool import LocalPool
    from rft_ds.scoring import gather_new_rows
    from rft_ds.selection import TABLE_ROW, parse_pool_policy, select, selection_digest, update_pool

    pool = LocalPool(D.rank())
    mine = pool.add(pids, scores, eos, toks, step=0)
    table = update_pool(np.zeros(0, TABLE_ROW), gather_new_rows(mine, 0), 0, parse_pool_policy("accumulate"), True)
    pool.keep_only(table)
    keep, _ = select(table["prompt_id"], table["score"], 0.9)
    rows, n_rows, moved = rows_for_rank(table[keep], pool, prompt_ids, 0, max_len)
    micro = plan_micro_batches(len(rows), num_steps(n_rows, world, 8, 1), 0, 0, D.rank(), 8, 1)
    held = table.nbytes + sum(t.nbytes + 112 for t in pool.tokens)  # 112: a numpy array's own header
    return dict(
        digest=selection_digest(table, keep),
        n_selected=int(keep.sum()),
        n_rows=n_rows,
        moved=moved,
        rows_here=len(rows),
        micro=len(micro),
        pool_bytes=held,
        table_rows=len(table),
    )


def old_path(pids, toks, eos, scores, prompt_ids, max_len, world):
    """The code before the data plane, in substance: Samples with tokens all-gathered, Pools.add (canonical:
    sort by prompt, digest, -score, dedup), select, every rank building every row, a global shuffle dealt
    to ranks with wrap-around."""
    from rft_ds import distributed as D
    from rft_ds.experience import build_row, num_steps
    from rft_ds.selection import completion_digest, select, selection_digest, table_rows

    local = {
        "prompt_id": pids,
        "score": scores,
        "eos": eos,
        "tokens": toks,
        "digest": np.array([completion_digest(t, e) for t, e in zip(toks, eos)], dtype=np.uint64),
    }
    parts = D.all_gather_object(local)
    pid = np.concatenate([p["prompt_id"] for p in parts])
    score = np.concatenate([p["score"] for p in parts])
    eo = np.concatenate([p["eos"] for p in parts])
    dig = np.concatenate([p["digest"] for p in parts])
    tk = [t for p in parts for t in p["tokens"]]
    del parts
    order = np.lexsort((-score, dig, pid))
    first = np.r_[True, (pid[order][1:] != pid[order][:-1]) | (dig[order][1:] != dig[order][:-1])]
    order = order[first]
    pid, score, eo, dig = pid[order], score[order], eo[order], dig[order]
    tk = [tk[i] for i in order]
    keep, _ = select(pid, score, 0.9)
    rows = [
        r
        for i in np.flatnonzero(keep)
        if (r := build_row(prompt_ids[pid[i]], tk[i], bool(eo[i]), 0, max_len)) is not None
    ]
    steps = num_steps(len(rows), world, 8, 1)
    perm = np.random.default_rng([0, 0]).permutation(len(rows))
    slots = perm[np.arange(steps * world * 8) % len(rows)].reshape(steps, world, 8)[:, D.rank(), :]
    held = pid.nbytes + score.nbytes + eo.nbytes + dig.nbytes + sum(t.nbytes + 112 for t in tk)
    digest = selection_digest(table_rows(pid, score, eo, digest=dig, length=np.zeros(len(pid))), keep)
    return dict(
        digest=digest,
        n_selected=int(keep.sum()),
        n_rows=len(rows),
        moved=None,
        rows_here=len(rows),
        micro=len(slots),
        pool_bytes=held,
        table_rows=len(pid),
    )


def rank_main(args) -> None:
    from rft_ds import distributed as D
    from rft_ds.data import deal_prompts

    D.init("gloo", 1800)
    count_bytes()
    me, world = D.rank(), D.world_size()
    prompt_ids = [[1] * (8 + p % 24) for p in range(args.prompts)]  # prompt token ids (lengths 8..31)
    data = synthetic(list(deal_prompts(args.prompts, me, world)), args.n, args.tokens, me, args.scores)
    max_len = 32 + args.tokens + 1
    out = {}
    for name, fn in (("new", new_path), ("old", old_path)):
        D.barrier()
        COUNT.update(sent=0, received=0)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = fn(*data, prompt_ids, max_len, world)
            res["seconds"] = time.perf_counter() - t0
        res.update(COUNT, peak_rss=mem.peak, completions=len(data[0]))
        out[name] = res
        del res
    print("RESULT", me, json.dumps(out), flush=True)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def report(results: dict[int, dict], args) -> None:
    world = len(results)
    print(
        f"\nP={args.prompts} prompts x N={args.n} x T={args.tokens} tokens, {world} ranks (gloo), {args.scores} "
        "scores\n"
    )
    print(
        f"{'rank':>4} {'path':>4} {'sent':>10} {'received':>10} {'peak RSS':>10} {'pool held':>10} {'seconds':>8} "
        f"{'rows here':>9} {'moved':>6} {'selection digest':>17}"
    )
    for r, res in sorted(results.items()):
        for name in ("old", "new"):
            x = res[name]
            print(
                f"{r:>4} {name:>4} {fmt_bytes(x['sent']):>10} {fmt_bytes(x['received']):>10} "
                f"{fmt_bytes(x['peak_rss']):>10} {fmt_bytes(x['pool_bytes']):>10} {x['seconds']:>8.2f} "
                f"{x['rows_here']:>9} {str(x['moved']):>6} {x['digest']:>17}"
            )
    digests = {res[p]["digest"] for res in results.values() for p in ("old", "new")}
    print(
        f"\nselected set: {'the same in both paths on every rank' if len(digests) == 1 else 'DIFFERENT'} "
        f"({results[0]['new']['n_selected']} completions, {results[0]['new']['n_rows']} rows)"
    )
    old_rx = max(res["old"]["received"] for res in results.values())
    new_rx = max(res["new"]["received"] for res in results.values())
    old_mem = max(res["old"]["pool_bytes"] for res in results.values())
    new_mem = max(res["new"]["pool_bytes"] for res in results.values())
    print(
        f"bytes received per rank, new/old: 1/{old_rx / new_rx:.0f}; pool memory per rank, new/old: "
        f"{new_mem / old_mem:.3f}; seconds, old/new: "
        f"{max(r['old']['seconds'] for r in results.values()) / max(r['new']['seconds'] for r in results.values()):.1f}x"
    )

    # Projection from the measured per-completion sizes.
    total = args.prompts * args.n
    others = total * (world - 1) / world
    old_item = old_rx / others  # a pickled completion with its tokens, per completion received
    old_overhead = old_item - 4 * args.tokens
    new_item = new_rx / others  # its 25-byte row, plus its share of the moved rows' tokens and of the padding
    held_old = old_mem / total
    held_new_overhead = (new_mem - total * 45) / (total / world) - 4 * args.tokens  # per owned completion
    print(
        f"\nmeasured per completion: old wire {old_item:.0f} B (tokens {4 * args.tokens} B + {old_overhead:.0f} B); "
        f"new wire {new_item:.1f} B (its compressed row + its share of the moved rows); held: old {held_old:.0f} B on every "
        f"rank, new a 45 B table row on every rank + tokens + {held_new_overhead:.0f} B on the owner"
    )
    W, P, N, T = 64, 100_000, 32, 300
    c = P * N
    old_t, held_new_t = old_overhead + 4 * T, c * 45 + c / W * (4 * T + held_new_overhead)
    print(
        f"\nprojection: {W} ranks x {P} prompts x {N} x {T} tokens = {c / 1e6:.1f} M completions per grow step "
        f"(new wire per completion as measured, moved rows included)"
    )
    print(f"{'':>38} {'old':>10} {'new':>10}")
    print(
        f"{'received per rank per grow step':>38} {fmt_bytes(c * (W - 1) / W * old_t):>10} "
        f"{fmt_bytes(c * (W - 1) / W * new_item):>10}"
    )
    print(f"{'pool memory per rank, 1 grow step':>38} {fmt_bytes(c * old_t):>10} {fmt_bytes(held_new_t):>10}")
    print(f"{'... 4 grow steps (pool: accumulate)':>38} {fmt_bytes(4 * c * old_t):>10} {fmt_bytes(4 * held_new_t):>10}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20_000)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--scores", choices=["quarter", "continuous"], default="quarter")
    args = ap.parse_args()
    if "RANK" in os.environ:
        return rank_main(args)
    from rft_ds.distributed import free_port

    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--nproc_per_node",
        str(args.world),
        "--master_port",
        str(free_port()),
        __file__,
        *sys.argv[1:],
    ]
    p = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True)
    results = {
        int(line.split()[1]): json.loads(line.split(" ", 2)[2])
        for line in p.stdout.splitlines()
        if line.startswith("RESULT ")
    }
    if p.returncode != 0 or len(results) != args.world:
        sys.exit(f"benchmark ranks failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    report(results, args)


if __name__ == "__main__":
    main()
