"""best_model/ and final_model/ as plain Hugging Face directories, written by every rank in parallel.

Rank 0 alone used to gather the whole model into its host memory and write it (140 GB for a 70B model) while
the other ranks waited in a collective, past its timeout for a large model. Now the weights are dealt to
writers (`deal`: contiguous runs of tensors, balanced by bytes, spread over the ranks, one writer per
`MIN_SHARE_BYTES` at most so a small model stays one file); each writer keeps only its share of the ZeRO-3
gathers and writes it as one safetensors shard with the model's own save_pretrained (tied weights and weight
renames handled as transformers does) into a staging directory on the shared file system, then leaves a
marker. Rank 0 waits for the markers on the file system, not in a collective, names the shards
model-0000k-of-0000n.safetensors, writes the index, the config, the tokenizer and the extra files, and puts
the directory in place atomically (files.replacing_dir). The other ranks go on at once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

MIN_SHARE_BYTES = 2 * 2**30  # a writer per 2 GiB of weights at most: a 135M model is one file, 70B up to 70 writers
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def deal(sizes: Sequence[int], world: int, min_share_bytes: int = MIN_SHARE_BYTES) -> list[int]:
    """The writing rank of each tensor (in order): n = min(world, ceil(total / min_share_bytes)) writers, each
    a contiguous run of about total / n bytes, the k-th of them rank k * world // n (spread over the nodes,
    whose ranks are consecutive). Pure: every rank computes the same deal."""
    total = sum(sizes)
    n = max(1, min(world, -(-total // max(1, min_share_bytes))))
    writers, done = [], 0
    for size in sizes:
        k = min(n - 1, int((done + size / 2) * n / total)) if total else 0
        writers.append(k * world // n)
        done += size
    return writers


def staging(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.shards")


def write_share(model: Any, state: dict, stage: Path, rank: int) -> None:
    """This writer's share (a state dict of full CPU tensors) as stage/rank<r>/model.safetensors, then the
    marker stage/rank<r>.done; an error leaves stage/rank<r>.failed with its message for rank 0, and is
    raised."""
    mine = stage / f"rank{rank}"
    try:
        if state:
            # transformers writes only on rank 0 once torch.distributed is up; here every writer writes its share
            model.should_save_on_this_rank = lambda is_main_process: True
            try:
                model.save_pretrained(mine, state_dict=state, safe_serialization=True, max_shard_size="1000GB")
            finally:
                del model.should_save_on_this_rank
            if not (mine / WEIGHTS).is_file():  # a transformers that decides otherwise: say so, lose nothing
                raise RuntimeError(f"save_pretrained wrote no {WEIGHTS} on rank {rank}")
        (stage / f"rank{rank}.done").write_text("")
    except Exception as e:
        (stage / f"rank{rank}.failed").write_text(f"{type(e).__name__}: {str(e).strip()[:300]}")
        raise


def assemble(
    stage: Path, out_dir: Path, world: int, tokenizer: Any, extra: dict | None, timeout_s: float = 6 * 3600
) -> None:
    """Rank 0: once every rank's marker is there, the HF directory at out_dir, atomically: the shards renamed
    (one shard: model.safetensors, as save_pretrained writes it), their index, rank 0's config files, the
    tokenizer and `extra` {file name: JSON-able}. The staging directory is removed."""
    from safetensors import safe_open

    from rft_ds.errors import CheckpointError
    from rft_ds.files import replacing_dir

    t0 = time.monotonic()
    while True:
        failed = sorted(stage.glob("rank*.failed"))
        if failed:
            why = failed[0].read_text()
            raise CheckpointError(f"{out_dir.name}/: {failed[0].stem} could not write its weights: {why}")
        if all((stage / f"rank{r}.done").exists() for r in range(world)):
            break
        if time.monotonic() - t0 > timeout_s:
            missing = [r for r in range(world) if not (stage / f"rank{r}.done").exists()]
            raise CheckpointError(
                f"{out_dir.name}/: ranks {missing} did not write their weights within {timeout_s:.0f} s"
            )
        time.sleep(0.5)
    shards = [stage / f"rank{r}" / WEIGHTS for r in range(world) if (stage / f"rank{r}" / WEIGHTS).exists()]
    with replacing_dir(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for f in (stage / "rank0").iterdir():  # config.json, generation_config.json, remote code (not its shard)
            if f.name != WEIGHTS:
                f.replace(tmp / f.name)
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            name = WEIGHTS if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            shard.replace(tmp / name)
            with safe_open(tmp / name, "pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    total += _nbytes(sl.get_shape(), sl.get_dtype())
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        for name, value in (extra or {}).items():
            (tmp / name).write_text(json.dumps(value))
    shutil.rmtree(stage, ignore_errors=True)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _DTYPE_BYTES.get(dtype, 1)
