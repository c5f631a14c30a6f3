"""ZeRO-3 -> vLLM weight hand-off, and the parity check that proves it happened.

Parameters are gathered a bounded bucket at a time (`GatheredParameters` over a few of them; every rank
enters every gather, since gathering is collective) and streamed as (hf_name, tensor) pairs into the
local engine's `reload_weights`, in memory, never through the disk. The yielded tensors are copies:
vLLM may hold a layer's weights until the whole layer has arrived, past the gather's release.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rft_ds import distributed as D


class ParityError(RuntimeError):
    """The engine's log-probabilities differ from the trained model's: it would sample stale weights."""


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the full size in ds_numel


def make_buckets(named_params: Sequence[tuple[str, torch.nn.Parameter]], bucket_bytes: int,
                 bytes_per_elem: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters grouped up to bucket_bytes (a larger parameter gets a bucket of its own)."""
    buckets: list[list[tuple[str, torch.nn.Parameter]]] = []
    size = 0
    for name, p in named_params:
        nbytes = _numel(p) * bytes_per_elem
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += nbytes
    return buckets


@dataclass
class SyncStats:
    seconds: float = 0.0
    bytes: int = 0  # bytes handed to the engine
    peak_extra_bytes: int = 0  # most bytes held at once by the sync: gathered bucket + copies still alive
    n_buckets: int = 0


class WeightSync:
    def __init__(self, module: torch.nn.Module, sampler: Any, bucket_mb: float, dtype: torch.dtype) -> None:
        self.module = module
        self.sampler = sampler
        self.dtype = dtype
        elem = torch.empty(0, dtype=dtype).element_size()
        gather_elem = max(elem, next(module.parameters()).element_size())
        self.buckets = make_buckets(list(module.named_parameters()), int(bucket_mb * 2**20), gather_elem)
        self.stats = SyncStats()
        self.n_syncs = 0

    def _weights(self, stats: SyncStats) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        alive = [0]

        def release(n: int) -> None:
            alive[0] -= n

        for bucket in self.buckets:
            params = [p for _, p in bucket]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                gathered = sum(p.numel() * p.element_size() for p in params)
                for name, p in bucket:
                    t = p.data.detach().to(self.dtype, copy=True)
                    n = t.numel() * t.element_size()
                    alive[0] += n
                    weakref.finalize(t, release, n)
                    stats.peak_extra_bytes = max(stats.peak_extra_bytes, gathered + alive[0])
                    stats.bytes += n
                    yield name, t
                    del t
            stats.n_buckets += 1

    def sync(self) -> SyncStats:
        """Hand the current trained weights to the engine. Collective: every rank calls it."""
        stats = SyncStats()
        t = time.perf_counter()
        weights = self._weights(stats)
        self.sampler.load_weights(weights)
        for _ in weights:  # an engine that stopped early must not leave this rank short of gathers
            pass
        stats.seconds = time.perf_counter() - t
        self.stats = stats
        self.n_syncs += 1
        return stats


def model_logprobs(module: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> list[np.ndarray]:
    """log p(token_t | tokens_<t) for t >= 1 under the (ZeRO-3) training model. Collective forward."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s))
        mask[i, : len(s)] = 1
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    if was_training:
        module.train()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return [logp[i, : len(s) - 1].numpy() for i, s in enumerate(sequences)]


def parity_check(module: torch.nn.Module, sampler: Any, probes: Sequence[Sequence[int]], completion_len: int,
                 tolerance: float, pad_id: int, probe_texts: Sequence[str] = ()) -> float:
    """Greedy-complete each probe with the engine, then compare the engine's and the model's log-probs of
    that completion. Returns the largest |difference|; raises ParityError (on every rank) past tolerance."""
    with D.all_ranks_or_fail("weight sync parity check (engine)"):  # local work only
        comps = sampler.generate(probes, 1, {"max_new_tokens": completion_len, "do_sample": False}, seed=0)
        seqs = [list(p) + c[0].token_ids for p, c in zip(probes, comps)]
        engine = sampler.prompt_logprobs(seqs)
    model = model_logprobs(module, seqs, pad_id)  # collective ZeRO-3 forward: every rank, same count
    worst = 0.0
    with D.all_ranks_or_fail("weight sync parity check"):
        for i, (p, e, m) in enumerate(zip(probes, engine, model)):
            start = len(p) - 1  # log-probs of the completion tokens only
            diff = float(np.max(np.abs(e[start:] - m[start:]))) if len(e) > start else 0.0
            worst = max(worst, diff)
            if not diff <= tolerance:
                name = repr(probe_texts[i][:40]) if i < len(probe_texts) else f"#{i}"
                raise ParityError(f"weight sync parity check failed on probe {i} ({name}): max |logprob diff| "
                                  f"{diff:.3g} > tolerance {tolerance:g}; the engine would sample from stale weights")
    return worst
