"""`python -m rft_ds.export CKPT OUT`: a checkpoint's ZeRO-3 shards -> a plain HF model directory.

Runs offline on one CPU process (no launcher, no GPU): DeepSpeed's zero_to_fp32 consolidates the fp32
master weights, which are then loaded into the model class from the checkpoint's saved config and written
as safetensors with the tokenizer and generation config. The result loads in
`AutoModelForCausalLM.from_pretrained` and in `vllm.LLM`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rft_ds.checkpoint import CheckpointError, replacing_dir, verify


def resolve(ckpt: str | Path) -> Path:
    """A checkpoint directory, or a checkpoints/ root (then the one `latest` names)."""
    ckpt = Path(ckpt)
    if (ckpt / "latest").is_file() and not (ckpt / "manifest.json").exists():
        ckpt = ckpt / (ckpt / "latest").read_text().strip()
    if (ckpt / "checkpoints" / "latest").is_file():  # an output_dir
        return resolve(ckpt / "checkpoints")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    problem = verify(ckpt)
    if problem:
        raise CheckpointError(f"{ckpt}: not a complete rft_ds checkpoint: {problem}")
    return ckpt


def export(ckpt: str | Path, out: str | Path) -> Path:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt, out = resolve(ckpt), Path(out)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    trust = _trusts_remote_code(ckpt)
    if (ckpt / "hf" / "adapter_config.json").is_file():
        return _export_lora(ckpt, out, state, trust)
    config = AutoConfig.from_pretrained(ckpt / "hf", trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match the model config (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    if tied:
        model.tie_weights()
    with replacing_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(ckpt / "hf", trust_remote_code=trust).save_pretrained(tmp)
        if (ckpt / "hf" / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    return out


def _trusts_remote_code(ckpt: Path) -> bool:
    """The run's model.trust_remote_code, from the checkpoint's own config: export loads what training did."""
    from rft_ds.checkpoint import read_meta

    return bool(((read_meta(ckpt).get("config") or {}).get("model") or {}).get("trust_remote_code"))


def _export_lora(ckpt: Path, out: Path, state: dict, trust: bool = False) -> Path:
    """A LoRA checkpoint holds the adapters only: the base model (the adapter config's
    base_model_name_or_path, the run's model.model_path) plus the checkpoint's fp32 adapters, merged."""
    import torch
    from peft import PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    pc = PeftConfig.from_pretrained(ckpt / "hf")
    base = Path(pc.base_model_name_or_path or "")
    if not (base / "config.json").is_file():
        raise CheckpointError(
            f"{ckpt}: a LoRA checkpoint needs its base model, and {base} (the run's "
            "model.model_path) is not a model directory"
        )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust), pc)
    lora = {k for k, _ in model.named_parameters() if "lora_" in k}
    missing = sorted(lora - set(state))
    if missing or set(state) - lora:
        raise CheckpointError(
            f"{ckpt}: the adapters do not match the LoRA config (missing {missing[:3]}, "
            f"unexpected {sorted(set(state) - lora)[:3]})"
        )
    model.load_state_dict(state, strict=False)
    with replacing_dir(out) as tmp:
        model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(ckpt / "hf", trust_remote_code=trust).save_pretrained(tmp)
        if (ckpt / "hf" / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export an rft_ds checkpoint as a Hugging Face model directory.")
    ap.add_argument("checkpoint", help="a checkpoint dir, a checkpoints/ dir (uses latest) or a run's output_dir")
    ap.add_argument("out", help="where to write the HF model directory")
    args = ap.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out))
    except CheckpointError as e:
        print(f"rft_ds.export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
