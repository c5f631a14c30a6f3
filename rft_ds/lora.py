"""LoRA (peft) under ZeRO-3: the spec and its checks, wrapping the policy, and what the weight sync and the
exports need from a wrapped model.

The engine always receives merged weights, W + (alpha / r) * B @ A per adapted module, under the base
model's own names: vLLM serves a plain model at full speed, with no adapter files and no LoRA kernels.
Frozen weights never change, so after the first sync only the adapted modules are sent (with the modules
vLLM fuses them with, see FUSED), plus every 1-D tensor (norms and biases: a few KB, and vLLM warns about
each layer it does not receive).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rft_ds.errors import ConfigError

LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
PREFIX = "base_model.model."  # what PeftModel puts before the base model's parameter names
ADAPTER = "default"
# vLLM fuses these HF modules into one layer (qkv_proj, gate_up_proj) and reprocesses a layer only when all
# of it has arrived: a sync that sent q_proj alone would leave k and v uninitialised. So an adapted member
# brings its whole group.
# what vLLM fuses into one parameter in Llama-like models (qkv_proj, gate_up_proj); a vLLM engine says its own
# model's (VLLMSampler.fused_groups: its packed_modules_mapping), for other families
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # peft's: a list of module names (suffixes) or "all-linear"

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def parse_lora(d: Any) -> LoraSpec | None:
    """model.lora as a LoraSpec (None: full fine-tuning). Pure; one-line ConfigError naming the field."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"model.lora must be a mapping with {', '.join(LORA_KEYS)} (or null), got {d!r}")
    unknown = sorted(set(d) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key 'model.lora.{unknown[0]}' (valid: {', '.join(LORA_KEYS)})")
    spec = LoraSpec(**d)
    if isinstance(spec.r, bool) or not isinstance(spec.r, int) or spec.r < 1:
        raise ConfigError(f"model.lora.r must be an int >= 1, got {spec.r!r}")
    if isinstance(spec.alpha, bool) or not isinstance(spec.alpha, (int, float)) or not spec.alpha > 0:
        raise ConfigError(f"model.lora.alpha must be > 0, got {spec.alpha!r}")
    if isinstance(spec.dropout, bool) or not isinstance(spec.dropout, (int, float)) or not 0 <= spec.dropout < 1:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {spec.dropout!r}")
    t = spec.target_modules
    if not (t == "all-linear" or (isinstance(t, list) and t and all(isinstance(x, str) and x for x in t))):
        raise ConfigError(
            f"model.lora.target_modules must be 'all-linear' or a non-empty list of module names, got {t!r}"
        )
    return spec


def peft_config(spec: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def check_lora(spec: LoraSpec, model_path: str, trust_remote_code: bool = False) -> None:
    """Before DeepSpeed starts: every target_modules entry names a module of the model, and peft can wrap it.
    The model is built on the meta device from its config: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = [n for n, _ in model.named_modules()]
    if isinstance(spec.target_modules, list):
        for t in spec.target_modules:
            if not any(n == t or n.endswith("." + t) for n in names):
                leaves = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                )
                raise ConfigError(
                    f"model.lora.target_modules: {t!r} matches no module of {model_path} "
                    f"(its linear layers: {', '.join(leaves)})"
                )
    try:
        wrap(model, spec)
    except Exception as e:  # noqa: BLE001 - peft's reasons are many; its first line is what the user needs
        raise ConfigError(
            f"model.lora: peft cannot wrap {type(model).__name__} from {model_path}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def wrap(model: Any, spec: LoraSpec) -> Any:
    """The peft model: base weights frozen, A and B trainable (B starts at zero: the wrapped model equals
    the base model until the first step)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(spec))


def is_peft(module: Any) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def hf_name(name: str) -> str:
    """A peft parameter name -> the base model's (what vLLM and from_pretrained expect)."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    return name.replace(".base_layer.", ".")


def lora_layers(module: Any) -> dict[str, Any]:
    """{module path in the peft model: peft LoRA layer} for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


@dataclass
class SyncItem:
    """One tensor the engine receives: `params[0]` as it is, or merged with its adapter when `scale` is set
    (params = [W, A, B]: W + scale * B @ A). `static` items are sent on the first sync only."""

    name: str
    params: list
    scale: float | None = None
    static: bool = False


def _shape(p: Any) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape


def sync_items(module: Any, fused: Sequence[Sequence[str]] = FUSED) -> list[SyncItem]:
    """What a sync sends, in parameter order (vLLM buffers a layer until all of it arrived: this order
    completes one layer before the next). A plain model: every parameter, every time. A peft model: adapted
    weights merged, every time; frozen matrices on the first sync only; 1-D tensors and the fused siblings
    of adapted modules every time."""
    if not is_peft(module):
        return [SyncItem(n, [p]) for n, p in module.named_parameters()]
    adapted = {}  # id(base weight) -> its LoRA layer
    for layer in lora_layers(module).values():
        adapted[id(layer.base_layer.weight)] = layer
    leaves = {hf_name(n).rsplit(".", 1)[0].rsplit(".", 1)[-1] for n, p in module.named_parameters() if id(p) in adapted}
    resend = set(leaves)
    for group in fused:  # the engine's packed modules (sampler.fused_groups), or Llama's
        if leaves & set(group):
            resend |= set(group)
    items = []
    for n, p in module.named_parameters():
        if "lora_" in n:
            continue  # inside its merged weight
        name = hf_name(n)
        if id(p) in adapted:
            layer = adapted[id(p)]
            items.append(
                SyncItem(
                    name, [p, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight], float(layer.scaling[ADAPTER])
                )
            )
        else:
            parent = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            items.append(SyncItem(name, [p], static=parent not in resend and len(_shape(p)) >= 2))
    return items


def merged(item: SyncItem) -> Any:
    """The tensor for item, from its gathered params, in the params' own dtype (computed in fp32)."""
    w = item.params[0].data
    if item.scale is None:
        return w
    a, b = item.params[1].data, item.params[2].data
    out = b.float() @ a.float()  # one fp32 temporary the size of W, updated in place
    return out.mul_(item.scale).add_(w).to(w.dtype)


def save_adapter(module: Any, out_dir: str | Path, is_main: bool) -> None:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) that
    PeftModel.from_pretrained loads. Collective: the adapter's ZeRO-3 partitions are gathered on every rank."""
    import deepspeed

    from rft_ds.files import replacing_dir

    state = {}
    for n, p in module.named_parameters():
        if "lora_" in n:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main:
                    state[n] = p.detach().to("cpu", copy=True)
    if is_main:
        with replacing_dir(out_dir) as tmp:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
