"""2 ranks over gloo: the same ZeRO-3 model written as an HF directory by one writer (the default for a small
model) and by both ranks in parallel (min_share_bytes=1). Rank 0 loads both and writes what it found to
OUT_DIR/result.json for tests/test_checkpoint.py."""

import sys
from pathlib import Path

import torch


def main(model_path: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    from rft_ds import distributed as D
    from rft_ds.learner import Learner

    D.init("gloo", 300)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    learner = Learner(model_path, ds)
    x = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(D.rank()))
    learner.engine.backward(learner.engine(input_ids=x, labels=x).loss)
    learner.engine.step()  # trained weights, not the files': what is written must be the gathered ones
    tok = AutoTokenizer.from_pretrained(model_path)
    out = Path(out_dir)
    learner.save_hf(out / "one", tok, D.is_main(), extra={"mark.json": {"run": 1}})
    learner.save_hf(out / "both", tok, D.is_main(), extra={"mark.json": {"run": 1}}, min_share_bytes=1)
    D.barrier()  # rank 0 returns from the second save_hf with both_model/ in place

if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
