"""Shared pieces of the benchmark scripts: model shapes, building them once, timing helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Random-init Llamas. Throughput depends on shapes, not on weight values: "smol" has exactly
# SmolLM2-135M's architecture (30 layers, hidden 576, 9 heads of 64, 3 KV heads, 49152 vocab, tied).
SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536, vocab_size=8192),
    "smol": dict(
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        head_dim=64,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
}


def model_dir(shape: str) -> Path:
    from rft_ds.toy import build_tiny_model

    path = ROOT / ".cache" / f"bench-{shape}"
    if not (path / "config.json").exists():
        kw = dict(SHAPES[shape])
        if "head_dim" not in kw:
            kw["head_dim"] = kw["hidden_size"] // kw["num_heads"]
        build_tiny_model(
            path,
            hidden_size=kw.pop("hidden_size"),
            num_layers=kw.pop("num_layers"),
            num_heads=kw.pop("num_heads"),
            **kw,
        )
    return path


def launch(script: str, *args: str, nproc: int = 2) -> None:
    """Run `script` under the deepspeed launcher with nproc CPU ranks (output passes through)."""
    from rft_ds import distributed as D

    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(D.free_port()), script, *args]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def launch_captured(script: str, args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """`script` under the deepspeed launcher with nproc CPU ranks, its output captured: the caller picks out
    the lines rank 0 printed its result on."""
    from rft_ds import distributed as D

    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(D.free_port()), script, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def append_rows(out: str, rows: list[dict]) -> None:
    """Rank 0 appends its results, one JSON line each, for RESULTS.md."""
    import json

    from rft_ds import distributed as D

    if D.is_main():
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def ds_config(world: int, micro: int = 4) -> dict:
    from rft_ds.config import TrainConfig
    from rft_ds.learner import fill_ds_config, load_ds_config

    return fill_ds_config(
        load_ds_config(ROOT / "ds_configs" / "zero3_cpu.json"),
        TrainConfig(micro_batch_size=micro, learning_rate=1e-4),
        world,
    )
