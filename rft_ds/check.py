"""`rft-ds check CONFIG [key=value ...]`: everything a run would refuse, found in seconds, before a job waits
in a queue for nodes. The same steps a run's start takes (preflight.steps, one list), each one tried, so one
check lists every problem (one line each) instead of stopping at the first; a step that needs an earlier
one's result is skipped when that failed. Nothing is built, loaded or written: no model weights, no process
group, no output directory.
"""

from __future__ import annotations

from typing import Any, Callable

from rft_ds.config import RFTRunConfig
from rft_ds.errors import CheckpointError, ConfigError, DataError, RewardError

PROBLEMS = (ConfigError, DataError, RewardError, CheckpointError)


def check(cfg: RFTRunConfig, world: int, cuda: bool | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) for a run of cfg on `world` ranks, on this host's devices (cuda None) or on GPU
    (True) or CPU (False) nodes elsewhere: a login node checks a GPU job. A problem is what would stop the
    run; a note is what check could not look at (a model that model.build makes at start)."""
    from rft_ds import preflight

    problems: list[str] = []
    notes: list[str] = []

    def attempt(fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except PROBLEMS as e:
            problems.append(str(e))
            return preflight.FAILED
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable tokenizer: still one line, and go on
            problems.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            return preflight.FAILED

    preflight.steps(cfg, world, preflight.Inputs(), cuda, attempt, notes)
    notes.append(resolved_defaults(cfg, torch_cuda() if cuda is None else cuda))
    return problems, notes


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolved_defaults(cfg: RFTRunConfig, cuda: bool) -> str:
    """The settings whose default follows the device, as the run will have them there."""
    from rft_ds.build import engine_defaults

    sp, t = cfg.sampler, cfg.train
    eager, sleep = engine_defaults(sp.enforce_eager, sp.enable_sleep_mode, cuda)
    engine = (
        f"sampler.enforce_eager={str(eager).lower()}{'' if eager else ' (CUDA graphs)'}, "
        f"sampler.enable_sleep_mode={str(sleep).lower()}, "
        if sp.backend == "vllm"
        else ""
    )
    return (
        f"on {'CUDA' if cuda else 'CPU'}: {engine}train.save_every_minutes={t.save_every_minutes:g}, "
        f"model.gradient_checkpointing={str(cfg.model.gradient_checkpointing).lower()}"
    )
