"""metrics.jsonl (one JSON line per epoch, rank 0) and the one-line console summary."""

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

    def __init__(self, output_dir: str | Path, enabled: bool, history: list[dict] | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.history: list[dict] = list(history or [])
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


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_epoch(r: dict, epochs: int) -> str:
    parts = [f"epoch {r['epoch'] + 1}/{epochs}", "grow" if r["grow_step"] else "improve",
             f"p={r['percentile']:.3f}", f"sampled {r['n_sampled']}", f"kept {r['n_selected']}/{r['pool_size']}",
             f"reward {_fmt(r['reward_mean'])}", f"loss {_fmt(r['train_loss'])}"]
    if r.get("eval_reward_mean") is not None:
        parts.append(f"eval {r['eval_reward_mean']:.3f}")
    parts.append(f"{r['time_epoch']:.1f}s" + (f" (checkpoint {r['time_checkpoint']:.1f}s)" if "time_checkpoint" in r else ""))
    return " | ".join(parts)
