"""1 rank (torchrun): a ZeRO-3 learner with LoRA dropout 0.5, after one update (so the adapters add something).
The stale-weight check's forward (Learner.probe_diffs) must be deterministic, as it runs in eval mode where
peft's lora_dropout is off, while a training-mode forward of the same row is not. Prints PROBE_EQUAL and
TRAIN_DIFFERS as 0/1."""

import sys

import numpy as np
import torch

from rft_ds import distributed as D
from rft_ds.config import TrainConfig
from rft_ds.experience import build_row
from rft_ds.learner import Learner, fill_ds_config, load_ds_config
from rft_ds.lora import LoraSpec


def main(model: str, ds_path: str) -> None:
    D.init("gloo", 120)
    ds = fill_ds_config(load_ds_config(ds_path), TrainConfig(micro_batch_size=2, learning_rate=0.05), 1)
    learner = Learner(model, ds, LoraSpec(r=4, alpha=8, dropout=0.5))
    row = build_row([5, 6, 7, 8], [9, 10, 11, 12, 13, 14], True, 2, 64)
    learner.train_step([row, row], [np.array([0, 1])], 0, 2 * int((row.labels != -100).sum()), 1)
    row.ref_logprobs = np.zeros(int((row.labels[1:] != -100).sum()), np.float32)
    a, b = learner.probe_diffs([row], 0, 1), learner.probe_diffs([row], 0, 1)
    ids = torch.from_numpy(row.input_ids[None]).to(learner.device)
    learner.engine.train()
    with torch.no_grad():
        x, y = (learner.engine(input_ids=ids, use_cache=False).logits for _ in range(2))
    print(f"PROBE_EQUAL {int(np.array_equal(a, b))}")
    print(f"TRAIN_DIFFERS {int(not torch.equal(x, y))}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
