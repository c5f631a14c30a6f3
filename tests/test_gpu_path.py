"""The GPU path on a CPU box: each module's inputs on its device, collectives on the backend's device.

tests/fake_cuda.py emulates cuda:0 (and NCCL's refusal of CPU tensors) on the CPU, so the mistakes that
only a GPU would show raise here: a CPU tensor handed to a module on the GPU, `.numpy()` of a CUDA tensor,
a CPU tensor in an NCCL collective. Each test runs the package's real code on a model moved to that
device and compares with the plain CPU answer.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rft_ds import distributed as D
from tests.fake_cuda import fake_cuda, is_fake_cuda


@contextlib.contextmanager
def nccl_group():
    """A one-process group that calls itself NCCL, on the fake cuda:0: rft_ds.distributed then communicates
    on CUDA, and the fake refuses CPU tensors in collectives as NCCL does (the data travels over gloo)."""
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        with fake_cuda():
            yield
    finally:
        dist.get_backend = real
        dist.destroy_process_group()


def test_collectives_run_on_the_nccl_device():
    with nccl_group():
        assert D.comm_device() == torch.device("cuda", 0)
        assert D.any_rank(True) is True and D.any_rank(False) is False
        assert D.max_over_ranks(7) == 7
        t = torch.arange(3.0)  # a CPU tensor: reduced on CUDA, handed back on the CPU
        out = D.all_reduce(t, "sum")
        assert out.tolist() == [0.0, 1.0, 2.0] and not is_fake_cuda(out)
        g = torch.ones(2, device="cuda")
        assert is_fake_cuda(D.all_reduce(g, "max"))
        # what any_rank did before the communication rule: NCCL refuses it
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.tensor([1]), op=dist.ReduceOp.MAX)


def test_token_exchange_runs_on_the_nccl_device():
    """The rows' token ids cross ranks in one all_to_all on CUDA, and come back as numpy on the CPU."""
    with nccl_group():
        got = D.all_to_all_int32([np.array([3, 1, 2], dtype=np.int32)], [3])
        assert [g.tolist() for g in got] == [[3, 1, 2]]
        assert D.gather_object({"a": 1}) == [{"a": 1}]
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_to_all_single(torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))


def test_hf_sampler_on_cuda(tiny_model, tokenizer):
    """Prompts go to the module's device; the batch count is agreed over NCCL; outputs equal the CPU run's."""
    from transformers import AutoModelForCausalLM

    from rft_ds.sampling.hf import HFSampler

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [tokenizer(t)["input_ids"] for t in ("abc say k:", "hello say a:", "x say q:")]
    greedy = {"max_new_tokens": 6, "do_sample": False}
    cpu = HFSampler(model, tokenizer, batch_size=2, device="cpu").generate(prompts, 1, greedy, seed=0)
    with nccl_group():
        model.to("cuda")
        sampler = HFSampler(model, tokenizer, batch_size=2)  # the device rule: cuda:0
        assert sampler.device == torch.device("cuda", 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sampler.generate(prompts, 1, greedy, seed=0)
        # HF generate copes with CPU inputs by moving them itself, with this warning; ours must not need it
        assert not [w for w in caught if "device type different" in str(w.message)]
        model.cpu()
    assert [c[0].token_ids.tolist() for c in out] == [c[0].token_ids.tolist() for c in cpu]


def test_parity_check_inputs_follow_the_module(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from rft_ds.weight_sync import model_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    seqs = [tokenizer(t)["input_ids"] for t in ("abc say k: k", "hello say a: a a")]
    cpu = model_logprobs(model, seqs, tokenizer.pad_token_id, "cpu")
    with fake_cuda():
        model.to("cuda")
        on_gpu = model_logprobs(model, seqs, tokenizer.pad_token_id)  # default: this rank's device
        model.cpu()
    assert all(isinstance(a, np.ndarray) and np.allclose(a, b, atol=1e-6) for a, b in zip(on_gpu, cpu))


def test_label_logprobs_on_cuda():
    """The loss and the stale-weight check read the learner's logits on the GPU, at the label positions only:
    the positions stay on the device, and everything handed to numpy is on the CPU first."""
    from rft_ds.experience import IGNORE_INDEX, Row
    from rft_ds.learner import label_logprobs, label_positions, logprob_diffs

    torch.manual_seed(0)
    full = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]])
    logp_full = torch.log_softmax(full, -1)
    exact = np.array([logp_full[0, 1, 3], logp_full[0, 2, 4], logp_full[0, 3, 5]], dtype=np.float64)
    rows = [Row(np.zeros(5, np.int64), np.zeros(5, np.int64), exact + [0.0, 0.5, 0.0]), Row(np.zeros(3), np.zeros(3))]

    def diffs(logits, labels):
        keep = label_positions(labels)
        logp, counts = label_logprobs(logits[:, keep], labels, keep)  # what logits_to_keep=keep returns
        return keep, logprob_diffs(logp.detach().cpu().numpy(), counts.cpu().tolist(), rows)

    keep, expected = diffs(full, labels)
    assert keep.tolist() == [0, 1, 2, 3] and np.allclose(expected, [0.0, 0.5, 0.0], atol=1e-6)
    with fake_cuda():
        keep, got = diffs(full.to("cuda"), labels.to("cuda"))
        assert is_fake_cuda(keep)
    assert np.allclose(got, expected)


def test_reward_model_scores_on_cuda(classifier):
    from rft_ds.rewards import RewardModel

    prompts, outputs = ["abc say k:", "x say q:", "hello say a:"], [" k k", " q", " a a a"]
    cpu = RewardModel(str(classifier), batch_size=2, device="cpu")(samples=None, prompts=prompts, outputs=outputs)
    with fake_cuda():
        rm = RewardModel(str(classifier), batch_size=2)  # the device rule: cuda:0
        assert str(rm.device) == "cuda:0"
        gpu = rm(samples=None, prompts=prompts, outputs=outputs)
    assert np.allclose(gpu, cpu, atol=1e-2)  # bf16 on a GPU device, fp32 on the CPU


def test_sampling_leaves_the_training_rng_alone(tiny_model, tokenizer):
    """Sampling seeds its own fork of the RNG: the dropout stream a checkpoint restores is not re-seeded."""
    from transformers import AutoModelForCausalLM

    from rft_ds.sampling.hf import HFSampler

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sampler = HFSampler(model, tokenizer, batch_size=2, device="cpu")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sampler.generate([[5, 6, 7]], 3, {"max_new_tokens": 5}, seed=9)
    assert torch.equal(torch.get_rng_state(), before)
    b = sampler.generate([[5, 6, 7]], 3, {"max_new_tokens": 5}, seed=9)
    assert [c.token_ids.tolist() for c in a[0]] == [
        c.token_ids.tolist() for c in b[0]
    ]  # and the seed alone decides the samples
