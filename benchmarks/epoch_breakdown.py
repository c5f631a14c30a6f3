"""Share of an epoch per stage (sample / score / select / train / sync / checkpoint / eval) from a run's
metrics.jsonl, e.g. after `make demo-tiny ARGS="train.save_interval=1"` (or `make demo`):

    python benchmarks/epoch_breakdown.py runs/tiny
"""

import sys

from rft_ds.plot import TIMES, read_metrics

STAGES = tuple(f"time_{s}" for s in TIMES)


def main(run_dir: str) -> None:
    rows = read_metrics(run_dir)
    total = sum(r["time_epoch"] for r in rows)
    sums = {s: sum(r.get(s) or 0.0 for r in rows) for s in STAGES}
    other = total - sum(sums.values())
    print(f"{len(rows)} epochs, {total:.1f} s")
    for s, v in [*sums.items(), ("other", other)]:
        print(f"  {s.replace('time_', ''):>10}: {v:7.2f} s  {100 * v / total:5.1f} %")
    small = sums["time_sync"] + sums["time_score"] + sums["time_select"]
    print(f"  sync + score + select: {100 * small / total:.1f} % of the epoch (target < 5 %)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
