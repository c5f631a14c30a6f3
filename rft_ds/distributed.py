"""torch.distributed for rft_ds: this rank's device, every collective, and failing together instead of hanging.

Two rules live here and nowhere else:
- The device rule (`local_device`): which device this rank uses, decided once from the launcher's
  environment (deepspeed/torchrun LOCAL_RANK, or Slurm's SLURM_LOCALID with per-task GPU binding) and
  set with torch.cuda.set_device before the process group starts.
- The communication rule: every collective of the package goes through the functions below, which move
  tensors to the backend's device (CUDA under NCCL, CPU under gloo) and back. NCCL refuses CPU tensors,
  and gloo CUDA ones; a test keeps other modules from calling torch.distributed collectives directly.

A rank that raises inside a stage would leave the others blocked in their next collective until the
process-group timeout. `all_ranks_or_fail` turns a local exception into one every rank raises, where every
rank reaches the same point (a stage's local work). Where they cannot (an error between two collectives of a
training step: the others wait inside the next one, and under NCCL a dead peer does not end that wait, its
watchdog aborts them after train.dist_timeout_s), `failing_together` posts the error to the rendezvous store
and a thread on every other rank, seeing it, ends its rank seconds later.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from rft_ds.errors import ConfigError


class RankError(RuntimeError):
    """Raised on every rank when a stage failed on at least one of them."""


class RendezvousError(RankError):
    """This rank could not join the process group (the master's address, a port or a peer unreachable)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line of text (at most `limit` characters), or its type's name when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def rendezvous_problem(env: Mapping[str, str], timeout_s: int, e: BaseException) -> str:
    """One line naming what was tried, for a failed init of the process group."""
    first = first_line(e)
    iface = (
        ", ".join(f"{k}={env[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if env.get(k))
        or "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME unset"
    )
    return (
        f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} on {socket.gethostname()} could not join the "
        f"process group at MASTER_ADDR={env.get('MASTER_ADDR')} MASTER_PORT={env.get('MASTER_PORT')} within "
        f"train.dist_timeout_s={timeout_s} ({iface}): {type(e).__name__}: {first}. MASTER_ADDR must be the first "
        "node's address as every node reaches it; on several interfaces set GLOO_SOCKET_IFNAME (CPU) or "
        "NCCL_SOCKET_IFNAME (GPU) to the one between the nodes"
    )


class DeviceError(ConfigError):
    """This rank has no device it can use (checked before the process group starts and any model loads)."""


_device: torch.device | None = None  # set once by init(); the device of every module this rank builds


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """Slurm's task count on this node: SLURM_TASKS_PER_NODE is e.g. '2(x3),1' (per node, in node order)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec, node = env.get("SLURM_TASKS_PER_NODE"), int(env.get("SLURM_NODEID", "0"))
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node] if node < len(counts) else None


def _gpus_bound_per_task(env: Mapping[str, str]) -> bool:
    """srun --gpus-per-task (SLURM_GPUS_PER_TASK; newer Slurm also SLURM_TRES_PER_TASK=gres/gpu:N): each task
    sees only its own GPUs, so its device index is 0 whatever its SLURM_LOCALID."""
    return bool(env.get("SLURM_GPUS_PER_TASK")) or "gpu" in env.get("SLURM_TRES_PER_TASK", "")


def threads_per_rank(env: Mapping[str, str], cpus: int) -> int:
    """CPU threads for this rank's compute (torch's intra-op pool, which the colocated vLLM engine shares):
    OMP_NUM_THREADS when set (torchrun sets 1), else Slurm's CPUs per task, else this process's CPUs over
    the ranks on this node.
    Left to itself every rank would start one thread per core, and ranks on one host would run twice (8
    ranks: 8 times) as many busy threads as there are cores."""
    for key in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):  # srun --cpus-per-task binds each task to its own
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    return max(1, cpus // ranks_on_this_node(env))


def ranks_on_this_node(env: Mapping[str, str]) -> int:
    """This node's rank count: the launcher's LOCAL_WORLD_SIZE / LOCAL_SIZE, else Slurm's tasks here, else 1."""
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
    return max(1, int(local) if local and local.isdigit() else (_tasks_on_this_node(env) or 1))


def node_share(per_node: int, env: Mapping[str, str]) -> int:
    """This rank's part of a budget its node's ranks share (at least 1): reward.max_concurrency is per node, so
    64 ranks on 8 nodes keep 8 calls each in flight to a reward server, not 8 per rank (512)."""
    return max(1, per_node // ranks_on_this_node(env))


def local_device(env: Mapping[str, str], cuda_count: int) -> str:
    """'cpu' or 'cuda:<i>' for this rank, from the launcher's environment and the GPUs it can see.

    cuda_count is torch.cuda.device_count() in this process (CUDA_VISIBLE_DEVICES already applied).
    - deepspeed / torchrun (they set LOCAL_SIZE / LOCAL_WORLD_SIZE) give every rank all of the node's GPUs:
      device LOCAL_RANK, and there must be a GPU for every local rank.
    - srun with --gpus-per-task: each task sees only its own GPUs: device 0.
    - srun with --gpus-per-node (or --gres): every task sees the node's GPUs: device SLURM_LOCALID.
    - plain python: LOCAL_RANK or 0.
    Raises DeviceError, the same on every rank of a node, when the ranks outnumber the GPUs."""
    if cuda_count <= 0:
        return "cpu"
    visible = (
        f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}"
        if "CUDA_VISIBLE_DEVICES" in env
        else "CUDA_VISIBLE_DEVICES unset"
    )
    launcher = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
    if launcher:
        local, n_local, who = int(env.get("LOCAL_RANK", "0")), int(launcher), "the launcher"
    elif "SLURM_PROCID" in env and "RANK" not in env:
        if _gpus_bound_per_task(env):
            return "cuda:0"
        local, n_local, who = int(env.get("SLURM_LOCALID", "0")), _tasks_on_this_node(env), "srun"
    else:
        local, n_local, who = int(env.get("LOCAL_RANK", "0")), None, "this process"
    if n_local is not None and n_local > cuda_count:
        raise DeviceError(
            f"{who} started {n_local} ranks on this node but only {cuda_count} GPU(s) are visible "
            f"({visible}); start one rank per GPU (srun: --gpus-per-task=1 or --gpus-per-node={n_local})"
        )
    if local >= cuda_count:
        raise DeviceError(f"local rank {local} has no GPU: only {cuda_count} visible ({visible})")
    return f"cuda:{local}"


def resolve_backend(requested: str, cuda_count: int) -> str:
    """train.dist_backend -> 'nccl' or 'gloo'. NCCL without a visible GPU is a DeviceError."""
    if requested == "auto":
        return "nccl" if cuda_count > 0 else "gloo"
    if requested == "nccl" and cuda_count <= 0:
        raise DeviceError(
            "train.dist_backend=nccl but no CUDA device is visible on this host "
            f"(torch {torch.__version__}, CUDA {'built' if torch.backends.cuda.is_built() else 'not built'})"
            "; use train.dist_backend=gloo (or auto) on CPU"
        )
    return requested


def device() -> torch.device:
    """This rank's device: every module it builds lives there, and every input goes there first."""
    if _device is not None:
        return _device
    return torch.device(local_device(os.environ, torch.cuda.device_count()))


def comm_device() -> torch.device:
    """Where tensors must be for this process group's collectives: CUDA under NCCL, CPU otherwise."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    global _device
    if is_dist():
        return
    import deepspeed

    cuda_count = torch.cuda.device_count()
    dev = torch.device(local_device(os.environ, cuda_count))  # from the launcher's env, before we add to it
    backend = resolve_backend(backend, cuda_count)
    if "RANK" not in os.environ:  # srun starts tasks itself: take ranks and master from Slurm
        from rft_ds.slurm import torch_env

        os.environ.update(torch_env(os.environ))
    if "RANK" not in os.environ:  # plain `python`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # DeepSpeed takes LOCAL_RANK as the device ordinal (engine, zero.Init): under per-task GPU binding
        # that is 0, not the task's place on the node.
        os.environ["LOCAL_RANK"] = str(dev.index)
    _device = dev
    threads = threads_per_rank(os.environ, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)  # before vLLM's CPU worker, which forbids it afterwards
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for what this process starts (vLLM's engine core)
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - the store or a peer unreachable: say where it looked
        raise RendezvousError(rendezvous_problem(os.environ, timeout_s, e)) from e
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
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank()}"
    )
    if world_size() > 1 and os.environ.get("LOCAL_SIZE") == str(world_size()):  # DeepSpeed's own condition
        barrier()
        (shm / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """A killed rank stays a zombie until its parent (the launcher) reaps it: that is not alive."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
            if not _alive(int(pid)):
                lost.append(r)
    except Exception:  # noqa: BLE001 - the store lives on rank 0: unreachable means rank 0 is gone
        return "rank 0 (the rendezvous store on rank 0 is unreachable)"
    if lost:
        return "rank " + ", ".join(map(str, lost))
    return f"a rank on another host ({', '.join(map(str, elsewhere))})" if elsewhere else "a stalled rank"


def is_collective_failure(e: BaseException) -> bool:
    """A peer died or stalled: torch's distributed error types, or the text of a gloo/NCCL failure raised as a
    plain RuntimeError. Not any error that happens to say "timeout" (a reward server's, say)."""
    if isinstance(e, getattr(dist, "DistError", ())):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(e).lower()
    return any(k in text for k in ("/gloo/", "gloo::", "nccl", "connection closed by peer", "connection reset by peer"))


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

    Every rank enters exactly one all_gather here, failed or not, so nobody is left waiting. Where the others
    are not here (the body was collective, and only this rank left it early), the error is also posted, and
    failing_together ends every rank seconds later."""
    err: str | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        err = f"{type(e).__name__}: {e}" if not isinstance(e, RankError) else str(e)
        local = e
        if not isinstance(e, RankError) and not is_collective_failure(e):
            post_failure(f"{stage}: {type(e).__name__}: {first_line(e)}" if str(e).strip() else f"{stage}: {err}")
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


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of t on every rank, on t's own device. The collective runs on comm_device()."""
    if not is_dist():
        return t.clone()
    buf = t.to(comm_device(), copy=True)
    dist.all_reduce(buf, op=_OPS[op])
    return buf.to(t.device)


def max_over_ranks(n: int) -> int:
    """The largest of every rank's n (so that ranks agree on a count of collective calls)."""
    return int(all_reduce(torch.tensor([n], dtype=torch.long), "max").item())


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a signal may reach only some ranks)."""
    return bool(max_over_ranks(int(flag)))


EXCHANGE_VALUES = 16 * 2**20  # int32 values one all_to_all round moves into or out of a rank: 64 MiB


def all_to_all_int32(send: list, recv_sizes: list[int]) -> list:
    """All_to_all of int32 numpy arrays: send[r] goes to rank r, and the array rank r sends here,
    recv_sizes[r] values long (every rank knows the sizes in advance), comes back as the r-th entry.
    On comm_device(), in rounds of at most EXCHANGE_VALUES values in and out of each rank (the buffers on the
    GPU under NCCL stay bounded however many rows move); one all_reduce agrees on the number of rounds. The
    caller skips it when nothing moves anywhere (a decision every rank shares)."""
    import numpy as np

    if not is_dist():
        return [np.asarray(send[0], dtype=np.int32)]
    dev, world = comm_device(), world_size()
    send = [np.asarray(a, dtype=np.int32) for a in send]
    per_peer = max(1, EXCHANGE_VALUES // world)
    longest = max([len(a) for a in send] + [int(n) for n in recv_sizes] + [0])
    rounds = max_over_ranks(-(-longest // per_peer))
    got: list[list] = [[] for _ in range(world)]
    for k in range(rounds):
        lo, hi = k * per_peer, (k + 1) * per_peer
        parts = [a[lo:hi] for a in send]
        sizes = [max(0, min(int(n), hi) - lo) for n in recv_sizes]
        out = torch.empty(sum(sizes), dtype=torch.int32, device=dev)
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        dist.all_to_all_single(
            out, torch.from_numpy(flat).to(dev), output_split_sizes=sizes, input_split_sizes=[len(a) for a in parts]
        )
        for r, piece in enumerate(np.split(out.cpu().numpy(), np.cumsum(sizes)[:-1])):
            got[r].append(piece)
    return [np.concatenate(g) if g else np.zeros(0, np.int32) for g in got]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's obj, in rank order, on rank 0 only (None elsewhere): for what only rank 0 needs."""
    if not is_dist():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


# --- failing together where the ranks are not at the same point: the rendezvous store as a side channel

FAILURE_KEY = "rft_ds/failure"
GRACE_S = 10.0  # after a peer posted a failure: time for this rank's own error (a gloo error, a RankError) first
POLL_S = 1.0  # one small request to the store per rank and second (64 ranks: 64 a second)
_client: list[Any] = []  # this rank's own connection to the store (the default group's may be busy in a wait)
_client_lock = threading.RLock()
_first_failure: str | None = None  # the first failure any rank posted, as seen when this rank posted its own


def _store() -> Any:
    """A connection of this rank's own to the rendezvous store at MASTER_ADDR:MASTER_PORT (rank 0's, or the
    torchrun agent's): safe to use from the watcher thread while the main thread waits in a collective."""
    with _client_lock:
        if not _client:
            _client.append(
                dist.TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    is_master=False,
                    timeout=datetime.timedelta(seconds=5),
                    wait_for_workers=False,
                )
            )
        return _client[0]


def post_failure(message: str) -> bool | None:
    """Tell every rank that this one failed (`message`: one line). True when this rank posted first (or
    there is nobody to tell): its line is the one the terminal shows; False when another rank did; None
    when the store (on rank 0) cannot be reached."""
    global _first_failure
    if not is_dist() or world_size() == 1:
        return True
    mine = f"rank {rank()}: "
    if _first_failure is not None:  # posted before: one first failure per run
        return _first_failure.startswith(mine)
    try:
        with _client_lock:  # compare_set: the first writer wins, atomically
            _first_failure = _store().compare_set(FAILURE_KEY, "", mine + message).decode()
    except Exception:  # noqa: BLE001 - the store is gone with rank 0
        return None
    return _first_failure.startswith(mine)


def first_failure() -> str | None:
    """'rank r: <error>' of the first rank that posted a failure, when this rank posted one too."""
    return _first_failure


def own_first_failure() -> str | None:
    """This rank's error, when it was the first any rank posted (what its terminal line should say)."""
    mine = f"rank {rank()}: "
    return _first_failure[len(mine) :] if _first_failure and _first_failure.startswith(mine) else None


@contextlib.contextmanager
def failing_together(grace_s: float = GRACE_S, poll_s: float = POLL_S) -> Iterator[None]:
    """Run the body (a run: setup and loop) with a watcher: an exception leaving it on this rank is posted
    (a RankError is not: every rank raised it), and when another rank posted one, or the store has been
    unreachable for 3 polls (rank 0 is gone), this rank, still inside the body grace_s later, writes why
    to its log and exits 1: it is waiting in a collective the failed rank will never join."""
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stop, grace_s, poll_s), name="rft_ds-failure-watch", daemon=True)
    watcher.start()
    try:
        yield
    except RankError:
        raise
    except BaseException as e:
        if is_collective_failure(e):  # a consequence: the peer that failed posted its cause, or died
            raise
        post_failure(f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__)
        raise
    finally:
        stop.set()


def _watch(stop: threading.Event, grace_s: float, poll_s: float) -> None:
    seen_at, why, misses = None, None, 0
    while not stop.wait(poll_s):
        if not is_dist() or world_size() == 1:
            continue
        try:
            with _client_lock:
                posted = _store().get(FAILURE_KEY).decode() if _store().check([FAILURE_KEY]) else None
            misses = 0
        except Exception:  # noqa: BLE001 - connection refused or timed out
            posted, misses = None, misses + 1
        if posted:  # this rank's own too: an error left it in a collective the others never reached
            why = why or posted
        elif misses >= 3:
            why = why or "rank 0 is gone (the rendezvous store on rank 0 is unreachable)"
        if why and seen_at is None:
            seen_at = time.monotonic()
        # the rank that failed leaves first (its exit ends the others' waits under gloo); the others follow
        wait = grace_s / 2 if why and why.startswith(f"rank {rank()}: ") else grace_s
        if seen_at is not None and time.monotonic() - seen_at >= wait and not stop.is_set():
            _leave(why)


def _leave(why: str) -> None:
    """End this rank from the watcher thread: the main thread is blocked below Python (in a collective)."""
    from rft_ds import console

    mine = f"rank {rank()}: "
    if why.startswith(mine):  # this rank failed, then waited for ranks that were elsewhere: it says its error
        console.error(f"rft_ds: error (rank {rank()}): {why[len(mine) :]} (the other ranks were not at that point)")
    else:  # the failed rank says its own error on the terminal; this rank's log says why it stopped
        line = f"rft_ds: rank {rank()} stops: {why}; it was waiting in a collective that rank will not join"
        print(line, file=sys.stderr, flush=True)
        if "unreachable" in why and os.environ.get("LOCAL_RANK", "0") == "0":  # nobody posted: one line a node
            console.error(f"rft_ds: error (rank {rank()}): {why}")
    console.ended()
    os._exit(1)


# --- rank 0 works, the others wait on the store: a wait that may outlast train.dist_timeout_s

_releases = [0]


def release_key() -> str:
    """A key for one `release` / `wait_released` pair; every rank calls this in the same order."""
    _releases[0] += 1
    return f"rft_ds/release/{_releases[0]}"


def release(key: str) -> None:
    """Rank 0: its work for `key` is done (or failed): the waiting ranks go on to the collective after it."""
    if is_dist() and world_size() > 1:
        with _client_lock:
            _store().set(key, "1")


def wait_released(key: str, timeout_s: float = 6 * 3600, poll_s: float = 0.5) -> None:
    """The other ranks: wait for rank 0's `release(key)` on the rendezvous store, polling, instead of inside a
    collective (whose timeout, train.dist_timeout_s, a long rank-0 job such as a user's metric_fn over a large
    eval set would outlast)."""
    if not is_dist() or world_size() == 1:
        return
    t0 = time.monotonic()
    while True:
        with _client_lock:
            if _store().check([key]):
                return
        if time.monotonic() - t0 > timeout_s:
            raise RankError(f"rank 0 did not finish within {timeout_s:.0f} s ({key})")
        time.sleep(poll_s)
