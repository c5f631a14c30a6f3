"""`rft-ds check CONFIG [key=value ...]`: everything a run would refuse, found in seconds, before a job waits
in a queue for nodes. The same steps `recipe.prepare` runs, one by one, so one run lists every problem
(one line each) instead of stopping at the first; a step that needs an earlier one's result is skipped when
that failed. Nothing is built, loaded or written: no model weights, no process group, no output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rft_ds.config import RFTRunConfig
from rft_ds.errors import CheckpointError, ConfigError, DataError, RewardError

PROBLEMS = (ConfigError, DataError, RewardError, CheckpointError)
FAILED = object()


def check(cfg: RFTRunConfig, world: int, cuda: bool | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) for a run of cfg on `world` ranks, on this host's devices (cuda None) or on GPU
    (True) or CPU (False) nodes elsewhere: a login node checks a GPU job. A problem is what would stop the
    run; a note is what check could not look at (a model that model.build makes at start)."""
    from rft_ds import recipe
    from rft_ds.evaluation import best_metric, parse_sets
    from rft_ds.reward_terms import build_terms, check_arguments, check_prompts

    problems: list[str] = []
    notes: list[str] = []

    def attempt(fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except PROBLEMS as e:
            problems.append(str(e))
            return FAILED
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable tokenizer: still one line, and go on
            problems.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            return FAILED

    attempt(recipe.check_launch, cfg, world, cuda)
    rewards = attempt(build_terms, cfg.reward, None)
    attempt(recipe.check_metric_sinks, cfg.train)
    sets = attempt(parse_sets, cfg)
    if sets is not FAILED and cfg.train.save_best_model:
        attempt(best_metric, cfg.train.best_metric, sets)
    train = attempt(recipe.load_prompts, cfg, None)
    replay = attempt(recipe.load_replay_prompts, cfg)  # its own step: a bad replay source hides nothing else
    if train is not FAILED:
        train.replay = None if replay is FAILED else replay
    evals = attempt(recipe.load_eval_sets, cfg, sets, [] if rewards is FAILED else rewards) \
        if sets is not FAILED else FAILED
    attempt(recipe.check_output_dir, Path(cfg.train.output_dir), False)
    ds_config = attempt(recipe.deepspeed_config, cfg, world, cuda)
    model = Path(cfg.model.model_path)
    if cfg.model.build and not (model / "config.json").is_file():
        notes.append(f"model.model_path {model} is not there yet: model.build={cfg.model.build} makes it when the run "
                     "starts, so its checks (causal LM, LoRA targets, tokenizer, prompt lengths) wait until then")
        if cfg.model.build == "smollm2":
            from rft_ds import smollm2

            try:
                smollm2.gguf_path()  # what the build needs is installed
            except smollm2.BuildError as e:
                problems.append(str(e))
        return problems, notes
    if attempt(recipe.check_model, cfg, cuda) is FAILED:
        return problems, notes
    if cfg.sampler.backend == "vllm" and ds_config is not FAILED:
        attempt(recipe.engine_limits, cfg, ds_config, cuda)
    tokenizer = attempt(recipe.load_tokenizer, cfg)
    if tokenizer is not FAILED and train is not FAILED and evals is not FAILED:
        tokenized = attempt(recipe.tokenize_prompts, cfg, tokenizer, train, evals) is not FAILED
        if tokenized:
            attempt(recipe.row_limit, cfg, train)
        if tokenized and rewards is not FAILED:
            attempt(check_arguments, rewards, {k for m in train.metadata for k in m})
            attempt(check_prompts, rewards, train.metadata, "data.prompts")
            for i, ev in enumerate(evals):
                attempt(check_arguments, ev.rewards, {k for m in ev.prompts.metadata for k in m})
                attempt(check_prompts, ev.rewards, ev.prompts.metadata, recipe.eval_where(cfg, i))
    return problems, notes
