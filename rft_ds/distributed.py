"""Small torch.distributed helpers: rank facts, object gathers, and failing together instead of hanging.

A rank that raises inside a stage would leave the others blocked in their next collective until the
process-group timeout. `all_ranks_or_fail` turns a local exception into one every rank raises.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist


class RankError(RuntimeError):
    """Raised on every rank when a stage failed on at least one of them."""


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "auto", timeout_s: int = 600) -> None:
    """Join the launcher's process group, or make a 1-process one for plain `python` (the trlx-style API)."""
    if is_dist():
        return
    import deepspeed
    import torch

    if "RANK" not in os.environ:  # srun starts tasks itself: take ranks and master from Slurm
        from rft_ds.slurm import torch_env

        os.environ.update(torch_env(os.environ))
    if "RANK" not in os.environ:  # plain `python`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _release_deepspeed_shm()
    try:  # host:pid of every rank, so a survivor can name a lost one (lost_ranks)
        dist.distributed_c10d._get_default_store().set(f"rft_ds/proc/{rank()}", f"{socket.gethostname()}:{os.getpid()}")
    except Exception:  # noqa: BLE001 - naming lost ranks is best effort
        pass


def _release_deepspeed_shm() -> None:
    """DeepSpeed's CPU backend maps a 66 MB /dev/shm buffer per rank (when all ranks are local) and never
    unlinks it, so every run leaked 66 MB of RAM per rank until reboot, and test suites ran out of memory.
    Once every rank has mapped every buffer (init returned everywhere: the barrier), the names can go;
    the mappings stay valid for the rest of the run, and nothing is left behind even after a kill -9."""
    shm = Path("/dev/shm")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank()}"
    if world_size() > 1 and os.environ.get("LOCAL_SIZE") == str(world_size()):  # DeepSpeed's own condition
        barrier()
        (shm / name).unlink(missing_ok=True)


def lost_ranks() -> str:
    """After a collective failed: which ranks are gone, as far as this host can tell."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        here, lost, elsewhere = socket.gethostname(), [], []
        for r in range(world_size()):
            host, pid = store.get(f"rft_ds/proc/{r}").decode().rsplit(":", 1)
            if host != here:
                elsewhere.append(r)
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                lost.append(r)
    except Exception:  # noqa: BLE001 - the store lives on rank 0: unreachable means rank 0 is gone
        return "rank 0 (the rendezvous store on rank 0 is unreachable)"
    if lost:
        return "rank " + ", ".join(map(str, lost))
    return f"a rank on another host ({', '.join(map(str, elsewhere))})" if elsewhere else "a stalled rank"


def free_port() -> int:
    """A free TCP port on localhost, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def all_ranks_or_fail(stage: str) -> Iterator[None]:
    """Run the body on every rank; if it raised on any rank, raise RankError on all of them.

    Every rank enters exactly one all_gather here, failed or not, so nobody is left waiting."""
    err: str | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        err = f"{type(e).__name__}: {e}" if not isinstance(e, RankError) else str(e)
        local = e
    else:
        local = None
    errors = all_gather_object(err)
    failed = [(r, m) for r, m in enumerate(errors) if m is not None]
    if failed:
        r, m = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankError(f"{stage} failed on rank {r}{more}: {m}") from local


def barrier() -> None:
    if is_dist():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a signal may reach only some ranks)."""
    if not is_dist():
        return flag
    import torch

    t = torch.tensor([int(flag)], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
