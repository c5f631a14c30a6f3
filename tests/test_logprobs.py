"""Label log-probs through the LM head in chunks (rft_ds.logprobs): the same values and gradients as the
full log-softmax, with and without a prompt's rows packed into one sequence, in memory that holds at most one
chunk of logits, and the plain head kept for a model that changes its head's output."""

from pathlib import Path

import pytest
import torch

from rft_ds.experience import build_row, collate, pack_rows
from rft_ds.learner import label_logprobs, label_positions
from rft_ds.logprobs import LabelLogprobHead, chunked_logp, install, returns_head_output

ROOT = Path(__file__).resolve().parents[1]


def _plain(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunks_give_the_full_log_softmax_and_its_gradients(chunk, bias):
    g = torch.Generator().manual_seed(0)
    n, h, v = 23, 16, 101
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)  # not a plain sum: per-position gradients
    grads = []
    for fn in (_plain, lambda *a: chunked_logp(*a, chunk=chunk)):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
        out = fn(leaves[0], leaves[1], leaves[2] if bias else None, targets)
        (out.double() * upstream).sum().backward()
        grads.append((out.detach().double(), [x.grad for x in leaves]))
    (want, want_g), (got, got_g) = grads
    assert torch.allclose(got, want, atol=1e-6)  # float32 log-softmax on both paths
    for a, w in zip(got_g, want_g):
        assert torch.allclose(a, w, atol=1e-5, rtol=1e-5)


def test_bf16_chunks_match_the_plain_path_to_bf16_rounding():
    """20 chunks of 2: the weight's gradient is summed over them in float32 and rounded once, as the plain
    path's one matmul does (summed in bf16 chunk by chunk it would round 20 times)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=g).bfloat16()
    weight = (torch.randn(300, 32, generator=g) * 0.2).bfloat16()
    targets = torch.randint(0, 300, (40,), generator=g)
    res = []
    for fn in (_plain, lambda *a: chunked_logp(*a, chunk=2)):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(hh, ww, None, targets)
        (-out.sum()).backward()
        assert out.dtype == torch.float32 and hh.grad.dtype == torch.bfloat16
        res.append((out.detach(), hh.grad.float(), ww.grad.float()))
    for a, b in zip(*res):
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_no_saved_tensor_holds_more_than_one_chunk_of_logits():
    """What autograd keeps between forward and backward: the hidden states, the head's weight, one float per
    position and at most one chunk of probabilities; never positions x vocabulary."""
    n, h, v, chunk = 96, 8, 500, 16
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_logp(hidden, weight, None, targets, chunk=chunk)
    # hidden, weight (a Parameter: no copy), one log-sum-exp and target per position, the last chunk's probabilities
    assert sorted(saved) == sorted([n * h, v * h, n, n, chunk * v])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _plain(hidden, weight, None, targets)
    assert max(saved) >= n * v  # the plain path keeps the whole log-softmax


def _rows():
    spec = [
        ([1, 2, 3], [4, 5, 6, 7], True),
        ([1, 2, 3], [8], False),
        ([1, 2, 3], [9, 10, 11], True),
        ([2, 2], [9, 10, 11, 12, 13, 14], False),
        ([5], [6, 7], False),
    ]
    return [build_row(p, c, e, eos_id=2, max_len=64) for p, c, e in spec]


@pytest.mark.parametrize("packed", [False, True])
def test_the_model_with_the_chunked_head_gives_the_same_loss_and_gradients(tiny_model, packed):
    """The tiny Llama through LabelLogprobHead at chunk 3 vs label_logprobs on full logits:
    the same log p and the same gradient of every parameter, rows collated or a prompt's rows packed."""
    from transformers import AutoModelForCausalLM

    rows = _rows()
    if packed:
        arrays, _ = pack_rows(rows[:3], pad_id=0, max_len=64)  # one prompt's three rows as one sequence
        arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
    else:
        arrays = {k: torch.from_numpy(v) for k, v in collate(rows, pad_id=0).items()}
    kwargs = dict(
        input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"], position_ids=arrays.get("position_ids")
    )
    labels = arrays["labels"]
    keep = label_positions(labels)
    results = []
    for chunked in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        names = [n for n, _ in model.named_parameters()]
        if chunked:
            old = model.lm_head.weight
            head = install(model, chunk=3)
            assert isinstance(head, LabelLogprobHead) and head.weight is old and model.lm_head is head
            assert [n for n, _ in model.named_parameters()] == names  # the weight sync's names are unchanged
            with head.label_mode(labels[:, keep + 1]):
                logp = model(**kwargs, logits_to_keep=keep).logits
            assert head.targets is None
            plain = model(**kwargs, logits_to_keep=keep).logits  # outside label_mode: plain logits again
            assert plain.shape[-1] == model.config.vocab_size
        else:
            logp = label_logprobs(model(**kwargs, logits_to_keep=keep).logits, labels, keep)[0]
        (-logp.sum()).backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_g), (got, got_g) = results
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    for name, grad in want_g.items():
        assert torch.allclose(got_g[name], grad, atol=1e-6, rtol=1e-4), name


def test_a_model_that_soft_caps_its_logits_keeps_the_plain_head(tmp_path):
    """Gemma 2 soft-caps its logits after the head: the probe says so, and the plain model passes."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    for cls, cfg, expect in (
        (LlamaForCausalLM, LlamaConfig(**small), True),
        (Gemma2ForCausalLM, Gemma2Config(**small, final_logit_softcapping=30.0), False),
    ):
        model = cls(cfg)
        head = install(model, chunk=4)
        assert head is not None
        assert returns_head_output(model, head, "cpu") is expect, cls.__name__
        assert head.targets is None and head.last is None


def test_tied_embeddings_get_the_gradient_of_both_uses():
    """SmolLM2 ties its LM head to the embedding: the chunked head holds that one Parameter, whose gradient
    sums its use as embedding and as head, as on the plain path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    rows = _rows()
    arrays = {k: torch.from_numpy(v) for k, v in collate(rows, pad_id=0).items()}
    labels, keep = arrays["labels"], label_positions(arrays["labels"])
    grads = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        out_kwargs = dict(input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"], logits_to_keep=keep)
        if chunked:
            head = install(model, chunk=2)
            assert head.weight is model.model.embed_tokens.weight
            with head.label_mode(labels[:, keep + 1]):
                logp = model(**out_kwargs).logits
        else:
            logp = label_logprobs(model(**out_kwargs).logits, labels, keep)[0]
        (-logp.sum()).backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_a_second_backward_is_refused_and_a_lora_adapted_head_is_left_alone():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    out = chunked_logp(hidden, weight, None, torch.tensor([0, 1, 2, 3, 4]), chunk=2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # never a wrong second gradient
        out.sum().backward()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    assert install(LlamaForCausalLM(cfg), 4, ["q_proj", "lm_head"]) is None  # LoRA adapts the head: plain path
    assert install(LlamaForCausalLM(cfg), 4, "all-linear") is not None  # peft's all-linear leaves the head out


def test_auto_checkpointing_threshold_follows_the_model_shape():
    """model.gradient_checkpointing: auto turns it on past the tokens whose activations would pass 2 GiB: from
    config.json alone (every rank decides the same), fewer tokens for a wider, deeper model, half in float32."""
    from rft_ds.learner import checkpoint_plan, checkpoint_tokens

    smol = {"hidden_size": 576, "num_hidden_layers": 30}
    llama7b = {"hidden_size": 4096, "num_hidden_layers": 32}
    assert 2000 < checkpoint_tokens(smol, 2) < 3500 and 250 < checkpoint_tokens(llama7b, 2) < 500
    assert checkpoint_tokens(smol, 4) == checkpoint_tokens(smol, 2) // 2
    assert checkpoint_tokens({"hidden_size": 64, "num_hidden_layers": 2}, 4) > 100_000  # the tiny test model
    assert checkpoint_plan([100, 5000, 4096], 4096) == [False, True, False]
    assert checkpoint_plan([1, 2], 0) == [True, True] and checkpoint_plan([10**6], None) == [False]
