"""`deepspeed --num_gpus 2 launch/train.py --config launch/configs/tiny.yaml [section.key=value ...]`.

The launcher-friendly form of `rft-ds train CONFIG` (rft_ds/cli.py): the same code, with the config given
as --config. Needs rft_ds installed (`make venv` installs it editable; `pip install -e .`).
"""

from __future__ import annotations

import argparse

# Before the heavy imports: a stop signal during start-up is kept for the first safe point, not fatal.
from rft_ds.faults import SIGNALS

SIGNALS.install()

from rft_ds.cli import EXIT_STOPPED, end_process, is_collective_failure, train_rank  # noqa: E402,F401 (re-exported for tests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rejection fine-tuning under DeepSpeed ZeRO-3.")
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("--resume", default=None, help="'auto' (newest intact checkpoint in train.output_dir) or a path")
    ap.add_argument(
        "--resume-force",
        action="store_true",
        help="resume even though fields that matter (seed, method, selection, model, data) changed",
    )
    ap.add_argument("--verbose", action="store_true", help="every library's output on the terminal (train.verbose)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=6")
    args = ap.parse_args(argv)
    return train_rank(args.config, args.overrides, args.resume, args.resume_force, args.verbose)


if __name__ == "__main__":
    end_process(main())
