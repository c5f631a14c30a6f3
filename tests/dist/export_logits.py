"""Load an exported model in transformers and in vLLM; print the largest |logprob| difference on a probe."""

import os
import sys

# In-process engine, as in the training runs: the multiprocess engine core of a plain vllm.LLM sometimes
# aborts while tearing down at interpreter exit ("terminate called without an active exception").
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("abc say k: kkk kk")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    hf = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    llm = LLM(model=path, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 * 2**20, max_model_len=64)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    v = np.array([out[0].prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
    print("MAX_ABS_LOGPROB_DIFF", float(np.abs(v - hf).max()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # the result is printed; engine teardown must not decide the exit code
