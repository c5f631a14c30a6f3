"""2 ranks over gloo (torchrun): each rank sees its own output directory, as nodes with per-node file caches
might; rank 0's shows this run's best_model/ mark, rank 1's shows none. artifacts.resumed_best must give every
rank rank 0's decision. Each rank writes its answer to OUT_DIR/rank<r>.json."""

import json
import os
import sys
from pathlib import Path

from rft_ds import artifacts
from rft_ds import distributed as D


def main(out_dir: str) -> None:
    D.init("gloo", 120)
    out = Path(out_dir) / f"view{D.rank()}"
    (out / "best_model").mkdir(parents=True)
    if D.rank() == 0:
        (out / "best_model" / artifacts.BEST_MARK).write_text(json.dumps({"run_id": "run1"}))
    saved = {"epoch": 1, "metric": "eval_reward_mean", "value": 0.5, "run_id": "run1"}
    got = artifacts.resumed_best(saved, out, "run1", "eval_reward_mean", "eval/reward_mean")
    (Path(out_dir) / f"rank{D.rank()}.json").write_text(json.dumps(got))
    # as the real entries do (cli.end_process): no interpreter teardown under a live gloo group, which now and
    # then aborted rank 0 at exit ("terminate called without an active exception") after its work was done
    D.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
