"""Selection at scale: the pure numpy selection over 10^4..10^7 scores and 10^3..10^6 prompts.

    python benchmarks/bench_selection.py [--max-scores 10000000]

Prints time, ns per score and peak memory (tracemalloc sees numpy's allocations) per strategy, to show
that selection grows linearly and never becomes the bottleneck of an epoch.
"""

import argparse
import time
import tracemalloc

import common  # noqa: F401  (puts the repo on sys.path)
import numpy as np

from rft_ds.selection import select


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-scores", type=int, default=10_000_000)
    args = ap.parse_args()
    print(f"{'scores':>10} {'prompts':>9} {'strategy':>10} {'seconds':>9} {'ns/score':>9} {'peak MiB':>9}")
    rng = np.random.default_rng(0)
    for n in (10**4, 10**5, 10**6, 10**7):
        if n > args.max_scores:
            break
        for n_prompts in (10**3, 10**4, 10**5, 10**6):
            if n_prompts > n // 8:  # at least 8 completions per prompt
                continue
            pids = rng.integers(0, n_prompts, n)
            scores = rng.random(n).round(2)  # ties, like real rewards
            for strategy in ("per_prompt", "global", "top_k"):
                select(pids[:1000], scores[:1000], 0.9, strategy=strategy, top_k=4)
                tracemalloc.start()
                t = time.perf_counter()
                select(pids, scores, 0.9, strategy=strategy, top_k=4)
                dt = time.perf_counter() - t
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                print(
                    f"{n:>10} {n_prompts:>9} {strategy:>10} {dt:>9.3f} {dt / n * 1e9:>9.1f} {peak / 2**20:>9.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
