"""CLI: `deepspeed --num_gpus 2 launch/train.py --config launch/configs/tiny.yaml [section.key=value ...]`.

Every rank parses and validates the same config, so a bad value fails on all of them, in one line,
before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Before the heavy imports: a stop signal during start-up is kept for the first safe point, not fatal.
from rft_ds.faults import SIGNALS  # noqa: E402  (imports no torch)

SIGNALS.install()

from rft_ds.checkpoint import CheckpointError  # noqa: E402
from rft_ds.config import ConfigError, RFTRunConfig  # noqa: E402
from rft_ds.data import DataError  # noqa: E402
from rft_ds.distributed import RankError  # noqa: E402
from rft_ds.scoring import RewardError  # noqa: E402
from rft_ds.weight_sync import ParityError  # noqa: E402


EXIT_STOPPED = 3  # checkpointed on SIGTERM/SIGUSR1, not finished: requeue and resume (launch/slurm/rft.sbatch does)


def is_collective_failure(e: BaseException) -> bool:
    """A peer died or stalled: torch's distributed error types, or the text of a gloo/NCCL failure raised as a
    plain RuntimeError. Not any error that happens to say "timeout" (a reward server's, say)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(e).lower()
    return any(k in text for k in ("/gloo/", "gloo::", "nccl", "connection closed by peer", "connection reset by peer"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rejection fine-tuning under DeepSpeed ZeRO-3.")
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("--resume", default=None, help="'auto' (newest intact checkpoint in train.output_dir) or a path")
    ap.add_argument("--resume-force", action="store_true",
                    help="resume even though fields that matter (seed, method, selection, model, data) changed")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=6")
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0")
    try:
        cfg = RFTRunConfig.load_yaml(args.config, args.overrides + (["train.resume_force=true"] if args.resume_force else []))
        import rft_ds

        result = rft_ds.train(config=cfg, resume=args.resume)
    except (ConfigError, DataError, RewardError, RankError, CheckpointError, ParityError) as e:
        print(f"rft_ds: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, (ConfigError, DataError, CheckpointError)) else 1
    except RuntimeError as e:  # torch.distributed raises these when a peer dies or stalls past the timeout
        if not is_collective_failure(e):
            raise
        from rft_ds.distributed import lost_ranks

        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"rft_ds: error (rank {rank}): lost contact with {lost_ranks()} during a collective "
              f"(process-group timeout train.dist_timeout_s): {first}", file=sys.stderr, flush=True)
        return 1
    if result.stopped_early:
        return EXIT_STOPPED
    if rank == "0" and result.history:
        last = result.history[-1]
        for key, before in (result.eval_before or {}).items():  # eval reward, and what metric_fn reported
            if isinstance(before, (int, float)) and isinstance(last.get(key), (int, float)):
                print(f"[rft_ds] held-out {key[5:].replace('_', ' ')}: {before:.4f} before -> {last[key]:.4f} after "
                      f"{len(result.history)} epochs", flush=True)
        print(f"[rft_ds] metrics in {result.output_dir / 'metrics.jsonl'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
