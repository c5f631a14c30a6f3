"""Start-up on a large prompt set: launch to the first sampled chunks, and peak memory per rank.

Two ranks (ZeRO-3 over gloo, one vLLM engine each), the tiny model, `data.prompts_per_grow_step: 256`, 4
samples per prompt in chunks of 64: each run is stopped by SIGUSR1 before the 2nd sampling chunk (so it samples
two chunks, checkpoints and exits). Timed from the launch to that exit; memory is each rank's process tree's
RSS, polled every 0.2 s. The same synthetic prompts (~200 bytes each with metadata: the toy task's
"<letters> say k:" and its target, plus fields a real set carries) as JSONL and as parquet, at 1M and 1k
prompts, run by this checkout and, with --old <checkout>, by another one (the code before the prompt store:
it has no prompt budget, so it runs without one; the stop comes at the same point, after its first chunks).

    python benchmarks/bench_prompts.py [--n 1000000] [--old /tmp/old-checkout] [--formats jsonl,parquet]

Each run gets an empty HF datasets cache, so a parquet run pays its own conversion, as a fresh job would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
import psutil
from common import ROOT


def write_prompts(path: Path, n: int, fmt: str) -> Path:
    """n toy-task prompts with metadata, ~200 bytes each, as .jsonl or .parquet (made once, then reused)."""
    out = path / f"prompts-{n}.{fmt}"
    if out.exists():
        return out
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for i in range(n):
        target = rng.choice(letters)
        ctx = "".join(rng.choice(letters) for _ in range(rng.randint(4, 12)))
        rows.append(
            {
                "prompt": f"{ctx} say {target}:",
                "target": target,
                "source": f"synthetic/{['train', 'extra', 'hard'][i % 3]}/shard-{i % 97:03d}",
                "uid": f"{i:08d}-{rng.getrandbits(64):016x}",
                "difficulty": round(rng.random(), 4),
                "notes": "".join(rng.choice(letters) for _ in range(60)),
            }
        )
    tmp = out.with_suffix(".tmp")
    if fmt == "jsonl":
        with tmp.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(out)
    return out


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(checkout: Path, prompts: Path, out: Path, budget: bool, model: Path) -> dict:
    """Two ranks of launch/train.py in `checkout`, stopped before their 2nd sampling chunk."""
    from rft_ds.distributed import free_port

    args = [
        "launch/train.py",
        "--config",
        "launch/configs/tiny.yaml",
        f"model.model_path={model}",
        f"train.output_dir={out}",
        f"data.prompts={prompts}",
        "data.eval_prompts=null",
        "train.eval_interval=0",
        "train.plots=false",
        "train.epochs=1",
        "method.n_generations_per_prompt=4",
        "sampler.chunk_prompts=64",
        *(["data.prompts_per_grow_step=256"] if budget else []),
    ]
    port = str(free_port())
    cache = tempfile.mkdtemp(prefix="hf-cache-")
    procs, logs = [], []
    t0 = time.monotonic()
    for r in range(2):
        log = open(out.parent / f"{out.name}.rank{r}.txt", "w")  # noqa: SIM115
        logs.append(log)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": cache,
            "PYTHONPATH": str(checkout),
            "RFT_DS_STOP_AT": "sample:0:2",
        }
        procs.append(subprocess.Popen([sys.executable, *args], cwd=checkout, stdout=log, stderr=log, env=env))
    handles = [psutil.Process(p.pid) for p in procs]
    peak = [0, 0]
    while any(p.poll() is None for p in procs):
        for r, h in enumerate(handles):
            if procs[r].poll() is None:
                peak[r] = max(peak[r], tree_rss(h))
        if time.monotonic() - t0 > 1800:
            for p in procs:
                p.kill()
            break
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    for log in logs:
        log.close()
    codes = [p.returncode for p in procs]
    stopped = (out / "checkpoints" / "latest").exists()
    return {"seconds": seconds, "peak_rss_gb": [x / 2**30 for x in peak], "exit": codes, "stopped": stopped}


def store_pass(prompts: Path) -> dict:
    """One process, no launch: opening the set (a JSONL file's index, a parquet file's Arrow table) and the
    digest's streaming pass over it, which rank 0 runs at start-up while the others wait."""
    from rft_ds.prompt_store import PromptStore, open_rows

    t0 = time.perf_counter()
    store = PromptStore(open_rows(str(prompts), "prompts"), "prompts", "prompt", None)
    t1 = time.perf_counter()
    store.digest()
    return {"open_s": t1 - t0, "digest_s": time.perf_counter() - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--old", type=Path, default=None, help="another checkout to run the same prompts")
    ap.add_argument("--formats", default="jsonl,parquet")
    ap.add_argument("--data", type=Path, default=ROOT / ".cache" / "bench-prompts")
    ap.add_argument("--store-only", action="store_true", help="only the one-process open and digest pass")
    a = ap.parse_args()
    from rft_ds.toy import build_tiny_model

    model = ROOT / ".cache" / "tiny-model"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    a.data.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    results = []
    for fmt in a.formats.split(","):
        small, big = write_prompts(a.data, a.small, fmt), write_prompts(a.data, a.n, fmt)
        size_mb = big.stat().st_size / 2**20
        with tempfile.TemporaryDirectory() as cache:
            os.environ["HF_DATASETS_CACHE"] = cache
            passes = store_pass(big)
        print(json.dumps({"format": fmt, "prompts": a.n, **passes}), flush=True)
        results.append({"code": "store", "format": fmt, "prompts": a.n, **passes})
        plan = [] if a.store_only else [("this", ROOT, small, True), ("this", ROOT, big, True)]
        if a.old is not None and not a.store_only:
            plan.append(("old", a.old, big, False))
        for who, checkout, prompts, budget in plan:
            n = a.small if prompts == small else a.n
            res = run(checkout, prompts, work / f"{who}-{fmt}-{n}", budget, model)
            results.append({"code": who, "format": fmt, "prompts": n, "file_mb": round(size_mb, 1), **res})
            print(json.dumps(results[-1]), flush=True)
    print()
    print("| code | format | prompts | launch -> 2 chunks sampled, checkpointed, exited | peak RSS per rank (GiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        if r["code"] == "store":
            continue
        ok = "" if r["stopped"] and all(c == 3 for c in r["exit"]) else f" (exit {r['exit']}, did not stop as asked)"
        rss = " / ".join(f"{x:.2f}" for x in r["peak_rss_gb"])
        print(f"| {r['code']} | {r['format']} | {r['prompts']:,} | {r['seconds']:.1f} s{ok} | {rss} |")
    by = {(r["code"], r["format"], r["prompts"]): r for r in results}
    for fmt in a.formats.split(","):
        passes = by[("store", fmt, a.n)]
        print(f"{fmt}: {a.n:,} prompts opened in {passes['open_s']:.1f} s, digest pass {passes['digest_s']:.1f} s")
        small, big = by.get(("this", fmt, a.small)), by.get(("this", fmt, a.n))
        if small and big:
            extra = max(big["peak_rss_gb"]) - max(small["peak_rss_gb"])
            print(
                f"{fmt}: {a.n:,} vs {a.small:,} prompts: +{big['seconds'] - small['seconds']:.1f} s, +{extra:.2f} GiB peak"
            )
        old = by.get(("old", fmt, a.n))
        if old and big:
            print(
                f"{fmt}: {a.n:,} prompts, old / this: time {old['seconds'] / big['seconds']:.1f}x, "
                f"peak RSS {max(old['peak_rss_gb']) / max(big['peak_rss_gb']):.1f}x"
            )


if __name__ == "__main__":
    main()
