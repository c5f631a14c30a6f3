"""`make gpu-smoke`'s script, run on CPU: 2 ranks through the deepspeed launcher, gloo, the CPU DeepSpeed
config, and vLLM made unimportable (as on the bare CUDA machine it is written for) (slow)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rft_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def launch(tmp_path, *args, timeout=900):
    # vLLM "not installed": None in sys.modules makes `import vllm` fail and find_spec("vllm") return None
    site = tmp_path / "no_vllm"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["vllm"] = None\n')
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",  # the CPU path, even on a GPU machine
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "benchmarks/gpu_smoke.py",
        "--out",
        str(tmp_path / "out"),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_gpu_smoke_runs_on_cpu_without_vllm(tmp_path):
    p = launch(tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "[gpu-smoke] PASS" in p.stdout and "FAIL" not in out, out[-5000:]
    assert "device cpu | 2 rank(s) | gloo | ds_configs/zero3_cpu.json | torch.float32" in p.stdout

    # the resumed run continued the first one's history, and the parity check held in fp32
    assert re.search(r"run 2: resumed from epoch_0*1\b", p.stdout), p.stdout
    parity = re.search(r"parity max \|logprob diff\| (\S+) \(tolerance 0.001; (\S+) before the sync\)", p.stdout)
    assert parity and float(parity[1]) <= 1e-3 < float(parity[2]), p.stdout
    run = tmp_path / "out" / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [0, 1, 2]
    assert (run / "final_model" / "model.safetensors").is_file()

    # one summary line per number, each naming the device
    tokens = re.search(r"^\[gpu-smoke\] SUMMARY train: ([\d.]+) label tokens/s .* on cpu$", p.stdout, re.M)
    gather = re.search(
        r"^\[gpu-smoke\] SUMMARY gather: ([\d.]+) GB/s .* vs device copy_ ([\d.]+) GB/s .* on cpu$", p.stdout, re.M
    )
    memory = re.search(r"^\[gpu-smoke\] SUMMARY peak memory: ([\d.]+) GiB peak RSS .* on cpu$", p.stdout, re.M)
    assert tokens and gather and memory, p.stdout
    assert float(tokens[1]) > 0 and float(gather[1]) > 0 and float(gather[2]) > 0 and float(memory[1]) > 0
    print("\n".join(line for line in p.stdout.splitlines() if "SUMMARY" in line or "PASS" in line))


def test_gpu_smoke_failure_exits_nonzero_with_its_reason(tmp_path):
    p = launch(tmp_path, "--prompts", "0", timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "[gpu-smoke] FAIL (rank 0): RFT run, epochs 0-1" in out and "prompts is empty" in out, out[-3000:]
    assert "PASS" not in out
