"""trlx-style entry point: `rft_ds.train(reward_fn, prompts, eval_prompts, config)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from rft_ds.config import ConfigError, RFTRunConfig, validate


def train(
    reward_fn: Callable | str | Sequence[Callable | str] | None = None,
    prompts: Any = None,
    eval_prompts: Any = None,
    config: RFTRunConfig | dict | str | Path | None = None,
    metric_fn: Callable | str | None = None,
    stop_sequences: Sequence[str] | None = None,
    resume: str | Path | None = None,
):
    """Run rejection fine-tuning and return an `RFTResult` (engine, tokenizer, per-epoch metrics).

    prompts / eval_prompts: a list of strings or dicts (other keys are metadata), a datasets.Dataset or
    DatasetDict, a .jsonl/.json/.csv/.parquet file, a save_to_disk directory, or "module:function".

    reward_fn(samples, prompts, outputs, **kwargs) -> list[float], higher is better; kwargs carry the
    tokenizer, prompt_ids and the metadata of dict prompts (trlx's contract). TRL's fn(prompts, completions,
    **kwargs) works too, and a list of functions is combined per sample with `reward.weights` (a function
    returns None for a sample it does not judge; see rft_ds.reward_terms). Arguments left as None fall
    back to the config (`reward.reward_fn`, `data.prompts`, ...). Under `deepspeed` every rank calls this;
    from plain `python` it runs as a single rank. `resume`: "auto" or a checkpoint path (overrides
    `train.resume`).
    """
    from rft_ds.recipe import run

    if isinstance(config, (str, Path)):
        config = RFTRunConfig.load_yaml(config)
    elif isinstance(config, dict):
        config = RFTRunConfig.from_dict(config)
    elif isinstance(config, RFTRunConfig):
        validate(config)
    else:
        raise ConfigError(f"config must be an RFTRunConfig, a dict or a YAML path, got {type(config).__name__}")
    if resume is not None:
        config.train.resume = str(resume)
    return run(config, reward_fn, prompts, eval_prompts, metric_fn, stop_sequences)
