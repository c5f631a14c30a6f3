"""Atomic, verifiable checkpoints: DeepSpeed ZeRO-3 state plus everything RFT needs to continue exactly.

Layout of `<output_dir>/checkpoints/`:
    epoch_00004/            one complete checkpoint (after epoch 4)
    epoch_00005.train.c000012/ one taken inside epoch 5: in its train stage, after 12 micro-batches
        ds/...              DeepSpeed save_checkpoint: per rank r its ZeRO-3 partitions
                            (zero_pp_rank_{r}_mp_rank_00_model_states.pt,
                            [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt: fp32 master weights, optimizer state)
        zero_to_fp32.py ... DeepSpeed's recovery scripts (rank 0)
        rft_state.pt        the shared run state (rft_ds.run_state.RunState): position, metrics history, best
        rank{r}.pt          rank r's RNG states (python, numpy, torch, cuda) and its own run state: its pool
                            shard (the token ids and table rows of the completions it owns), its sampling
                            and training progress
        hf/                 model config, generation config, tokenizer (for export)
        meta.json           small facts readable before any model loads (world size, position, run id, config,
                            shard plan)
        manifest.json       every file with its size, checksum and owning rank; written last
    latest                  name of the newest complete checkpoint; replaced atomically, after it
    .tmp-epoch_00005/       a write in progress (or torn by a crash): never loaded, removed on the next save

Writing (`save`, every rank): the files go into the temporary directory; then each rank fsyncs and checksums
only the files it owns (rank r: its ZeRO-3 shard files and rank{r}.pt) and reports {path: size, checksum}
in one all-gather, so the time is set by one rank's share, not by the whole checkpoint. Rank 0 seals the
shared files (rft_state.pt, hf/, meta.json, and anything no rank claimed: every file is covered exactly
once), writes the manifest, renames the directory into place and replaces `latest` last. A crash at any
moment leaves the previous checkpoint complete and `latest` on it.

Resuming: `resolve_resume` runs before the process group exists and is cheap (manifest, sizes, world size).
`agree_on_resume` runs after: rank 0 picks the candidates, every rank checksums the files it owns in the
chosen one, and the verdicts are all-gathered, so every rank resumes from the same checkpoint; with
`--resume auto` a damaged one is skipped, with a warning, for the previous complete one.

Checksums: xxh3_128 (the `xxhash` package, a dependency of `datasets`): ~30x blake2b on this project's CPU box
(benchmarks/RESULTS.md). Manifests say which algorithm they use; old ones (`blake2b` per file, no owners)
still verify.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from rft_ds.errors import CheckpointError, ConfigError
from rft_ds.files import replacing_dir  # noqa: F401 (export.py and older code import it from here)
from rft_ds.run_state import STAGES, elastic, stage_of

MANIFEST = "manifest.json"
# The run state's layout (meta.json "format"): 1 epoch-boundary checkpoints before RunState, 2 the pools in
# rank 0's shared state, 3 a pool shard per rank, 4 stages named in positions (score a stage of its own).
STATE_FORMAT = 4
READS_FORMATS = (3, 4)  # format 3: the same state, its stages numbered (run_state.FORMAT3_STAGES)
MANIFEST_FORMAT = 2  # 1 (implicit): {"files": {path: {"size", "blake2b"}}}


def checkpoint_name(epoch: int, stage: str = "sample", cursor: int = 0) -> str:
    """The directory of a checkpoint taken at run position (epoch, stage, cursor): the next thing the run does.
    At an epoch boundary, (e + 1, "sample", 0), it is `epoch_<e>` ("after epoch e"); inside epoch e, at a stage
    and position c in it (a sampling chunk, a micro-batch), `epoch_<e>.<stage>.c<c>`."""
    if stage == STAGES[0] and cursor == 0:
        return f"epoch_{epoch - 1:05d}"
    return f"epoch_{epoch:05d}.{stage}.c{cursor:06d}"


# state format 3 named a stage by its number (run_state.FORMAT3_STAGES): epoch_00005.s1.c000012
_NAME = re.compile(r"epoch_(\d+)(?:\.(?:s(\d+)|(" + "|".join(STAGES) + r"))\.c(\d+))?")


def position_of(name: str) -> tuple[int, int, int] | None:
    """checkpoint_name's inverse, for ordering: the run position a checkpoint directory resumes at, its stage
    as its index in STAGES (None: not a checkpoint's name)."""
    m = _NAME.fullmatch(name)
    if not m:
        return None
    if m.group(4) is None:
        return int(m.group(1)) + 1, 0, 0
    stage = m.group(3) or stage_of(int(m.group(2)))
    if stage is None:  # a stage number no format had: not a checkpoint's name
        return None
    return int(m.group(1)), STAGES.index(stage), int(m.group(4))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- checksums --------------------------------------------------------------------------------------


def _default_hash() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:  # not expected (datasets requires it), but a manifest must still be writable
        return "blake2b"
    return "xxh3_128"


HASH = _default_hash()  # what new manifests use
HASHES = ("xxh3_128", "blake2b")  # what manifests may use
_BLOCK = 1 << 20  # read size: fits in L2, measured fastest for xxh3 from the page cache


def _hasher(name: str) -> Any:
    if name == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise CheckpointError("the manifest uses xxh3_128 checksums, which need the xxhash package") from None
        return xxhash.xxh3_128()
    if name == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise CheckpointError(f"the manifest uses an unknown checksum {name!r} (known: {', '.join(HASHES)})")


def file_digest(path: Path, hash_name: str = HASH) -> tuple[int, str]:
    """(bytes read, hex digest) of one file."""
    h = _hasher(hash_name)
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            total += n
    return total, h.hexdigest()


# --- which rank owns which file ---------------------------------------------------------------------

_RANK_FILES = (
    re.compile(r"(?:^|/)(?:rng_)?rank(\d+)\.pt$"),
    # DeepSpeed ZeRO-3: zero_pp_rank_{dp}_mp_rank_{mp}_model_states.pt, {bf16_}zero_pp_rank_..._optim_states.pt
    re.compile(r"(?:^|/)(?:[A-Za-z0-9]+_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt$"),
)


def rank_of_file(rel: str, world_size: int) -> int | None:
    """The rank whose own file this is, by name (its ZeRO-3 shards, its RNG state), or None for a shared file
    (rft_state.pt, hf/, meta.json, DeepSpeed's scripts), which rank 0 seals."""
    for pattern in _RANK_FILES:
        m = pattern.search(rel)
        if m and int(m.group(1)) < world_size:
            return int(m.group(1))
    return None


def _all_files(ckpt: Path) -> list[str]:
    """Every file under ckpt (relative, '/'-separated) except the manifest."""
    return sorted(
        p.relative_to(ckpt).as_posix()
        for p in ckpt.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")
    )


def rank_files(ckpt: Path, rank: int, world_size: int) -> list[str]:
    """The files of ckpt that `rank` seals at save time: the ones named as its own."""
    return [rel for rel in _all_files(ckpt) if rank_of_file(rel, world_size) == rank]


def seal(ckpt: Path, rels: Iterable[str], rank: int, hash_name: str = HASH) -> dict[str, dict]:
    """fsync and checksum these files of ckpt: {relpath: {"size", "hash", "rank"}} for the manifest.

    The fsyncs (waiting on the disk) run in a thread while this one checksums (from the page cache), so the
    time is about the larger of the two, not their sum."""
    from concurrent.futures import ThreadPoolExecutor

    rels = list(rels)
    out = {}
    with ThreadPoolExecutor(1, thread_name_prefix="rft_ds-fsync") as pool:
        synced = [pool.submit(_fsync, ckpt / rel) for rel in rels]
        for rel in rels:
            size, digest = file_digest(ckpt / rel, hash_name)
            out[rel] = {"size": size, "hash": digest, "rank": rank}
        for f in synced:
            f.result()  # an fsync error (EIO, ENOSPC on NFS) is the write's failure
    return out


def cover(ckpt: Path, claims: list[tuple[str, dict[str, dict]]], hash_name: str = HASH) -> dict[str, dict]:
    """Every rank's (hash name, sealed files) -> the manifest's files. Checks that no file was claimed twice,
    that every claimed file is there with the size its rank saw, and seals every file nobody claimed as rank 0's:
    every file is covered exactly once."""
    files: dict[str, dict] = {}
    for r, (name, sealed) in enumerate(claims):
        if sealed and name != hash_name:
            raise RuntimeError(f"rank {r} checksummed with {name}, rank 0 with {hash_name}")
        for rel, e in sealed.items():
            if rel in files:
                raise RuntimeError(f"checkpoint file {rel} was claimed by ranks {files[rel]['rank']} and {r}")
            files[rel] = e
    on_disk = _all_files(ckpt)
    gone = sorted(set(files) - set(on_disk))
    if gone:
        raise RuntimeError(f"rank {files[gone[0]]['rank']} sealed {gone[0]}, which rank 0 does not see in {ckpt}")
    for rel, e in files.items():
        size = (ckpt / rel).stat().st_size
        if size != e["size"]:
            raise RuntimeError(f"rank {e['rank']} sealed {rel} at {e['size']} bytes, rank 0 sees {size}")
    files.update(seal(ckpt, [rel for rel in on_disk if rel not in files], 0, hash_name))
    if sorted(files) != on_disk:  # cannot happen: the line above covers the rest
        raise RuntimeError(f"manifest coverage of {ckpt} is incomplete")
    return files


def _write_manifest_file(ckpt: Path, files: dict[str, dict], hash_name: str, world_size: int) -> None:
    body = {
        "format": MANIFEST_FORMAT,
        "hash": hash_name,
        "world_size": world_size,
        "files": {rel: files[rel] for rel in sorted(files)},
    }
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    _fsync(tmp)
    tmp.rename(ckpt / MANIFEST)
    _fsync(ckpt)


def _fsync_dirs(ckpt: Path) -> None:
    for d in sorted({p.parent for p in ckpt.rglob("*")} | {ckpt}, key=lambda d: -len(d.parts)):
        _fsync(d)


def write_manifest(
    ckpt: Path, sealed: dict[str, dict] | None = None, world_size: int = 1, hash_name: str = HASH
) -> None:
    """One process: seal every file under ckpt not already in `sealed` (as rank 0's), fsync every directory,
    then write the manifest (itself fsynced)."""
    files = cover(ckpt, [(hash_name, dict(sealed or {}))], hash_name)
    _fsync_dirs(ckpt)
    _write_manifest_file(ckpt, files, hash_name, world_size)


# --- reading and verifying ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Manifest:
    hash_name: str
    files: dict[str, tuple[int, str, int | None]]  # relpath -> (size, digest, owning rank; None: format 1)
    world_size: int | None

    def owned_by(self, rank: int, world_size: int) -> list[str]:
        """The files `rank` verifies: those it sealed (format 2); in a format-1 manifest (no owners), every
        world_size-th file, so the work is still split."""
        rels = sorted(self.files)
        return [
            rel
            for i, rel in enumerate(rels)
            if (self.files[rel][2] if self.files[rel][2] is not None else i) % world_size == rank
        ]


def read_manifest(ckpt: Path) -> Manifest | str:
    """The parsed manifest, or what is wrong with it."""
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        return "no manifest (incomplete write)"
    try:
        body = json.loads(path.read_text())
        raw = body["files"]
        if "hash" in body:  # format 2
            name = str(body["hash"])
            files = {rel: (int(e["size"]), str(e["hash"]), int(e["rank"])) for rel, e in raw.items()}
            world = int(body["world_size"])
        else:  # format 1: blake2b, no owners
            name, world = "blake2b", None
            files = {rel: (int(e["size"]), str(e["blake2b"]), None) for rel, e in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({e})"
    bad = [rel for rel in files if rel.startswith("/") or ".." in PurePosixPath(rel).parts]
    if bad:
        return f"unreadable manifest (path outside the checkpoint: {bad[0]})"
    return Manifest(name, files, world)


def _size_problem(ckpt: Path, rel: str, size: int) -> str | None:
    p = ckpt / rel
    try:
        actual = p.stat().st_size
    except OSError:
        return f"missing file {rel}"
    if not p.is_file():
        return f"missing file {rel}"
    if actual != size:
        return f"{rel} is {actual} bytes, manifest says {size}"
    return None


def check_complete(ckpt: Path) -> str | None:
    """The cheap check, usable before the process group exists: manifest present and parseable, every file
    present with its size, meta.json readable. No file contents are read. None if it passes."""
    ckpt = Path(ckpt)
    m = read_manifest(ckpt)
    if isinstance(m, str):
        return m
    for rel, (size, _, _) in m.files.items():
        problem = _size_problem(ckpt, rel, size)
        if problem:
            return problem
    if "meta.json" not in m.files:
        return "not an rft_ds checkpoint (no meta.json in its manifest)"
    try:
        written_by(ckpt)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable meta.json ({e})"
    return None


def verify_files(ckpt: Path, rank: int | None = None, world_size: int = 1) -> str | None:
    """Checksum the files `rank` owns in the manifest (every file if rank is None). None if they all match."""
    ckpt = Path(ckpt)
    m = read_manifest(ckpt)
    if isinstance(m, str):
        return m
    rels = sorted(m.files) if rank is None else m.owned_by(rank, world_size)
    for rel in rels:
        size, digest, _ = m.files[rel]
        problem = _size_problem(ckpt, rel, size)
        if problem:
            return problem
        try:
            n, actual = file_digest(ckpt / rel, m.hash_name)
        except CheckpointError as e:
            return str(e)
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
        if n != size or actual != digest:
            return f"{rel} fails its checksum"
    return None


def verify(ckpt: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it (one process, every file)."""
    problem = check_complete(ckpt)
    if problem is not None or not checksums:
        return problem
    return verify_files(ckpt)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    tmp.rename(path)
    _fsync(path.parent)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint directories (never temporary ones), newest run position first; complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if position_of(p.name) is not None and p.is_dir()),
        key=lambda p: position_of(p.name),
        reverse=True,
    )


def _latest_name(root: Path) -> str | None:
    try:
        name = (Path(root) / "latest").read_text().strip()
    except OSError:
        return None
    return name if name and "/" not in name and name not in (".", "..") else None


def _candidates(root: Path) -> list[Path]:
    """`--resume auto`'s order: the checkpoint `latest` names, then the others, newest first."""
    dirs = checkpoint_dirs(root)
    named = _latest_name(root)
    if named is None:
        return dirs
    return [Path(root) / named] + [c for c in dirs if c.name != named]


def find_resume(root: Path, checksums: bool = True) -> Path | None:
    """`--resume auto` in one process: the checkpoint `latest` names if intact, else the newest intact one,
    else None. checksums=False: the cheap check only (what resolve_resume uses)."""
    for c in _candidates(root):
        problem = verify(c, checksums)
        if problem is None:
            return c
        warnings.warn(f"rft_ds: skipping checkpoint {c}: {problem}", stacklevel=2)
    return None


def _explicit(resume: str) -> Path:
    ckpt = Path(resume)
    if ckpt.is_dir() and (ckpt / "latest").is_file() and not (ckpt / MANIFEST).exists():
        ckpt = ckpt / (ckpt / "latest").read_text().strip()  # a checkpoints/ root was given
    if not ckpt.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    return ckpt


def _format_problem(ckpt: Path) -> str | None:
    fmt = read_meta(ckpt).get("format", 1)
    if fmt not in READS_FORMATS:
        return (
            f"checkpoint {ckpt} has run-state format {fmt}, this rft_ds reads format "
            f"{' or '.join(map(str, READS_FORMATS))} (written "
            "by another version): resume it with that version, or start a new run"
        )
    return None


def _world_problem(ckpt: Path, writers: int, world_size: int) -> str | None:
    if writers == world_size or elastic(read_meta(ckpt).get("position", (0, 1, 1))):
        return None
    return (
        f"checkpoint {ckpt} was taken inside a sampling, scoring or training stage by {writers} ranks; this run has "
        f"{world_size}. A position inside those stages is per rank: resume it with {writers} ranks (a "
        "checkpoint at an epoch's end, or after training, resumes on any number)"
    )


def resolve_resume(resume: str | None, output_dir: str | Path, world_size: int) -> Path | None:
    """Turn --resume into a checkpoint directory before the process group exists (every rank, on its own): the
    cheap check only (manifest, sizes, world size), no checksums; agree_on_resume does those, later, in
    parallel. Raises CheckpointError."""
    if not resume:
        return None
    if resume != "auto":
        ckpt = _explicit(resume)
        problem = check_complete(ckpt)
        if problem is not None:
            raise CheckpointError(f"--resume {resume}: not a complete rft_ds checkpoint: {problem}")
        problem = _format_problem(ckpt) or _world_problem(ckpt, written_by(ckpt), world_size)
        if problem:
            raise CheckpointError(problem)
        return ckpt
    for ckpt in _candidates(Path(output_dir) / "checkpoints"):  # auto: the newest this run can resume from
        problem = check_complete(ckpt)
        if problem is None:
            hard = _format_problem(ckpt)
            if hard:
                raise CheckpointError(hard)
            problem = _world_problem(ckpt, written_by(ckpt), world_size)
            if problem is None:
                return ckpt
        warnings.warn(f"rft_ds: skipping checkpoint {ckpt}: {problem}", stacklevel=2)
    return None


def _verdicts(ckpt: Path, rank: int, world_size: int) -> str | None:
    """Collective: this rank checksums its own files of ckpt; the first failure of any rank (the same on all)."""
    from rft_ds import distributed as D

    try:
        problem = verify_files(ckpt, rank, world_size)
    except Exception as e:  # noqa: BLE001 - must reach the gather below, whatever happened
        problem = f"{type(e).__name__}: {e}"
    failed = [(r, p) for r, p in enumerate(D.all_gather_object(problem)) if p is not None]
    if not failed:
        return None
    r, p = failed[0]
    more = f"; {len(failed) - 1} more rank(s) found problems too" if len(failed) > 1 else ""
    return f"{p} (found by rank {r}{more})"


def agree_on_resume(resume: str | None, output_dir: str | Path, world_size: int | None = None) -> Path | None:
    """Collective, after the process group exists: the checkpoint every rank resumes from, checksummed in
    parallel (each rank its own files), or None for a fresh start. world_size (default: the process group's)
    is checked against the checkpoint's meta.json.

    Rank 0 lists the candidates (cheap checks only) and broadcasts them, so ranks that see the file system at
    different moments still agree. For each candidate in that order every rank checksums the files it owns and
    the verdicts are all-gathered. `--resume auto`: a damaged candidate is skipped with a warning (rank 0) for
    the previous complete one; none left: None. An explicit path: CheckpointError, one line, on every rank."""
    from rft_ds import distributed as D

    if not resume:
        return None
    world = D.world_size() if world_size is None else world_size
    rank, main = D.rank(), D.is_main()
    plan: tuple = ()
    if main:
        try:
            paths = _candidates(Path(output_dir) / "checkpoints") if resume == "auto" else [_explicit(resume)]
            cands = []
            for c in paths:
                problem = check_complete(c)
                cands.append((str(c), problem, None if problem else written_by(c)))
            plan = ("ok", cands)
        except Exception as e:  # noqa: BLE001 - every rank raises it, below
            plan = (
                "error",
                str(e) if isinstance(e, CheckpointError) else f"--resume {resume}: {type(e).__name__}: {e}",
            )
    status, body = D.broadcast_object(plan)
    if status == "error":
        raise CheckpointError(body)
    explicit = resume != "auto"
    for path, problem, writers in body:
        ckpt = Path(path)
        if problem is None:
            hard = _format_problem(ckpt)
            if hard:
                raise CheckpointError(hard)
            problem = _world_problem(ckpt, writers, world)
        if problem is None:
            problem = _verdicts(ckpt, rank, D.world_size())  # the work is split over the ranks there are
            if problem is None:
                return ckpt
        if explicit:
            raise CheckpointError(f"--resume {resume}: not a complete rft_ds checkpoint: {problem}")
        if main:
            warnings.warn(
                f"rft_ds: skipping checkpoint {ckpt}: {problem}; falling back to the previous complete checkpoint",
                stacklevel=2,
            )
    if main and body:
        warnings.warn(
            f"rft_ds: no intact checkpoint in {Path(output_dir) / 'checkpoints'}: starting fresh", stacklevel=2
        )
    return None


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def written_by(ckpt: Path) -> int:
    """The world size (ranks) that wrote a checkpoint."""
    return int(read_meta(ckpt)["world_size"])


def prompts_digest(texts: list[str], metadata: list[dict]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([texts, metadata], sort_keys=True, default=str).encode())
    return h.hexdigest()


def prune(root: Path, keep_last: int, new: Path) -> list[Path]:
    """Remove complete checkpoints older than the newest `keep_last` complete ones (counting `new`, up to its
    epoch). Never `new`, never the one `latest` names, never one that is incomplete (kept for inspection) or
    not an rft_ds checkpoint, never one of a later epoch than `new` (left by an abandoned run; the run
    overwrites it when it gets there). Each goes by an atomic rename to `.tmp-pruned-*` first, so a crash
    mid-removal leaves a temporary directory (removed on the next save), not a torn epoch_*. Returns them."""
    root, new = Path(root), Path(new)
    upto = position_of(new.name)
    keep = {new.name, _latest_name(root)}
    complete = [
        c for c in checkpoint_dirs(root) if (upto is None or position_of(c.name) <= upto) and check_complete(c) is None
    ]
    removed = []
    for c in complete[max(keep_last, 1) :]:
        if c.name in keep:
            continue
        doomed = root / f".tmp-pruned-{c.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        c.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(c)
    return removed


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """tmp (sealed, with its manifest) -> final, then `latest` -> final. An existing final (an epoch redone after
    resuming from an older checkpoint) is moved aside first and removed after."""
    aside = None
    if final.exists():
        aside = root / f".tmp-replaced-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    tmp.rename(final)
    _fsync(root)
    _atomic_write_text(root / "latest", final.name)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


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
            raise _WriteFailed(
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                f"({_free_space_note(root)})"
            ) from e

    return guard()


@dataclasses.dataclass(frozen=True)
class Saved:
    """What `save` did, on this rank."""

    path: Path
    seconds: float  # the whole save, start to return
    shards_seconds: float  # until every rank's files were written, fsynced and checksummed (finalize_state's arg)
    seal_seconds: float  # this rank's fsync + checksum of its own files
    own_bytes: int  # bytes of this rank's own files (its shards and RNG state)
    shard_bytes: int  # bytes of every rank's own files, sealed in parallel
    shared_bytes: int  # bytes rank 0 sealed afterwards (rft_state.pt, hf/, meta.json, unclaimed); 0 on other ranks
    hash_name: str


_STAGE = "checkpoint write (the previous checkpoint is intact)"


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save computes a CRC-32 of every record, on one core (0.5-3 GB/s here: slower than the disk and the
    largest cost of a ZeRO-3 save), which torch.load never checks. The manifest's checksum covers every byte,
    so it is skipped while a checkpoint is written. (An `unzip -t` of such a .pt reports CRC errors.)"""
    import torch.serialization as ser

    get, put = getattr(ser, "get_crc32_options", None), getattr(ser, "set_crc32_options", None)
    if get is None or put is None:  # torch < 2.6: always computed
        yield
        return
    before = get()
    put(False)
    try:
        yield
    finally:
        put(before)


def write_rank_state(path: Path, state: dict) -> None:
    """A rank's own state file (its RNG, pool shard, samples). Pickle protocol 4, so the token arrays go in as
    raw bytes: torch.save's default, protocol 2, writes bytes as latin-1 text, ~5 bytes per int32 token
    instead of 4 and 3x slower to write."""
    import torch

    torch.save(state, path, pickle_protocol=4)


def own_bytes(engine: Any) -> int:
    """Bytes of this rank's share of a checkpoint: its ZeRO-3 partition of every trainable parameter, in the
    training dtype and as fp32 master weights with Adam's two moments (12 bytes a parameter)."""
    import torch

    from rft_ds import distributed as D

    n, size = 0, 0
    for p in engine.module.parameters():
        if p.requires_grad:
            part = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else -(-p.numel() // D.world_size())
            n, size = n + part, size + part * torch.empty(0, dtype=p.dtype).element_size()
    return size + 12 * n


def save_time_estimate(root: Path, nbytes: int, probe_bytes: int = 32 << 20) -> float:
    """Seconds writing `nbytes` of checkpoint should take this rank, before any checkpoint was taken (Slurm's
    deadline needs one for the first save): a probe file written, fsynced and checksummed where the checkpoints
    go, scaled to nbytes. Every rank probes at once, as every rank writes at once in a save."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".probe-{socket.gethostname()}-{os.getpid()}"
    data = np.random.default_rng(0).integers(0, 256, probe_bytes, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    try:
        with open(probe, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        h = _hasher(HASH)
        h.update(data)
    finally:
        probe.unlink(missing_ok=True)
    return (time.perf_counter() - t0) * nbytes / probe_bytes


def _save_engine(engine: Any, tmp: Path) -> None:
    """DeepSpeed's save_checkpoint: a barrier, the checkpoint tag's all_reduce, this rank's writes, a closing
    barrier. A write that fails on one rank (its node's disk is full) raises out of it before that barrier,
    where the other ranks already wait: this rank joins it, so that the failure gather after it pairs with
    theirs instead of with DeepSpeed's barrier (a hang, or collectives shifted by one)."""
    from rft_ds import distributed as D

    try:
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False, exclude_frozen_parameters=_has_frozen(engine))
    except Exception as e:
        if not D.is_collective_failure(e):  # a failed collective: the group is broken, nobody waits
            D.barrier()
        raise


def save(
    root: Path,
    name: str,
    engine: Any,
    state: dict | None,
    tokenizer: Any,
    keep_last: int,
    die_hook: Any = None,
    finalize_state: Callable[[float], dict] | None = None,
    local_state: Any = None,
    meta: dict | None = None,
) -> Saved:
    """Write checkpoint `name` (checkpoint_name of the run position) atomically. Collective: every rank calls it.

    `state` is the shared run state (rank 0's copy is saved); `local_state` this rank's own part, saved with its
    RNG states in rank{r}.pt; `meta` (JSON) goes into meta.json, readable before any model loads.
    With `finalize_state`, rank 0 instead calls
    finalize_state(seconds) once every rank's files are written, fsynced and checksummed, and saves what it
    returns: so the state can record how long the checkpoint took (`time_checkpoint` in the epoch's history).
    It runs on rank 0 only and must not call collectives. rft_state.pt is written after the shards either way.
    Keeps the newest `keep_last` complete checkpoints (see `prune`)."""
    import torch

    from rft_ds import distributed as D
    from rft_ds.lora import ADAPTER, is_peft

    t0 = time.perf_counter()
    root = Path(root)
    tmp, final = root / f".tmp-{name}", root / name
    rank, world, main = D.rank(), D.world_size(), D.is_main()
    with D.all_ranks_or_fail(_STAGE):
        if main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # torn writes of earlier crashes
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
    # 1. Every rank writes its files (DeepSpeed: this rank's ZeRO-3 partitions); rank 0 the small shared ones.
    with D.all_ranks_or_fail(_STAGE), _writing(root), _without_zip_crc():
        # LoRA: the frozen base weights are not saved (they are the model_path's); the adapters and their
        # optimizer state are
        _save_engine(engine, tmp)
        write_rank_state(tmp / f"rank{rank}.pt", {"rng": rng_state(), "local": local_state})
        if main:
            engine.module.config.save_pretrained(tmp / "hf")
            if is_peft(engine.module):  # LoRA: what rft_ds.export needs to rebuild the adapter
                engine.module.peft_config[ADAPTER].save_pretrained(tmp / "hf")
            gen = getattr(engine.module, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp / "hf")
            tokenizer.save_pretrained(tmp / "hf")
            (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "world_size": world, "format": STATE_FORMAT}))
        if die_hook:
            die_hook("checkpoint", (position_of(name) or (0,))[0])  # fault injection (tests): die half written
    # 2. Everything is written (the gather above is a barrier): each rank fsyncs and checksums its own files.
    t1 = time.perf_counter()
    sealed: dict[str, dict] = {}
    with D.all_ranks_or_fail(_STAGE), _writing(root):
        sealed = seal(tmp, rank_files(tmp, rank, world), rank)
    seal_s = time.perf_counter() - t1
    claims = D.all_gather_object((HASH, sealed))
    shards_s = time.perf_counter() - t0
    shared = 0
    # 3. Rank 0: the RFT state, the shared and unclaimed files, the manifest, the rename, `latest`, pruning.
    with D.all_ranks_or_fail(_STAGE), _writing(root), _without_zip_crc():
        if main:
            if finalize_state is not None:
                state = finalize_state(shards_s)
            torch.save(state, tmp / "rft_state.pt")
            files = cover(tmp, claims)
            shared = sum(e["size"] for e in files.values()) - sum(e["size"] for _, c in claims for e in c.values())
            _fsync_dirs(tmp)
            _write_manifest_file(tmp, files, HASH, world)
            _publish(root, tmp, final)
            prune(root, keep_last, final)  # only after the new one is complete
    return Saved(
        final,
        time.perf_counter() - t0,
        shards_s,
        seal_s,
        sum(e["size"] for e in sealed.values()),
        sum(e["size"] for _, c in claims for e in c.values()),
        shared,
        HASH,
    )


def universal_copy(ckpt: Path, timeout_s: float = 6 * 3600) -> Path:
    """Collective. DeepSpeed's universal form of ckpt's ZeRO-3 state, which any world size loads (weights and
    optimizer state repartitioned), for an elastic resume. Rank 0 makes it once, beside the checkpoint in
    checkpoints/.universal/<name>/ (a temporary directory renamed into place), and later resumes reuse it;
    the checkpoint itself is never changed. The other ranks wait on the file system, not in a collective: a
    large model's conversion outlasts the process-group timeout."""
    import argparse

    from rft_ds import distributed as D

    ckpt = Path(ckpt)
    out = ckpt.parent / ".universal" / ckpt.name
    failed = out.with_name(out.name + ".failed")
    if D.is_main():
        failed.unlink(missing_ok=True)  # an earlier attempt's
    D.barrier()
    if D.is_main() and not out.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds_to_universal(
                argparse.Namespace(
                    input_folder=str(ckpt / "ds"),
                    output_folder=str(tmp / "ds"),
                    num_extract_workers=2,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=False,
                )
            )
            tmp.rename(out)
        except Exception as e:  # noqa: BLE001 - told to the waiting ranks, then raised
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(e).__name__}: {e}")
            raise CheckpointError(f"converting {ckpt} for another world size failed: {type(e).__name__}: {e}") from e
    t0 = time.monotonic()
    while not out.is_dir():
        if failed.is_file():
            raise CheckpointError(f"converting {ckpt} for another world size failed on rank 0: {failed.read_text()}")
        if time.monotonic() - t0 > timeout_s:
            raise CheckpointError(f"rank 0 did not convert {ckpt} for another world size within {timeout_s:.0f} s")
        time.sleep(1)
    D.barrier()
    return out


def _has_frozen(engine: Any) -> bool:
    """LoRA: the module has weights training does not change (their checkpoint is the model_path)."""
    import torch

    return isinstance(engine.module, torch.nn.Module) and any(not p.requires_grad for p in engine.module.parameters())


def load(ckpt: Path, engine: Any, verified: bool = False, universal: Path | None = None) -> tuple[dict, Any]:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNG; return (the shared run state,
    this rank's local state). Collective. With `universal` (universal_copy, for another world size than the
    one that wrote ckpt; the engine built with {"checkpoint": {"load_universal": true}}), the ZeRO-3 state
    comes from there, repartitioned; a rank the checkpoint had keeps its RNG, and instead of one local state
    it gets the list of those of old ranks rank, rank + world, ... (each old rank's goes to exactly one new
    rank; a new rank beyond the old world gets none).

    Unless `verified` (agree_on_resume already checksummed it), each rank first checksums the files it owns and
    the ranks agree: a damaged checkpoint raises CheckpointError on every rank."""
    import torch

    from rft_ds import distributed as D

    if not verified:
        problem = _verdicts(Path(ckpt), D.rank(), D.world_size())
        if problem is not None:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")
    source = Path(universal or ckpt)
    path, _ = engine.load_checkpoint(
        str(source),
        tag="ds",
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not _has_frozen(engine),
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {source / 'ds'}")
    shared = torch.load(Path(ckpt) / "rft_state.pt", weights_only=False)
    mine = Path(ckpt) / f"rank{D.rank()}.pt"
    if universal is not None:
        if mine.is_file():
            set_rng_state(torch.load(mine, weights_only=False)["rng"])
        written = written_by(ckpt)
        return shared, [
            torch.load(Path(ckpt) / f"rank{r}.pt", weights_only=False)["local"]
            for r in range(D.rank(), written, D.world_size())
        ]
    mine = torch.load(mine, weights_only=False)
    set_rng_state(mine["rng"])
    return shared, mine["local"]


def rng_state() -> dict:
    """Every generator training draws from: Python's, numpy's, torch's CPU one and this rank's GPU's."""
    import torch

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()  # the current device's: this rank's
    return s


def set_rng_state(s: dict) -> None:
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def check_compatible(state: dict, digest: str) -> None:
    if state.get("prompts_digest") != digest:
        raise ConfigError(
            "the prompts differ from the ones this checkpoint was trained on: its pools are keyed by "
            "prompt position, so it cannot be resumed with other data"
        )
