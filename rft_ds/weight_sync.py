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
from rft_ds.lora import FUSED, SyncItem, merged, sync_items


class ParityError(RuntimeError):
    """The engine's log-probabilities differ from the trained model's: it would sample stale weights."""


class StaleWeightsError(ParityError):
    """The engine sampled from other weights than the ones the learner trains from."""


def check_stale_weights(stats: Any, tolerance: float, enforce: bool = True) -> dict:
    """Every grow step: the engine's log p of the tokens it sampled vs the training model's log p of the same
    tokens in its first forward (rft_ds.learner.TrainStats, one per rank). All-gathers three numbers per
    rank; returns the metrics; raises StaleWeightsError on every rank when the mean difference exceeds
    the tolerance (unless enforce is False: a model with dropout has a noisy training forward)."""
    per_rank = D.all_gather_object((stats.logprob_abs_sum, stats.logprob_abs_max, stats.logprob_tokens))
    n = sum(c for *_, c in per_rank)
    if n == 0:  # nothing this rank sampled reached a first step this epoch (or no rows at all)
        return {"stale_logprob_tokens": 0}
    mean, worst = sum(s for s, *_ in per_rank) / n, max(m for _, m, _ in per_rank)
    if enforce and not mean <= tolerance:
        raise StaleWeightsError(
            f"stale weights: the engine's log-probabilities of {n} sampled tokens differ from the training "
            f"model's by {mean:.3g} on average (max {worst:.3g}) > sampler.stale_tolerance {tolerance:g}; the "
            "engine is sampling from weights the learner does not have (a sync or wake-up that did not land)"
        )
    return {"stale_logprob_mean_diff": mean, "stale_logprob_max_diff": worst, "stale_logprob_tokens": n}


def _numel(x: Any) -> int:
    """Elements of a parameter (ZeRO-3 keeps the full size in ds_numel) or of all of a SyncItem's."""
    if isinstance(x, SyncItem):
        return sum(_numel(p) for p in x.params)
    return int(getattr(x, "ds_numel", x.numel()))


def make_buckets(
    named_params: Sequence[tuple[str, Any]], bucket_bytes: int, bytes_per_elem: int
) -> list[list[tuple[str, Any]]]:
    """Consecutive parameters (or SyncItems) grouped up to bucket_bytes (a larger one gets a bucket of its own)."""
    buckets: list[list[tuple[str, Any]]] = []
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
    """Streams the module's weights into the engine: every parameter, or for a LoRA model (rft_ds.lora) the
    merged adapted weights, with the frozen ones on the first sync only, and again whenever the engine has
    dropped its weights since (GPU sleep mode level 2: `sampler.weights_dropped`), or they would be lost."""

    def __init__(self, module: torch.nn.Module, sampler: Any, bucket_mb: float, dtype: torch.dtype) -> None:
        self.module = module
        self.sampler = sampler
        self.dtype = dtype
        elem = torch.empty(0, dtype=dtype).element_size()
        gather_elem = max(elem, next(module.parameters()).element_size())
        # the modules the engine fuses with an adapted one go with it (its own list when it has one)
        items = sync_items(module, sampler.fused_groups() if hasattr(sampler, "fused_groups") else FUSED)
        self.first_buckets = make_buckets([(i.name, i) for i in items], int(bucket_mb * 2**20), gather_elem)
        self.later_buckets = make_buckets(
            [(i.name, i) for i in items if not i.static], int(bucket_mb * 2**20), gather_elem
        )
        self.stats = SyncStats()
        self.n_syncs = 0

    def _weights(self, stats: SyncStats, full: bool) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        from rft_ds.faults import maybe_corrupt

        alive = [0]

        def release(n: int) -> None:
            alive[0] -= n

        for bucket in self.first_buckets if full else self.later_buckets:
            params = [p for _, item in bucket for p in item.params]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                gathered = sum(p.numel() * p.element_size() for p in params)
                for name, item in bucket:
                    t = merged(item).detach()
                    t = t.to(self.dtype, copy=item.scale is None)  # a merged tensor is already a new one
                    maybe_corrupt(self.n_syncs + 1, stats.bytes == 0, t)  # tests only: RFT_DS_CORRUPT_SYNC
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
        # every weight when the engine holds none of ours: the first sync, or after it dropped them (sleep level 2)
        weights = self._weights(stats, self.n_syncs == 0 or bool(getattr(self.sampler, "weights_dropped", False)))
        with D.all_ranks_or_fail("weight sync"):  # an engine that failed on one rank stops every rank
            try:
                self.sampler.load_weights(weights)
            finally:
                for _ in weights:  # an engine that stopped early (or raised) must not leave gathers unmatched
                    pass
        stats.seconds = time.perf_counter() - t
        self.stats = stats
        self.n_syncs += 1
        return stats


def model_logprobs(
    module: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> list[np.ndarray]:
    """log p(token_t | tokens_<t) for t >= 1 under the (ZeRO-3) training model, whose inputs go to `device`
    (default: this rank's). Collective forward."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s))
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device or D.device()), mask.to(device or D.device())
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    if was_training:
        module.train()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0].cpu().numpy()
    return [logp[i, : len(s) - 1] for i, s in enumerate(sequences)]


def parity_check(
    module: torch.nn.Module,
    sampler: Any,
    probes: Sequence[Sequence[int]],
    completion_len: int,
    tolerance: float,
    pad_id: int,
    probe_texts: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> float:
    """Greedy-complete each probe with the engine, then compare the engine's and the model's log-probs of
    that completion. Returns the largest |difference|; raises ParityError (on every rank) past tolerance."""
    with D.all_ranks_or_fail("weight sync parity check (engine)"):  # local work only
        comps = sampler.generate(probes, 1, {"max_new_tokens": completion_len, "do_sample": False}, seed=0)
        seqs = [list(p) + c[0].token_ids.tolist() for p, c in zip(probes, comps)]
        engine = sampler.prompt_logprobs(seqs)
    model = model_logprobs(module, seqs, pad_id, device)  # collective ZeRO-3 forward: every rank, same count
    worst = 0.0
    with D.all_ranks_or_fail("weight sync parity check"):
        for i, (p, e, m) in enumerate(zip(probes, engine, model)):
            start = len(p) - 1  # log-probs of the completion tokens only
            diff = float(np.max(np.abs(e[start:] - m[start:]))) if len(e) > start else 0.0
            worst = max(worst, diff)
            if not diff <= tolerance:
                name = repr(probe_texts[i][:40]) if i < len(probe_texts) else f"#{i}"
                raise ParityError(
                    f"weight sync parity check failed on probe {i} ({name}): max |logprob diff| "
                    f"{diff:.3g} > tolerance {tolerance:g}; the engine would sample from stale weights"
                )
    return worst
