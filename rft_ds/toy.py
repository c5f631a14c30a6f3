"""A toy task and a tiny model that the project builds locally, so runs and tests need no hub.

Task ("say the letter"): the prompt ends with ``say <c>:``; the reward is the fraction of the
completion's letters that equal ``c``. It is exactly verifiable, dense enough that a randomly
initialised model has something to select, and conditional on the prompt, so the model must learn
to read it rather than collapse onto one letter.
"""

from __future__ import annotations

import argparse
import os
import random
import string
from pathlib import Path
from typing import Any

from rft_ds.locked_build import build_once, tmp_path

LETTERS = string.ascii_lowercase
_ALPHABET = LETTERS + string.digits + " :.,-?!=+"


def make_prompts(n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """Prompts with their target letter as metadata. Train and eval draw from disjoint contexts."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    for _ in range(n):
        ctx_len = 3 if split == "train" else 4  # eval contexts never occur in training
        ctx = "".join(rng.choice(LETTERS) for _ in range(ctx_len))
        target = rng.choice(LETTERS)
        out.append({"prompt": f"{ctx} say {target}:", "target": target})
    return out


def train_prompts(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    return make_prompts(n, seed, "train")


def eval_prompts(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    return make_prompts(n, seed, "eval")


def letter_score(completion: str, target: str) -> float:
    letters = [ch for ch in completion if ch in LETTERS]
    return sum(ch == target for ch in letters) / len(letters) if letters else 0.0


def reward_fn(samples: list[str], prompts: list[str], outputs: list[str], **kwargs: Any) -> list[float]:
    """trlx signature; ``target`` arrives as per-sample metadata."""
    return [letter_score(out, tgt) for out, tgt in zip(outputs, kwargs["target"])]


def metric_fn(samples: list[str], prompts: list[str], outputs: list[str], **kwargs: Any) -> dict[str, float]:
    scores = reward_fn(samples, prompts, outputs, **kwargs)
    return {"frac_mostly_target": sum(s > 0.5 for s in scores) / max(len(scores), 1)}


class HintEnv:
    """The toy task in two turns (rollout.env: "rft_ds.toy:HintEnv"), for the multi-turn tests. The prompt hides
    the letter (``abc hint:``); whatever the model says first, the environment answers `` say c:``, and the
    second turn is scored as the single-turn task. The model must end its first turn, then read the letter
    from the environment's text: its own tokens are trained, the hint is context only."""

    def __init__(self) -> None:
        self.target = ""
        self.turns = 0

    def reset(self, prompt: str, target: str = "", **metadata: Any) -> str:
        self.target, self.turns = target, 0
        return prompt.split(" say ")[0] + " hint:"

    def step(self, model_turn: str) -> tuple[str | None, float | None, bool]:
        self.turns += 1
        if self.turns == 1:
            return f" say {self.target}:", None, False
        return None, letter_score(model_turn, self.target), True


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [p["prompt"] for p in make_prompts(2000, seed, "train") + make_prompts(500, seed, "eval")]
    lines += ["".join(rng.choice(_ALPHABET) for _ in range(40)) for _ in range(2000)]
    lines += [c * rng.randint(1, 12) for c in LETTERS for _ in range(20)]
    return lines


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 128, seed: int = 0):
    """Byte-level BPE over the task's alphabet only: a small vocabulary keeps random sampling useful.
    128 entries: a multiple of 64, so vLLM does not pad the embedding (a padded one is held in memory
    for the whole weight sync, as its load never looks complete)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(
        {c for s in _corpus(seed) for c in byte_level.pre_tokenize_str(s)[0][0]}
        | {c for s in _corpus(seed) for w, _ in byte_level.pre_tokenize_str(s) for c in w}
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"toy tokenizer has {tok.get_vocab_size()} entries, wanted {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", model_max_length=256
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    **config_overrides,
) -> Path:
    """A randomly initialised Llama whose head_dim (32) vLLM-CPU can serve, plus its tokenizer.
    config_overrides (e.g. SmolLM2's shapes, for benchmarks) replace LlamaConfig fields."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tmp = tmp_path(out)
    tok = build_tokenizer(tmp, seed=seed)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    for k, v in config_overrides.items():
        setattr(config, k, v)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a concurrent reader sees a whole model directory or none
    return out


def ensure_tiny_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build once per file system: every rank may call it at once, on any node (rft_ds.locked_build)."""
    return build_once(
        path,
        lambda p: (p / "config.json").exists(),
        lambda p: build_tiny_model(p, seed=seed),
        f"the tiny model at {path}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the tiny toy model and tokenizer.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(ensure_tiny_model(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
