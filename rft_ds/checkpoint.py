"""Atomic, verifiable checkpoints: DeepSpeed ZeRO-3 state plus everything RFT needs to continue exactly.

Layout of `<output_dir>/checkpoints/`:
    epoch_00004/            one complete checkpoint (after epoch 4)
        ds/...              DeepSpeed save_checkpoint: ZeRO-3 shards, optimizer, LR scheduler
        rft_state.pt        epoch, pools (token ids, scores), metrics history, best eval, prompts digest
        rng_rank{r}.pt      python / numpy / torch RNG states of each rank
        hf/                 model config, generation config, tokenizer (for export)
        meta.json           small facts readable before any model loads (world size, epoch, ...)
        manifest.json       every file with its size and blake2b checksum; written last
    latest                  name of the newest complete checkpoint; replaced atomically, after it
    .tmp-epoch_00005/       a write in progress (or torn by a crash): never loaded, removed on the next save

A checkpoint is written into a temporary directory, every file fsynced, the manifest written, then the
directory renamed into place and `latest` replaced. A crash at any moment leaves the previous checkpoint
complete and `latest` pointing at it; a damaged one fails its manifest and is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rft_ds.config import ConfigError

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:05d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """fsync every file and directory under ckpt, then write the manifest (itself fsynced)."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            _fsync(p)
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "blake2b": _checksum(p)}
    for d in sorted({p.parent for p in ckpt.rglob("*")} | {ckpt}):
        _fsync(d)
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    _fsync(tmp)
    tmp.rename(ckpt / MANIFEST)
    _fsync(ckpt)


def verify(ckpt: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, info in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info["size"]:
            return f"{rel} is {p.stat().st_size} bytes, manifest says {info['size']}"
        if checksums and _checksum(p) != info["blake2b"]:
            return f"{rel} fails its checksum"
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    tmp.rename(path)
    _fsync(path.parent)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories (not temporary ones), newest epoch first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_")), reverse=True)


def find_resume(root: Path) -> Path | None:
    """`--resume auto`: the checkpoint `latest` names if intact, else the newest intact one, else None."""
    candidates = complete_checkpoints(root)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for c in candidates:
        problem = verify(c)
        if problem is None:
            return c
        warnings.warn(f"rft_ds: skipping checkpoint {c}: {problem}", stacklevel=2)
    return None


def resolve_resume(resume: str | None, output_dir: str | Path, world_size: int) -> Path | None:
    """Turn --resume into a verified checkpoint directory, before any model loads. Raises CheckpointError."""
    if not resume:
        return None
    if resume == "auto":
        ckpt = find_resume(Path(output_dir) / "checkpoints")
        if ckpt is None:
            return None
    else:
        ckpt = Path(resume)
        if ckpt.is_dir() and (ckpt / "latest").is_file() and not (ckpt / MANIFEST).exists():
            ckpt = ckpt / (ckpt / "latest").read_text().strip()  # a checkpoints/ root was given
        if not ckpt.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        problem = verify(ckpt)
        if problem is not None:
            raise CheckpointError(f"--resume {resume}: not a complete rft_ds checkpoint: {problem}")
    meta = read_meta(ckpt)
    if meta["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {ckpt} was written by {meta['world_size']} ranks; this run has "
                              f"{world_size}. Resuming with another world size is not supported: launch with "
                              f"{meta['world_size']} ranks")
    return ckpt


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def prompts_digest(texts: list[str], metadata: list[dict]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([texts, metadata], sort_keys=True, default=str).encode())
    return h.hexdigest()


@contextlib.contextmanager
def replacing_dir(out: str | Path) -> Iterator[Path]:
    """Write a directory into the yielded `<out>.tmp`, then put it at `out`. The old `out` is moved aside
    and removed only after the rename, so at every moment `out` is a whole directory (old or new) or,
    briefly, absent with the old one intact beside it as `<out>.old`. A failed write leaves `out` as it was."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --- save / load (collective: every rank calls them) ----------------------------------------------

class _WriteFailed(OSError):
    pass


def _free_space_note(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free on {root}"
    except OSError:
        return f"free space on {root} unknown"


def _writing(root: Path):
    """Re-raise a write error with the free space on its disk: torch's writer reports a full disk as
    'unexpected pos 64 vs 0', which names neither the disk nor the cause."""
    @contextlib.contextmanager
    def guard():
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise _WriteFailed(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                               f"({_free_space_note(root)})") from e
    return guard()

def save(root: Path, epoch: int, engine: Any, state: dict, tokenizer: Any, keep_last: int,
         die_hook: Any = None) -> Path:
    """Write checkpoint epoch_<epoch> atomically. `state` is the RFT state (rank 0's copy is saved)."""
    import torch

    from rft_ds import distributed as D

    name = checkpoint_name(epoch)
    tmp = root / f".tmp-{name}"
    with D.all_ranks_or_fail("checkpoint write (the previous checkpoint is intact)"):
        if D.is_main():
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # torn writes of earlier crashes
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
    with D.all_ranks_or_fail("checkpoint write (the previous checkpoint is intact)"), _writing(root):
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{D.rank()}.pt")
        if die_hook:
            die_hook("checkpoint", epoch)  # fault injection (tests): die with the shards half written
    with D.all_ranks_or_fail("checkpoint write (the previous checkpoint is intact)"), _writing(root):
        if D.is_main():
            torch.save(state, tmp / "rft_state.pt")
            engine.module.config.save_pretrained(tmp / "hf")
            gen = getattr(engine.module, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp / "hf")
            tokenizer.save_pretrained(tmp / "hf")
            (tmp / "meta.json").write_text(json.dumps({"epoch": epoch, "world_size": D.world_size(), "format": 1}))
            write_manifest(tmp)
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(root)
            _atomic_write_text(root / "latest", name)
            for old in complete_checkpoints(root)[keep_last:]:
                shutil.rmtree(old, ignore_errors=True)  # only after the new one is complete
    D.barrier()
    return root / name


def load(ckpt: Path, engine: Any) -> dict:
    """Restore the engine (weights, optimizer, scheduler), this rank's RNG, and return the RFT state."""
    import torch

    from rft_ds import distributed as D

    path, _ = engine.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt / 'ds'}")
    set_rng_state(torch.load(ckpt / f"rng_rank{D.rank()}.pt", weights_only=False))
    return torch.load(ckpt / "rft_state.pt", weights_only=False)


def rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def check_compatible(state: dict, digest: str) -> None:
    if state.get("prompts_digest") != digest:
        raise ConfigError("the prompts differ from the ones this checkpoint was trained on: its pools are keyed by "
                          "prompt position, so it cannot be resumed with other data")
