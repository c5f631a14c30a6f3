"""The device rule and the communication rule (rft_ds/distributed.py), checked without a GPU.

The device rule is a pure function of the launcher's environment and the visible GPU count, so every
launcher combination is a row of a table. The communication rule is checked twice: statically (no module
but distributed.py calls a torch.distributed collective) and dynamically (under a recording fake of an
NCCL process group, every tensor reaching a collective must be on the communication device).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rft_ds import distributed as D

ROOT = Path(__file__).resolve().parents[1]

DS = {"LOCAL_SIZE": "4", "RANK": "5", "WORLD_SIZE": "8"}  # what the deepspeed launcher sets
TORCHRUN = {"LOCAL_WORLD_SIZE": "4", "RANK": "5", "WORLD_SIZE": "8"}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)"}

# (case, env, visible GPUs, device or the DeviceError's text)
CASES = [
    ("cpu box, deepspeed launcher", {**DS, "LOCAL_RANK": "1"}, 0, "cpu"),
    ("cpu box, plain python", {}, 0, "cpu"),
    ("deepspeed, 4 GPUs", {**DS, "LOCAL_RANK": "3"}, 4, "cuda:3"),
    ("torchrun, 4 GPUs", {**TORCHRUN, "LOCAL_RANK": "2"}, 4, "cuda:2"),
    (
        "deepspeed, CUDA_VISIBLE_DEVICES=4,5,6,7",
        {**DS, "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"},
        4,
        "cuda:1",
    ),
    ("deepspeed, 4 ranks but 2 GPUs", {**DS, "LOCAL_RANK": "0"}, 2, "started 4 ranks on this node but only 2 GPU"),
    ("deepspeed, 4 ranks but 2 GPUs (a rank that has one)", {**DS, "LOCAL_RANK": "1"}, 2, "started 4 ranks"),
    (
        "srun --gpus-per-task=1, first task",
        {**SRUN, "SLURM_LOCALID": "0", "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "0"},
        1,
        "cuda:0",
    ),
    (
        "srun --gpus-per-task=1, fourth task",
        {**SRUN, "SLURM_LOCALID": "3", "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "3"},
        1,
        "cuda:0",
    ),
    (
        "srun --gpus-per-task (TRES form)",
        {**SRUN, "SLURM_LOCALID": "2", "SLURM_TRES_PER_TASK": "gres/gpu:1"},
        1,
        "cuda:0",
    ),
    ("srun --gpus-per-task=2, second task", {**SRUN, "SLURM_LOCALID": "1", "SLURM_GPUS_PER_TASK": "2"}, 2, "cuda:0"),
    ("srun --gpus-per-node=4", {**SRUN, "SLURM_LOCALID": "3", "SLURM_STEP_GPUS": "0,1,2,3"}, 4, "cuda:3"),
    (
        "srun --gpus-per-node=2 with 4 tasks",
        {**SRUN, "SLURM_LOCALID": "0", "SLURM_STEP_GPUS": "0,1"},
        2,
        "srun started 4 ranks on this node but only 2 GPU",
    ),
    (
        "srun --ntasks-per-node=2 --gpus-per-node=2",
        {**SRUN, "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2"},
        2,
        "cuda:1",
    ),
    (
        "srun, uneven tasks per node '3,1', node 1",
        {**SRUN, "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "3,1"},
        1,
        "cuda:0",
    ),
    ("plain python, one GPU", {}, 1, "cuda:0"),
    ("plain python, LOCAL_RANK beyond the GPUs", {"LOCAL_RANK": "2"}, 2, "local rank 2 has no GPU"),
]


@pytest.mark.parametrize("case,env,n_gpus,expected", CASES, ids=[c[0] for c in CASES])
def test_device_rule(case, env, n_gpus, expected):
    if expected == "cpu" or expected.startswith("cuda:"):
        assert D.local_device(env, n_gpus) == expected
    else:
        with pytest.raises(D.DeviceError, match=expected):
            D.local_device(env, n_gpus)


def test_device_error_is_one_line_config_error():
    from rft_ds.config import ConfigError

    with pytest.raises(ConfigError) as e:
        D.local_device({**DS, "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0"}, 1)
    assert "\n" not in str(e.value) and "CUDA_VISIBLE_DEVICES='0'" in str(e.value)


@pytest.mark.parametrize(
    "requested,n_gpus,expected",
    [("auto", 0, "gloo"), ("auto", 2, "nccl"), ("gloo", 2, "gloo"), ("nccl", 1, "nccl"), ("gloo", 0, "gloo")],
)
def test_backend_rule(requested, n_gpus, expected):
    assert D.resolve_backend(requested, n_gpus) == expected


def test_nccl_without_cuda_is_refused():
    with pytest.raises(D.DeviceError, match="dist_backend=nccl but no CUDA device"):
        D.resolve_backend("nccl", 0)


COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "monitored_barrier",
}


def _collective_calls(path: Path) -> list[str]:
    """Calls of a torch.distributed collective in a source file, however torch.distributed was imported."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    direct = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "deepspeed.comm"):
            direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.Import):
            pass
    aliases |= {"deepspeed.comm"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {f.id}")
    return found


def test_only_distributed_py_calls_collectives():
    offenders = [
        c
        for p in sorted((ROOT / "rft_ds").rglob("*.py"))
        if p.name != "distributed.py" or p.parent.name != "rft_ds"
        for c in _collective_calls(p)
    ]
    assert not offenders, "torch.distributed collectives outside rft_ds/distributed.py:\n" + "\n".join(offenders)


def test_the_static_check_sees_every_import_style(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nimport torch.distributed as dist\nfrom torch.distributed import all_reduce as ar\n"
        "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n    ar(t)\n"
    )
    assert len(_collective_calls(bad)) == 3


def test_numpy_only_after_cpu():
    """Every `.numpy()` in the package is on a value already moved to the CPU (CUDA tensors refuse it)."""
    offenders = []
    for p in sorted((ROOT / "rft_ds").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
                src = ast.unparse(node.func.value)
                if not (src.endswith(".cpu()") or "from_numpy" in src or _assigned_from_cpu(p, node)):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def _assigned_from_cpu(path: Path, call: ast.Call) -> bool:
    """`x.numpy()` where x (or x[...]) was assigned from an expression ending in .cpu() in the same file."""
    base = call.func.value
    while isinstance(base, ast.Subscript):
        base = base.value
    if not isinstance(base, ast.Name):
        return False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == base.id for t in node.targets):
            if ast.unparse(node.value).endswith(".cpu()"):
                return True
    return False


@pytest.mark.parametrize(
    "env,cpus,expected",
    [
        ({}, 8, 8),  # plain python: one rank
        ({"LOCAL_WORLD_SIZE": "2"}, 2, 1),  # torchrun, 2 ranks on 2 cores
        ({"LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 16, 8),  # deepspeed launcher
        ({"LOCAL_SIZE": "8"}, 4, 1),  # more ranks than cores: one each, never zero
        ({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}, 16, 3),  # the user's choice wins
        ({"OMP_NUM_THREADS": "", "LOCAL_SIZE": "2"}, 16, 8),
        ({"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"}, 16, 4),  # srun: tasks on this node
        ({"SLURM_CPUS_PER_TASK": "12", "SLURM_TASKS_PER_NODE": "8"}, 12, 12),  # srun binds each task to its CPUs
    ],
)
def test_threads_per_rank_share_the_node(env, cpus, expected):
    assert D.threads_per_rank(env, cpus) == expected
