"""2 ranks, ZeRO-3 (deepspeed launcher): one optimizer step of Learner.train_step with SGD (lr 1) over rows
split unevenly (rank 0: 3 rows in 2 micro-batches; rank 1: 2 rows and an empty micro-batch), in fp32 and in
bf16, in fp32 with ZeRO-3 fetching per module instead of per transformer block, with LoRA (no gradient
checkpointing) per block and per module, and with a prompt's rows trained as one sequence (fp32, bf16); the
label log-probs through the chunked LM head (the default: one chunk here), in chunks of 2 positions (-chunk2,
recomputed in backward) and without it (-plain); with gradient checkpointing on rank 0's first micro-batch
alone (-gc-some: a plan that differs by micro-batch, the same on every rank) and on every one (-lora-gc-chunk2);
and under sequence parallelism over both ranks (-sp2: each rank computes half the positions of all 5 rows, in
micro-batches of 4 rows and of 1 row of odd length, whose shards are padded; -sp2-gc-chunk2 with gradient
checkpointing and the chunked head).
Rank 0 writes the updated weights to OUT/<setting>.pt; the test compares them with one plain-torch step on
the mean loss over every label token of all 5 rows."""

import sys
from pathlib import Path

import numpy as np
import torch

from rft_ds import distributed as D
from rft_ds.experience import build_row
from rft_ds.learner import Learner

# rank 0's first micro-batch holds two rows of one prompt: shared in the *-shared settings (train.share_prompt)
ROWS = [([1, 2, 3], [4, 5, 6, 7], True), ([1, 2, 3], [8], False), ([2, 2], [9, 10, 11, 12, 13, 14], False),
        ([3, 1, 2, 4], [5], True), ([5], [6, 7], False)]


def rows():
    return [build_row(p, c, e, eos_id=2, max_len=64) for p, c, e in ROWS]


def main(model: str, out: str) -> None:
    D.init("gloo", 120)
    for setting in ("fp32", "bf16", "fp32-per-module", "fp32-lora", "fp32-lora-per-module", "fp32-shared",
                    "bf16-shared", "fp32-plain", "fp32-shared-chunk2", "fp32-gc-some", "fp32-lora-gc-chunk2", "fp32-sp2", "fp32-sp2-gc-chunk2"):
        step(model, out, setting)
    D.barrier()
    import torch.distributed as dist

    dist.destroy_process_group()


def step(model: str, out: str, setting: str) -> None:
    dtype = setting.split("-")[0]
    sp = 2 if "-sp2" in setting else 1
    mb = 4 if sp > 1 else 2
    ds = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": 2, "train_batch_size": mb * 4,
          "optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "zero_optimization": {"stage": 3},
          "gradient_clipping": 0.0, "bf16": {"enabled": dtype == "bf16"}, "zero_allow_untested_optimizer": True}
    from rft_ds.lora import LoraSpec

    torch.manual_seed(0)  # the same LoRA A initialisation in every setting
    chunk = 0 if setting.endswith("plain") else 2 if setting.endswith("chunk2") else 1024
    learner = Learner(model, ds, lora=LoraSpec(r=4, alpha=8) if "lora" in setting else None,
                      checkpoint_above=0 if "-gc" in setting else None,
                      block_fetch=not setting.endswith("per-module"), share_prompt="shared" in setting,
                      logprob_chunk=chunk, sequence_parallel=sp)
    assert learner.share_prompt == ("shared" in setting), learner.share_prompt_off
    assert (learner.head is not None) == (chunk > 0), learner.head_off
    all_rows = rows()
    mine = [all_rows[i] for i in ([0, 1, 2] if D.rank() == 0 else [3, 4])]
    micro = [np.array([0, 1]), np.array([2])] if D.rank() == 0 else [np.array([0, 1]), np.array([], np.int64)]
    if sp > 1:  # both ranks: every row, the same micro-batches
        mine, micro = all_rows, [np.array([0, 1, 2, 3]), np.array([4])]
    total = sum(int((r.labels[1:] != -100).sum()) for r in all_rows)
    plan = [True, False] if setting.endswith("gc-some") else [True, True] if "-gc" in setting else None
    stats = learner.train_step(mine, micro, pad_id=0, step_tokens=total, world_size=2, checkpoint=plan)
    assert stats.checkpointed == sum(plan or [])
    state = {}
    for name, p in learner.module.named_parameters():
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            state[name] = p.detach().float().clone()
    tokens = D.all_gather_object(stats.tokens)
    learner.close()
    if D.rank() == 0:
        torch.save({"weights": state, "ce_sum": stats.ce_sum, "tokens": stats.tokens, "blocks": learner.zero3_blocks,
                    "tokens_per_rank": tokens},
                   Path(out) / f"{setting}.pt")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
