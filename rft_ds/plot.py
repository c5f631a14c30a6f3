"""PNG plots of a run's metrics.jsonl, per epoch: written at the end of every run, or by hand, also while a
run is going or after it died:

    python -m rft_ds.plot RUN_DIR     # -> RUN_DIR/plots/{summary,reward,threshold,kept,eval,loss,time}.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

PANELS = ("reward", "threshold", "kept", "eval", "loss", "time")
TIMES = ("sample", "score", "select", "train", "sync", "checkpoint", "eval")  # the time_<stage> metrics


class PlotError(ValueError):
    pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} an rft_ds output_dir?")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PlotError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    if not records:
        raise PlotError(f"{path} has no epochs yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs done, values) where the record has a number for key: x = epoch + 1, so 0 is before training."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["epoch"] + 1)
            ys.append(float(v))
    return xs, ys


def _line(ax: Any, records: list[dict], key: str, label: str, **kw: Any) -> None:
    xs, ys = series(records, key)
    if xs:
        ax.plot(xs, ys, label=label, **{"marker": "o", "markersize": 3, **kw})


def _reward(ax: Any, records: list[dict]) -> None:
    _line(ax, records, "sampled_reward_mean", "sampled mean")
    _line(ax, records, "sampled_reward_max", "sampled max", linestyle="--", marker="^")
    _line(ax, records, "selected_reward_mean", "kept mean")
    _line(ax, records, "reward_mean", "pool mean", alpha=0.6)
    terms = sorted(
        {k for r in records for k in r if k.startswith("sampled_reward_") and k.endswith("_mean")}
        - {"sampled_reward_mean"}
    )
    for k in terms:  # each reward term's own mean (runs with several terms), unweighted
        _line(ax, records, k, f"term {k[len('sampled_reward_') : -len('_mean')]}", linestyle=":", alpha=0.8)
    ax.set_title("reward of completions")


def _threshold(ax: Any, records: list[dict]) -> None:
    _line(ax, records, "threshold_mean", "threshold (mean over prompts)")
    ax.set_title("selection threshold and percentile")
    twin = ax.twinx()
    _line(twin, records, "percentile", "percentile", color="tab:gray", linestyle=":")
    twin.set_ylabel("percentile")
    twin.set_ylim(0, 1.05)
    twin.legend(loc="lower right", fontsize=7)


def _kept(ax: Any, records: list[dict]) -> None:
    _line(ax, records, "n_selected", "kept completions")
    _line(ax, records, "pool_size", "pool size", alpha=0.6)
    _line(ax, records, "n_prompts_kept", "prompts with a kept completion")
    ax.set_title("kept for training")


def _eval(ax: Any, records: list[dict]) -> None:
    # the eval before training is kept in epoch 0's record as <key>_initial; drawn at x = 0
    before = {
        k[: -len("_initial")]: v for k, v in records[0].items() if k.startswith("eval_") and k.endswith("_initial")
    }
    keys = sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if k.startswith("eval_")
            and not k.endswith("_initial")
            and not k.endswith("_truncated")  # a count of cut inputs, not a score: metrics.jsonl has it
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
        - {"eval_reward_mean"}
    )
    recs = ([{"epoch": -1, **before}] if before else []) + records
    _line(ax, recs, "eval_reward_mean", "eval reward (held out)")
    for i, k in enumerate(keys):  # past matplotlib's 10 colours, another line style: no two lines alike
        _line(ax, recs, k, k[5:], linestyle=("--", ":", "-.")[i // 10 % 3])
    ax.set_title("held-out eval (epoch 0 = before training)")


def _loss(ax: Any, records: list[dict]) -> None:
    _line(ax, records, "train_loss", "train loss (kept completions)")
    ax.set_title("cross-entropy loss")


def _time(ax: Any, records: list[dict]) -> None:
    """Where each epoch's seconds went, stacked."""
    xs = [r["epoch"] + 1 for r in records]
    bottom = [0.0] * len(records)
    for stage in TIMES:
        ys = [float(r.get(f"time_{stage}") or 0.0) for r in records]
        if any(ys):
            ax.bar(xs, ys, bottom=bottom, label=stage)
            bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_ylabel("seconds")
    ax.set_title("time per epoch, by stage")


DRAW: dict[str, Callable[[Any, list[dict]], None]] = {
    "reward": _reward,
    "threshold": _threshold,
    "kept": _kept,
    "eval": _eval,
    "loss": _loss,
    "time": _time,
}


def _finish(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs done")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, records: list[dict] | None = None) -> list[Path]:
    """Write one PNG per panel and summary.png with all of them; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on a cluster node
    import matplotlib.pyplot as plt

    records = records if records is not None else read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, name in zip(axes.flat, PANELS):
        DRAW[name](ax, records)
        _finish(ax)
    fig.suptitle(f"rft_ds run {Path(run_dir).resolve().name}: {len(records)} epochs")
    fig.tight_layout()
    written.append(_save(fig, out / "summary.png"))
    for name in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        DRAW[name](ax, records)
        _finish(ax)
        fig.tight_layout()
        written.append(_save(fig, out / f"{name}.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")  # a viewer never sees a half-written file
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rft_ds.plot", description="Plot an rft_ds run's metrics.jsonl.")
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = ap.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotError as e:
        print(f"rft_ds.plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
