"""Sequence parallelism (train.sequence_parallel = k): a row too long for one device's activations trains on k
ranks at once, each holding a contiguous 1/k of its positions (DeepSpeed's Ulysses, as in ALST).

Every layer but attention is per token, so each rank runs it on its own positions. Attention swaps the
split in an all-to-all: each rank gets every position for 1/k of the heads, attends causally over the whole
row, and swaps back; activations per rank are 1/k of a row's. The k ranks of a group (ranks gk ... gk+k-1)
train the same rows, so the data-parallel size is world / k. Label log-probs need no exchange: the labels
are shifted before the split (position t predicts token t+1 even when that token lies on the next rank),
and each rank's loss is its positions' cross-entropy over the step's label tokens (Learner.train_step).

DeepSpeed is not told (no mpu): to ZeRO-3 every rank is data parallel, which is what it should do here:
parameters partitioned over all ranks, and gradients summed over all of them (averaged, then scaled back by
Learner.train_step), the sum of every rank's share of the loss: the gradient of the whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rft_ds.experience import IGNORE_INDEX, Row, collate

ATTENTION = "rft_ds_ulysses"  # the attention implementation the learner's model runs under sequence parallelism


@dataclass(frozen=True)
class SPGroup:
    size: int  # ranks per group (train.sequence_parallel)
    rank: int  # this rank's place in its group: which shard of each row it computes
    group: Any = None  # its torch.distributed process group


def why_not(model_config: dict, size: int) -> str | None:
    """Why train.sequence_parallel=size cannot run this model (from its config.json, before it loads), or None.
    Ulysses splits the heads over the group: query heads must divide, key/value heads divide or be
    replicated (fewer of them than ranks). It attends with plain causal sdpa over the whole row, so a model
    whose attention is anything else (a sliding window, chunks, layers of several kinds) would train on
    other attention than it samples with: refused. Pure."""
    if size == 1:
        return None
    if model_config.get("sliding_window") and model_config.get("use_sliding_window", True):
        return (
            f"its sliding-window attention (sliding_window {model_config['sliding_window']}) would run as "
            "full attention"
        )
    if any(t != "full_attention" for t in model_config.get("layer_types") or []):
        return "its layers of other attention than full (layer_types) would run as full attention"
    if model_config.get("attention_chunk_size"):
        return "its chunked attention (attention_chunk_size) would run as full attention"
    heads = model_config.get("num_attention_heads")
    kv = model_config.get("num_key_value_heads") or heads
    if not heads:
        return "the model's config.json has no num_attention_heads"
    if heads % size:
        return f"the model's {heads} attention heads do not split over {size} ranks"
    if kv % size and size % kv:
        return f"the model's {kv} key/value heads neither split over {size} ranks nor divide {size}"
    return None


def positions_of_rank(rows: Sequence[Row], pad_id: int, size: int, rank: int) -> dict[str, np.ndarray]:
    """This rank's positions of a micro-batch: the rows right-padded to a multiple of `size`, cut into `size`
    contiguous shards. Returns input_ids, position_ids (the row's own positions: attention is causal over
    them) and targets, the token each position predicts (labels shifted by one *before* the cut, so the
    last position of a shard predicts the first token of the next; IGNORE_INDEX where there is no label).
    No attention mask: right padding comes after every real token, so causal attention never reaches it.
    Pure."""
    batch = collate(rows, pad_id)
    width = -(-batch["input_ids"].shape[1] // size) * size
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    ids[:, : batch["input_ids"].shape[1]] = batch["input_ids"]
    targets[:, : batch["labels"].shape[1] - 1] = batch["labels"][:, 1:]
    positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    part = slice(rank * width // size, (rank + 1) * width // size)
    return {"input_ids": ids[:, part], "position_ids": positions[:, part], "targets": targets[:, part]}


_GROUPS: dict[int, SPGroup] = {}


def group(size: int) -> SPGroup:
    """Collective (the first time for a size): this rank's sequence-parallel group of `size` consecutive ranks.
    Every rank creates every group, in the same order (torch.distributed.new_group's rule); kept for the
    process, so a rebuilt learner (method.restart_from_base) reuses it."""
    import torch.distributed as dist

    if size not in _GROUPS:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = None
        for g in range(world // size):
            ranks = list(range(g * size, (g + 1) * size))
            made = dist.new_group(ranks)
            if rank in ranks:
                mine = made
        _GROUPS[size] = SPGroup(size, rank % size, mine)
    return _GROUPS[size]


def install(model: Any, sp: SPGroup) -> None:
    """The model's attention becomes Ulysses over `sp` (registered under ATTENTION, for this model alone: a
    reward model or sampler in the same process keeps its own). Ulysses' core is sdpa, causal, without a
    mask (shard). In eval mode each rank attends over its own whole rows instead, as without sequence
    parallelism: the stale-weight check's forwards (Learner.probe_diffs) and the start-up checks, without
    gradients, run per rank on rows the group does not share. One Ulysses module per batch size seen: it
    checks shapes against a fixed batch size."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = model.config.get_text_config()
    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    by_batch: dict[int, Any] = {}

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any):
        b = query.shape[0]
        if b not in by_batch:
            by_batch[b] = UlyssesSPAttentionHF(
                core,
                batch_size=b,
                attn_head_count=cfg.num_attention_heads,
                attn_head_size=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                kv_head_count=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                num_hidden_layers=cfg.num_hidden_layers,
                process_group=sp.group,
                seq_length_is_variable=True,
                disable_in_eval=True,
            )
        groups = getattr(module, "num_key_value_groups", None)
        try:
            return by_batch[b](module, query, key, value, None, *args, **kwargs)
        finally:  # Ulysses rewrites it when it replicates key/value heads; eval forwards (no Ulysses) need it
            if groups is not None:
                module.num_key_value_groups = groups

    AttentionInterface.register(ATTENTION, attention)
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:
        raise RuntimeError(
            f"{type(model).__name__} kept attention {model.config._attn_implementation!r}: "
            "train.sequence_parallel needs a model whose attention follows transformers' "
            "AttentionInterface"
        )
