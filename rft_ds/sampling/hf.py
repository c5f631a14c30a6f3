"""Baseline sampler: HF `generate` on the DeepSpeed ZeRO-3 module itself.

Under ZeRO-3 every forward gathers parameter shards collectively, so ranks must stay in lockstep:
`synced_gpus=True` keeps a finished rank stepping until all are done, and every rank makes the same
number of generate calls (a rank short of prompts generates a throwaway batch).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from rft_ds import distributed as D
from rft_ds.sampling.base import Completion, end_ids, finish_completion, seeded

# Defaults that make HF sample like vLLM does (HF's own default top_k=50 would silently truncate).
_HF_DEFAULTS = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


class HFSampler:
    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 16,
        stop_sequences: Sequence[str] = (),
        device: torch.device | str | None = None,
    ) -> None:
        self.module = module
        self.device = torch.device(device) if device is not None else D.device()  # where the module computes
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_sequences = list(stop_sequences)
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = end_ids(
            tokenizer.eos_token_id,
            getattr(getattr(module, "config", None), "eos_token_id", None),
            getattr(getattr(module, "generation_config", None), "eos_token_id", None),
        )

    def _n_calls(self, n_prompts: int) -> int:
        return D.max_over_ranks(math.ceil(n_prompts / self.batch_size))

    @torch.no_grad()
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
        """See Sampler.generate. `logprobs` is ignored: this sampler is the training model itself, so its
        weights cannot be stale; so is keep_cache (nothing is cached between calls). Per-prompt max_new_tokens:
        a batch generates up to its largest, and each completion is cut at its own."""
        from rft_ds.progress import bar

        kwargs = {**_HF_DEFAULTS, **gen_kwargs}
        if not kwargs["do_sample"]:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
        was_training = self.module.training
        self.module.eval()
        results: list[list[Completion]] = []
        dummy = [[self.pad_id if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id]]
        with seeded(seed):  # the training RNG is left as it was
            for c in bar(range(self._n_calls(len(prompts))), desc=progress or "", show=bool(progress), unit="batch"):
                lo, hi = c * self.batch_size, (c + 1) * self.batch_size
                batch = list(prompts[lo:hi])
                real = len(batch)
                limits = list(max_new_tokens[lo:hi]) if max_new_tokens is not None else []
                batch_kwargs = {**kwargs, "max_new_tokens": max(limits)} if limits else kwargs
                out = self._generate_batch(batch or dummy, n, batch_kwargs).cpu()
                for i in range(real):
                    cut = limits[i] if limits else None
                    results.append(
                        [
                            finish_completion(
                                out[i * n + j][:cut].tolist(), self.eos_ids, self.stop_sequences, self.tokenizer.decode
                            )
                            for j in range(n)
                        ]
                    )
        if was_training:
            self.module.train()
        return results

    def _generate_batch(self, batch: list[Sequence[int]], n: int, kwargs: dict[str, Any]) -> torch.Tensor:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, so every row's completion starts at column `width`
            ids[i, width - len(p) :] = torch.as_tensor(np.asarray(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.module.generate(
            input_ids=ids,
            attention_mask=mask,
            num_return_sequences=n,
            synced_gpus=D.is_dist() and D.world_size() > 1,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            **kwargs,
        )
        return out[:, width:]
