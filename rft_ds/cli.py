"""The `rft-ds` command (installed by pip from [project.scripts]).

    rft-ds train CONFIG [section.key=value ...]   # one process; under `deepspeed`/`srun`, one per rank
    rft-ds check CONFIG [section.key=value ...]   # what the run would refuse, in seconds, no model loaded
    rft-ds export CHECKPOINT OUT                  # a checkpoint -> a plain HF model directory
    rft-ds plot RUN_DIR                           # the PNG panels from metrics.jsonl
    rft-ds runs RUN_DIR                           # the epoch table of a run

Under the DeepSpeed launcher: `deepspeed --num_gpus 2 --module rft_ds train CONFIG ...` (the launcher puts
--local_rank=N first; it is accepted and ignored: ranks read LOCAL_RANK). `launch/train.py --config CONFIG`
is the same `train`. Every rank parses and validates the same config, so a bad value fails on all of
them, in one line, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

# Before the heavy imports: a stop signal during start-up is kept for the first safe point, not fatal.
from rft_ds.faults import SIGNALS  # imports no torch

EXIT_STOPPED = 3  # checkpointed on SIGTERM/SIGUSR1, not finished: requeue and resume (launch/slurm/rft.sbatch does)


def is_collective_failure(e: BaseException) -> bool:
    """distributed.is_collective_failure (kept here for the callers that import it from the command)."""
    from rft_ds.distributed import is_collective_failure as collective

    return collective(e)


def end_process(code: int) -> NoReturn:
    """Exit a process whose work is done without the interpreter's teardown, which is work for a process about
    to be gone: ~3 s a rank on the 2-core CPU box (vLLM's engine shutdown runs a gc pass and its distributed
    clean-up, torch unregisters ~200 operator libraries one by one, then every module and tensor is freed).
    Every atexit handler but those two libraries' finalizers still runs (verifier workers, a reward module's
    own), the output is flushed, then os._exit. The entries (`rft-ds`, `python -m rft_ds`, launch/train.py)
    call it; cli.main returns, for callers in a process of their own."""
    import atexit
    import logging
    import weakref

    for fin, info in list(weakref.finalize._registry.items()):  # noqa: SLF001 (no public list of finalizers)
        if getattr(info.func, "__module__", "").startswith(("torch.", "vllm.")):
            fin.atexit = False
    try:
        atexit._run_exitfuncs()  # noqa: SLF001
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def entry() -> NoReturn:
    """The `rft-ds` console script: main, then end_process."""
    end_process(main())


def rank_label() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0")


def train_rank(
    config: str, overrides: list[str], resume: str | None = None, resume_force: bool = False, verbose: bool = False
) -> int:
    """One rank of a run: its exit code (0 done, 3 stopped with a checkpoint, 2 bad input, 1 failure).
    Unless verbose, everything but rft_ds's own lines goes to <output_dir>/logs/rank<r>.log (console.py).
    An error reaches the terminal once, not once per rank (`report`)."""
    SIGNALS.install()
    from rft_ds import console

    try:
        return _train_rank(config, overrides, resume, resume_force, verbose)
    finally:
        console.ended()  # an exit code, not a death: the death watcher stays quiet


def _train_rank(config: str, overrides: list[str], resume: str | None, resume_force: bool, verbose: bool) -> int:
    from rft_ds import console
    from rft_ds.config import ConfigError, RFTRunConfig

    rank = rank_label()
    try:
        cfg = RFTRunConfig.load_yaml(config, overrides + (["train.resume_force=true"] if resume_force else []))
    except ConfigError as e:
        report(f"rft_ds: error (rank {rank}): {e}", rank, before_group=True)
        return 2
    log = None
    if not (verbose or cfg.train.verbose):
        log = Path(cfg.train.output_dir) / "logs" / f"rank{rank}.log"
        try:
            console.redirect(log, main=rank == "0")
        except OSError as e:
            report(
                f"rft_ds: error (rank {rank}): train.output_dir {cfg.train.output_dir} is not writable: "
                f"{e.strerror or e}",
                rank,
                before_group=True,
            )
            return 2
        console.watch_for_death(rank)
        if rank == "0":
            console.say(
                f"[rft_ds] each rank's full output (vLLM, DeepSpeed, transformers, ...): {log.parent}/rank<r>.log;"
                " --verbose shows it here"
            )
    try:
        return _train_and_report(cfg, resume, rank)
    except Exception as e:  # noqa: BLE001 - an error inside a library: its first line here, the rest in the log
        if log is None:
            raise
        import traceback

        traceback.print_exc()  # into the log
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        report(f"rft_ds: error (rank {rank}): {type(e).__name__}: {first} (traceback in {log})", rank)
        return 1


def report(line: str, rank: str, collective: bool = False, before_group: bool = False) -> None:
    """An error line on the terminal once, not once per rank (64 identical lines hide the one that differs):
    - collective (a RankError, stale weights: every rank raised the same error): rank 0 says it, with the
      number of ranks;
    - before the process group exists (a bad config, a device or an output directory a node lacks: every
      rank of a node sees the same): each node's first rank;
    - otherwise the first rank to post its failure to the rendezvous store (distributed.post_failure); when
      the store is gone (with rank 0), each node's first rank.
    The other ranks write the line to their log only."""
    from rft_ds import console
    from rft_ds import distributed as D

    if collective:
        shown = rank == "0"
        n = D.world_size()
        line = line.replace(f"(rank {rank})", f"(all {n} ranks)" if n > 1 else f"(rank {rank})", 1)
    else:
        first = D.post_failure(line.split("): ", 1)[-1]) if D.is_dist() and not before_group else None
        shown = first or (first is None and os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0")
        if first is False:
            line += f" (after {D.first_failure()}, shown on the terminal)"
    if shown:
        console.error(line)
    elif console.log_path is not None or not before_group:  # the log (the terminal under --verbose)
        print(line, file=sys.stderr, flush=True)


def _train_and_report(cfg: Any, resume: str | None, rank: str) -> int:
    """rft_ds.train on this rank; a known error as one line and its exit code."""
    from rft_ds import console
    from rft_ds.checkpoint import CheckpointError
    from rft_ds.config import ConfigError
    from rft_ds.data import DataError
    from rft_ds.distributed import RankError, RendezvousError
    from rft_ds.reward_terms import RewardError
    from rft_ds.weight_sync import ParityError, StaleWeightsError

    try:
        import rft_ds

        result = rft_ds.train(config=cfg, resume=resume)
    except (ConfigError, DataError, RewardError, RankError, CheckpointError, ParityError) as e:
        joined = not isinstance(e, RendezvousError)  # this rank never joined the group: its node's first says it
        report(
            f"rft_ds: error (rank {rank}): {e}",
            rank,
            collective=joined and isinstance(e, (RankError, StaleWeightsError)),
            before_group=not joined,
        )
        return 2 if isinstance(e, (ConfigError, DataError, CheckpointError)) else 1
    except RuntimeError as e:  # torch.distributed raises these when a peer dies or stalls past the timeout
        from rft_ds.distributed import is_collective_failure

        if not is_collective_failure(e):
            raise
        from rft_ds.distributed import lost_ranks, own_first_failure

        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        own = own_first_failure()  # this rank failed first, then lost its peers while waiting for them
        report(
            f"rft_ds: error (rank {rank}): "
            + (own or f"lost contact with {lost_ranks()} during a collective (process-group timeout ")
            + ("" if own else f"train.dist_timeout_s): {first}"),
            rank,
        )
        return 1
    if result.stopped_early:
        return EXIT_STOPPED
    if rank == "0" and result.history:
        last = result.history[-1]
        for key, before in (result.eval_before or {}).items():  # each eval number, before -> after
            if isinstance(before, (int, float)) and isinstance(last.get(key), (int, float)):
                # counts (rollout failures, ...) as counts, fractions and means to 4 places
                a, b = (f"{x}" if isinstance(x, int) else f"{x:.4f}" for x in (before, last[key]))
                name, n = key[5:].replace("_", " "), len(result.history)
                console.say(f"[rft_ds] held-out {name}: {a} before -> {b} after {n} epochs")
        console.say(f"[rft_ds] metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0


def check(config: str, overrides: list[str], world: int | None, device: str = "auto") -> int:
    """Print one line per problem (exit 1) or 'ok' (exit 0)."""
    from rft_ds.check import check as run_checks
    from rft_ds.config import ConfigError, RFTRunConfig

    try:
        cfg = RFTRunConfig.load_yaml(config, overrides)
    except ConfigError as e:
        print(f"rft_ds: problem: {e}", file=sys.stderr)
        return 1
    if world is None:
        from rft_ds.preflight import launch_world_size

        world = launch_world_size()
    problems, notes = run_checks(cfg, world, {"auto": None, "cuda": True, "cpu": False}[device])
    for n in notes:
        print(f"rft_ds: note: {n}")
    for p in problems:
        print(f"rft_ds: problem: {p}", file=sys.stderr)
    if not problems:
        print(f"rft_ds: {config} ok for {world} rank(s)")
    return 1 if problems else 0


RUN_COLUMNS = (
    ("epoch", "epoch"),
    ("step", None),
    ("p", "percentile"),
    ("sampled", "n_sampled"),
    ("kept", None),
    ("reward", "reward_mean"),
    ("loss", "train_loss"),
)


def eval_columns(records: list[dict]) -> list[str]:
    """The eval numbers worth a column: each set's reward mean, pass@1, greedy pass rate and accuracy."""
    keys = {k for r in records for k in r if k.startswith("eval_") and not k.endswith("_initial")}
    wanted = ("reward_mean", "pass@1", "greedy_pass", "accuracy")
    return sorted(
        k for k in keys if k.endswith(wanted) and not k.startswith("eval_reward_") or k in ("eval_reward_mean",)
    )


def runs_table(records: list[dict]) -> str:
    """The epoch table of a run (a row for the eval before training, when there was one). Pure."""
    from rft_ds.metrics import fmt

    evals = eval_columns(records)
    head = [name for name, _ in RUN_COLUMNS] + [k[5:] for k in evals] + ["time_s"]
    rows = []
    if records and any(k.endswith("_initial") for k in records[0]):
        rows.append(
            ["before"] + [""] * (len(RUN_COLUMNS) - 1) + [fmt(records[0].get(k + "_initial")) for k in evals] + [""]
        )
    for r in records:
        row = [
            str(r["epoch"] + 1),
            "grow" if r.get("grow_step") else "improve",
            fmt(r.get("percentile")),
            str(r.get("n_sampled", "")),
            f"{r.get('n_selected', '')}/{r.get('pool_size', '')}",
            fmt(r.get("reward_mean")),
            fmt(r.get("train_loss")),
        ]
        rows.append(row + [fmt(r.get(k)) for k in evals] + [fmt(r.get("time_epoch"), ".1f")])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *rows])


def runs(run_dir: str) -> int:
    from rft_ds.plot import PlotError, read_metrics

    try:
        records = read_metrics(run_dir)
    except PlotError as e:
        print(f"rft_ds: error: {e}", file=sys.stderr)
        return 2
    print(runs_table(records))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rft-ds", description="Rejection fine-tuning under DeepSpeed ZeRO-3.")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run (one process, or one per rank under deepspeed/srun)")
    t.add_argument("config", help="run config YAML")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=6")
    t.add_argument("--resume", default=None, help="'auto' (newest intact checkpoint in train.output_dir) or a path")
    t.add_argument(
        "--resume-force",
        action="store_true",
        help="resume even though fields that matter (seed, method, selection, model, data) changed",
    )
    t.add_argument("--verbose", action="store_true", help="every library's output on the terminal (train.verbose)")
    c = sub.add_parser("check", help="validate a config, its data, rewards, model directory and resume target")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--world-size", type=int, default=None, help="ranks the run will have (default: WORLD_SIZE or 1)")
    c.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="the nodes the run will have (auto: this host's; cuda: check a GPU job from a login node)",
    )
    e = sub.add_parser("export", help="a checkpoint -> a Hugging Face model directory")
    e.add_argument("checkpoint", help="a checkpoint dir, a checkpoints/ dir (uses latest) or a run's output_dir")
    e.add_argument("out")
    p = sub.add_parser("plot", help="PNG panels of a run's metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    r = sub.add_parser("runs", help="the epoch table of a run's metrics.jsonl")
    r.add_argument("run_dir")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "train":
        return train_rank(args.config, args.overrides, args.resume, args.resume_force, args.verbose)
    if args.command == "check":
        return check(args.config, args.overrides, args.world_size, args.device)
    if args.command == "export":
        from rft_ds import export

        return export.main([args.checkpoint, args.out])
    if args.command == "plot":
        from rft_ds import plot

        return plot.main([args.run_dir] + (["--out", args.out] if args.out else []))
    return runs(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
