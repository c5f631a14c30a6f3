"""The sampler contract, shared by the HF-generate baseline and the colocated vLLM sampler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np


@dataclass
class Completion:
    token_ids: np.ndarray  # int32, without the EOS token; including a matched stop sequence
    finish_reason: str  # "eos" | "stop" (a stop sequence) | "length"
    # The sampler's log p of each generated token (the EOS too, when it ended by EOS), float32, when asked for:
    # the stale-weight check compares them with the training model's. None when not asked or not available.
    logprobs: np.ndarray | None = None
    # The id that ended it, when it ended by EOS (a chat model's end-of-turn token may differ from the tokenizer's
    # EOS: Gemma's <end_of_turn>, Llama 3's <|eom_id|>): a rollout keeps the token the model sampled.
    end_id: int | None = None

    @property
    def eos(self) -> bool:
        return self.finish_reason == "eos"


class Sampler(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        gen_kwargs: dict[str, Any],
        seed: int,
        progress: str | None = None,
        logprobs: bool | Sequence[bool] = False,
        max_new_tokens: Sequence[int] | None = None,
        keep_cache: bool = False,
    ) -> list[list[Completion]]:
        """n completions for each prompt (token ids in, token ids out), in prompt order; `progress`: the
        label of a progress bar to show (None: none); `logprobs` (for all prompts, or per prompt): also return
        each sampled token's log-probability (a sampler with its own copy of the weights; others may return
        None). max_new_tokens: a limit per prompt (a rollout's turns: what is left of rollout.max_tokens) in
        place of gen_kwargs'; keep_cache: reuse the prefix cache of the calls before (a rollout's later turns).

        Every rank calls it the same number of times, even with no prompts of its own (it may be
        collective). A sampler with its own copy of the weights also has load_weights(iterator),
        fed by rft_ds.weight_sync after every training epoch."""
        ...


def end_ids(tokenizer_eos: int | None, *declared: Any) -> set[int]:
    """Every token id that ends a completion: the tokenizer's EOS and each eos_token_id the model declares
    (config.json's, generation_config.json's; an int or a list). Chat models end a turn with a token other than
    the tokenizer's EOS (Llama 3's <|eot_id|>, Qwen's <|endoftext|> beside <|im_end|>), and vLLM stops on every
    id generation_config.json names: one missing here would stay in the completion, and its row would end with
    that token and then the EOS."""
    ids: set[int] = set()
    for d in (tokenizer_eos, *declared):
        ids.update(int(x) for x in (d if isinstance(d, (list, tuple)) else [d]) if x is not None)
    return ids


def declared_eos(model_dir: str | Path) -> list[Any]:
    """The eos_token_id of config.json and of generation_config.json in a local model directory (a file that is
    absent, or has none, adds nothing)."""
    import json

    found = []
    for name in ("config.json", "generation_config.json"):
        try:
            found.append(json.loads((Path(model_dir) / name).read_text()).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):
            pass
    return found


def finish_completion(ids: Sequence[int], eos_ids: set[int], stop_sequences: Sequence[str], decode: Any) -> Completion:
    """Cut raw generated ids at the first EOS or stop sequence and name why the completion ended."""
    ids = list(ids)
    end_id = None
    for i, t in enumerate(ids):
        if t in eos_ids:
            ids, end_id = ids[:i], int(t)
            break
    if stop_sequences:
        text = decode(ids)
        hits = [text.find(s) + len(s) for s in stop_sequences if s in text]
        if hits:
            end = min(hits)
            # the shortest prefix of tokens whose text contains the stop sequence
            for j in range(1, len(ids) + 1):
                if len(decode(ids[:j])) >= end:
                    return Completion(np.asarray(ids[:j], dtype=np.int32), "stop")
    return Completion(np.asarray(ids, dtype=np.int32), "eos" if end_id is not None else "length", end_id=end_id)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Sample from `seed` without touching the training RNG: torch's generators (CPU, and this rank's GPU)
    are saved, seeded and restored afterwards. Training randomness (dropout) then comes only from the RNG
    state a checkpoint restores, so sampling, a parity check or an eval never re-seeds it and a resumed run
    continues exactly as the uninterrupted one."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
