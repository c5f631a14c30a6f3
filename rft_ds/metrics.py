"""Where per-epoch metrics go: metrics.jsonl (always), TensorBoard (when installed), wandb (opt-in), and the
one-line console summary. Only rank 0 writes. metrics.jsonl is the record the plots are drawn from."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def plain(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


class MetricsLog:
    """Appends to <output_dir>/metrics.jsonl; a fresh run starts a fresh file, a resumed one the checkpoint's
    history. Only rank 0 writes."""

    def __init__(
        self, output_dir: str | Path, enabled: bool, history: list[dict] | None = None, sinks: list | None = None
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.history: list[dict] = list(history or [])
        self.sinks = sinks or []
        if enabled:  # a resumed run rewrites the file from the checkpoint: epochs after it are redone
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            tmp.rename(self.path)

    def log(self, record: dict) -> None:
        record = plain(record)
        self.history.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.log(record, record["epoch"] + 1)

    def log_initial_eval(self, result: dict) -> None:
        """The eval before training, as step 0 of the dashboards (metrics.jsonl keeps it in epoch 0's record)."""
        for sink in self.sinks if self.enabled else []:
            sink.log(plain(result), 0)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def scalars(record: dict) -> dict[str, float]:
    """The plottable numbers of a record, grouped for dashboards: eval/..., time/..., train/..."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "epoch" or k.endswith("_initial"):
            continue  # *_initial: the eval before training, logged as step 0 by log_initial_eval
        group, name = (
            ("eval", k[5:]) if k.startswith("eval_") else ("time", k[5:]) if k.startswith("time_") else ("train", k)
        )
        out[f"{group}/{name}"] = float(v)
    return out


class TensorBoardSink:
    """Scalars per epoch (step = epochs done; the eval before training is step 0). purge_step drops what a
    crashed run logged past the checkpoint it resumes from, as metrics.jsonl does."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, record: dict, step: int) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Opt-in (train.wandb). The run id is kept in <output_dir>/wandb_run_id so a resumed run continues it."""

    def __init__(self, output_dir: Path, project: str, name: str | None, config: dict) -> None:
        import wandb

        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config, dir=str(output_dir))

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(
    output_dir: Path,
    tensorboard: bool,
    wandb: bool,
    wandb_project: str,
    wandb_run_name: str | None,
    config: dict,
    start_epoch: int,
) -> list:
    sinks: list = []
    if tensorboard:
        sinks.append(TensorBoardSink(output_dir / "tensorboard", purge_step=start_epoch + 1 if start_epoch else None))
    if wandb:
        sinks.append(WandbSink(output_dir, wandb_project, wandb_run_name, config))
    return sinks


def fmt(v: Any, spec: str = ".3f") -> str:
    """A number for a console table: "-" when there is none."""
    return "-" if v is None else format(v, spec)


def format_epoch(r: dict, epochs: int, eval_key: str = "eval_reward_mean") -> str:
    """One console line per epoch; eval_key: the eval number shown (train.best_metric's, when there is one)."""
    parts = [
        f"epoch {r['epoch'] + 1}/{epochs}",
        "grow" if r["grow_step"] else "improve",
        f"p={r['percentile']:.3f}",
        f"sampled {r['n_sampled']}",
        f"kept {r['n_selected']}/{r['pool_size']}",
        f"reward {fmt(r['reward_mean'])}",
        f"loss {fmt(r['train_loss'])}",
    ]
    if r.get(eval_key) is not None:
        parts.append(f"{'eval' if eval_key == 'eval_reward_mean' else eval_key[5:]} {r[eval_key]:.3f}")
    parts.append(
        f"{r['time_epoch']:.1f}s" + (f" (checkpoint {r['time_checkpoint']:.1f}s)" if "time_checkpoint" in r else "")
    )
    return " | ".join(parts)


def memory_gb() -> dict[str, float]:
    """Collective (one all_reduce of 3 numbers): the largest of any rank's RSS now, its peak RSS so far
    (start-up included), and with CUDA its peak allocated GPU memory so far, in GiB."""
    import resource

    import psutil
    import torch

    from rft_ds import distributed as D

    gib = 2**30
    now = psutil.Process().memory_info().rss
    # Linux reports KiB, and updates the high-water mark lazily: it can lag the RSS read just before
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, now)
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    now, peak, gpu = D.all_reduce(torch.tensor([now, peak, gpu], dtype=torch.float64), "max").tolist()
    return {"rss_gb": now / gib, "peak_rss_gb": peak / gib, **({"gpu_peak_gb": gpu / gib} if gpu else {})}
