"""launch/train.py with torch.save failing on one rank: the n-th time RFT_DS_TEST_FAIL_RANK writes DeepSpeed's
optimizer shard it raises ENOSPC (its node's disk is full), as a per-node disk would, while the other ranks'
writes succeed. Arguments: those of launch/train.py. Environment: RFT_DS_TEST_FAIL_RANK, RFT_DS_TEST_FAIL_AT."""

import errno
import os
import runpy
import sys

import torch

_save = torch.save
_seen = [0]


def save(obj, f, *args, **kwargs):
    if "optim_states" in str(f) and os.environ.get("RANK") == os.environ["RFT_DS_TEST_FAIL_RANK"]:
        _seen[0] += 1
        if _seen[0] == int(os.environ["RFT_DS_TEST_FAIL_AT"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return _save(obj, f, *args, **kwargs)


torch.save = save
sys.argv = ["launch/train.py", *sys.argv[1:]]
runpy.run_path("launch/train.py", run_name="__main__")
