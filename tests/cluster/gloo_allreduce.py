"""One rank of a two-rank gloo all_reduce; run one copy per node (the env gives RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). Prints which hostname/address the rank ran on and the reduced value, so a caller can check
that the ranks met over the nodes' own addresses."""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("PROBE_TIMEOUT", "60"))))
    rank = dist.get_rank()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    # The store's socket shows which address this rank reached the master on.
    print(f"rank={rank} host={socket.gethostname()} sum={t.item():g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
