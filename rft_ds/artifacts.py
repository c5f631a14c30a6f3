"""What a run leaves besides checkpoints: best_model/ (the best eval so far, marked with its run), the final
model (and, under LoRA, the adapter), and the plots. Collective where it writes weights (ZeRO-3 gathers);
rank 0 writes the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rft_ds import console
from rft_ds import distributed as D

BEST_MARK = "rft_ds_run.json"  # beside best_model/'s weights: {"epoch", "metric", "value", "run_id"}


def save_best(learner: Any, out: Path, tokenizer: Any, best: dict) -> None:
    """Collective: best_model/ replaced by the learner's weights, marked with `best`."""
    learner.save_hf(out / "best_model", tokenizer, D.is_main(), extra={BEST_MARK: best})


def save_final(learner: Any, out: Path, tokenizer: Any) -> None:
    """Collective: final_model/ (merged under LoRA), and final_adapter/ under LoRA."""
    from rft_ds.lora import save_adapter

    learner.save_hf(out / "final_model", tokenizer, D.is_main())
    if learner.lora is not None:
        save_adapter(learner.module, out / "final_adapter", D.is_main())


def best_model_run(out: Path) -> str | None:
    """The run id best_model/ says its weights are from (None: no best_model, or one without the mark)."""
    try:
        return json.loads((out / "best_model" / BEST_MARK).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def warn_foreign_best_model(out: Path, run_id: str) -> None:
    """best_model/ of another (abandoned) run is not this run's best: say so; the first eval replaces it."""
    if D.is_main() and (out / "best_model").is_dir():
        console.say(
            f"[rft_ds] note: {out / 'best_model'} holds run {best_model_run(out) or 'unknown'}'s weights, not "
            f"this run's ({run_id}); this run's first eval replaces it"
        )


def resumed_best(
    saved: dict | None, out: Path, run_id: str, metric_key: str | None, metric_name: str | None
) -> dict | None:
    """Collective: the run state's best on resume, decided on rank 0 and broadcast. It decides whether the next
    eval writes best_model/ (a save every rank joins), so no rank reads the mark for itself: a file system
    with per-node caches could show two ranks two answers, and a rank that saved alone would hang."""
    decided = _resumed_best(saved, out, run_id, metric_key, metric_name) if D.is_main() else None
    return D.broadcast_object(decided)


def _resumed_best(
    saved: dict | None, out: Path, run_id: str, metric_key: str | None, metric_name: str | None
) -> dict | None:
    """Kept when best_model/ is still this run's and was picked by today's train.best_metric (metric_key,
    None: no best_model/), else None (the next eval rewrites it), said once."""
    if saved is not None and best_model_run(out) != run_id:  # best_model/ was overwritten by another run
        if D.is_main():
            console.say(f"[rft_ds] note: {out / 'best_model'} is not this run's ({run_id}); the next eval rewrites it")
        return None
    if saved is not None and "metric" not in saved:  # written before train.best_metric existed
        saved = {
            "epoch": saved["epoch"],
            "metric": "eval_reward_mean",
            "value": saved["eval_reward_mean"],
            "run_id": saved["run_id"],
        }
    if saved is not None and saved["metric"] != metric_key:
        if D.is_main() and metric_key is not None:
            console.say(
                f"[rft_ds] note: best_model/ was picked by {saved['metric']}, now train.best_metric is "
                f"{metric_name}; the next eval rewrites it"
            )
        return None
    return saved


def write_plots(out: Path, history: list[dict]) -> None:
    """The run is done and saved: a plotting problem is reported, never fatal."""
    from rft_ds.plot import plot_run

    try:
        paths = plot_run(out, records=history)
        console.say(f"[rft_ds] plots: {paths[0].parent}/{{{','.join(p.stem for p in paths)}}}.png")
    except Exception as e:  # noqa: BLE001 - e.g. matplotlib missing; metrics.jsonl has it all
        console.say(f"[rft_ds] plots skipped ({type(e).__name__}: {e}); python -m rft_ds.plot {out} draws them later")
