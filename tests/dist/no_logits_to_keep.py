"""1 rank (torchrun): a model with its own code whose forward takes neither logits_to_keep nor **kwargs (as
remote-code models written before that keyword existed). The learner must train on it and compute the
stale-weight check's log-probs from full logits, and match the same weights under transformers' own class.
Prints HEAD_OFF <reason>, LOSS <value> and MAX_DIFF <|log p own - log p llama|>."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from rft_ds import distributed as D
from rft_ds.config import TrainConfig
from rft_ds.experience import build_row
from rft_ds.learner import Learner, fill_ds_config, load_ds_config

FORWARD = '''
from transformers import LlamaForCausalLM

from .configuration_oldtoy import OldToyConfig


class OldToyForCausalLM(LlamaForCausalLM):
    config_class = OldToyConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache)
'''


def own_code(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "configuration_oldtoy.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass OldToyConfig(LlamaConfig):\n    model_type = 'old_toy'\n"
    )
    (dst / "modeling_oldtoy.py").write_text(FORWARD)
    c = json.loads((dst / "config.json").read_text())
    c.update(model_type="old_toy", architectures=["OldToyForCausalLM"],
             auto_map={"AutoConfig": "configuration_oldtoy.OldToyConfig",
                       "AutoModelForCausalLM": "modeling_oldtoy.OldToyForCausalLM"})
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def main(model: str, ds_path: str, work: str) -> None:
    D.init("gloo", 120)
    ds = fill_ds_config(load_ds_config(ds_path), TrainConfig(micro_batch_size=2, learning_rate=0.0), 1)
    row = build_row([5, 6, 7, 8], [9, 10, 11, 12], True, 2, 64)
    row.ref_logprobs = np.zeros(int((row.labels[1:] != -100).sum()), np.float32)
    own = Learner(str(own_code(model, Path(work) / "own")), ds, trust_remote_code=True)
    print(f"HEAD_OFF {own.head_off}")
    stats = own.train_step([row, row], [np.array([0, 1])], 0, 2 * int((row.labels != -100).sum()), 1)
    print(f"LOSS {stats.losses[-1]}")
    a = own.probe_diffs([row], 0, 1)  # |log p - 0| = -log p of each label token
    b = Learner(model, ds).probe_diffs([row], 0, 1)  # the same weights (lr 0) through transformers' own class
    print(f"MAX_DIFF {float(np.abs(a - b).max())}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
