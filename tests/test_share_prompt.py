"""train.share_prompt: a prompt's rows trained as one sequence (experience.pack_rows) give every label the
same log p and the model the same gradients as the rows one by one; the plan keeps a prompt's rows in one
micro-batch; models whose attention cannot take the mask are recognised. No process group."""

import numpy as np
import pytest
import torch

from rft_ds.experience import (
    IGNORE_INDEX as I,
)
from rft_ds.experience import (
    PackSpec,
    build_row,
    collate,
    layout,
    layout_cost,
    pack_plan,
    pack_rows,
    padded_tokens,
    plan_micro_batches,
    prompt_groups,
    sequence_lengths,
)
from rft_ds.learner import attention_ratio, label_logprobs, label_positions, why_not_share_prompt

FREE = PackSpec(max_len=64, attn_ratio=0.0)  # attention priced at nothing: packing pays whenever it shares


def test_pack_rows_shares_the_prompt_and_keeps_each_rows_positions():
    rows = [
        build_row([1, 2, 3], [4, 5], True, 9, 16),
        build_row([7], [8], False, 9, 16),
        build_row([1, 2, 3], [6], False, 9, 16),
    ]
    b, order = pack_rows(rows, pad_id=0, max_len=16)
    assert order == [0, 2, 1]  # label tokens come out as rows 0, 2 (same prompt), then 1
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 3, 6], [7, 8, 0, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[I, I, I, 4, 5, 9, I, 6], [I, 8] + [I] * 6]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 2, 3], [0, 1, 0, 0, 0, 0, 0, 0]]
    m = b["attention_mask"][:, 0].astype(int)
    assert m.shape == (2, 8, 8)
    assert m[0, 6].tolist() == [1, 1, 0, 0, 0, 0, 1, 0]  # row 2's copy of the last prompt token: prefix + itself
    assert m[0, 7].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert m[0, 5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # row 0: its whole row, causal
    assert m[1, 1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0] and m[1, 4].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]  # padding
    assert sequence_lengths(rows, FREE) == ([8, 2], True) and prompt_groups(rows).tolist() == [0, 1, 0]
    assert sequence_lengths(rows, None) == ([6, 2, 4], False)
    # the same label tokens, each once: what the loss normalisation counts
    assert sorted(b["labels"][b["labels"] != I].tolist()) == sorted(
        t for r in rows for t in r.labels[1:].tolist() if t != I
    )


def test_a_row_without_prompt_stays_alone():
    rows = [build_row([], [4, 5], True, 9, 16), build_row([], [4, 6], True, 9, 16)]
    b, order = pack_rows(rows, pad_id=0, max_len=16)
    assert order == [0, 1] and b["input_ids"].tolist() == [[4, 5, 9], [4, 6, 9]]
    assert pack_plan(rows, 16) == [[0], [1]] and sequence_lengths(rows, FREE) == ([3, 3], False)


def test_a_packed_sequence_is_never_longer_than_max_len():
    rows = [build_row([1, 2, 3, 4], [5] * k, False, 9, 16) for k in (4, 3, 5, 2)]  # rows of 8, 7, 9, 6 tokens
    assert pack_plan(rows, 16) == [[0, 1], [2, 3]]  # 3 + 5 + 4 = 12; + 6 > 16: the prompt again, 3 + 6 + 3
    b, order = pack_rows(rows, pad_id=0, max_len=16)
    assert b["input_ids"].shape == (2, 12) and order == [0, 1, 2, 3]
    assert pack_plan(rows, 9) == [[0], [1], [2], [3]]  # nothing fits twice: rows as they are
    assert sequence_lengths(rows, PackSpec(9, 0.0)) == ([8, 7, 9, 6], False)


def test_packing_only_where_it_costs_less():
    """Few long completions of one prompt make one long sequence: attention over its square can cost more
    than the prompt tokens it saves (then rows stay rows); and packing must not widen a micro-batch so much
    that its padding costs more than it saves."""
    short_prompt = [build_row([1] * 8, [5] * 500, False, 9, 4096) for _ in range(4)]
    assert sequence_lengths(short_prompt, PackSpec(4096, 0.0))[1]  # tokens alone: 4 x 508 > 1 x 2007
    assert not sequence_lengths(short_prompt, PackSpec(4096, 1e-3))[1]  # 2007^2 attention: row by row
    pair = [build_row([1] * 60, [5] * 10, False, 9, 256) for _ in range(2)]
    others = [build_row([k] * 60, [5] * 10, False, 9, 256) for k in range(2, 10)]  # 8 rows of other prompts
    # one pair among 8 rows: 9 sequences 81 wide (729) cost more than 10 rows 70 wide (700): rows stay rows
    assert sequence_lengths(pair + others, PackSpec(256, 3e-4)) == ([70] * 10, False)
    pairs = [build_row([k] * 60, [5] * 10, False, 9, 256) for k in range(5) for _ in range(2)]
    assert sequence_lengths(pairs, PackSpec(256, 3e-4)) == ([81] * 5, True)  # every prompt twice: 405 < 700
    # the H200's case (a 1B shape, attn_ratio 6.7e-5, masked attention ~6x dearer per FLOP than the
    # matmuls): 4 rows of 128 + 384 tokens ran 14 % slower packed, 4 rows of 384 + 128 1.30x faster
    gpu = PackSpec(4096, 6.7e-5, masked_cost=6.0)
    long_answers = [build_row([1] * 128, [5] * 384, False, 9, 512) for _ in range(4)]
    long_prompts = [build_row([1] * 384, [5] * 128, False, 9, 512) for _ in range(4)]
    assert not sequence_lengths(long_answers, gpu)[1] and sequence_lengths(long_prompts, gpu)[1]
    assert sequence_lengths(long_answers, PackSpec(4096, 6.7e-5))[1]  # priced by FLOPs alone it would pack
    # eager attention computes the whole square with or without a mask (sdpa's causal kernel: half of it)
    assert layout_cost([512] * 4, PackSpec(4096, 1e-3, unmasked_share=1.0), False) == 4 * (512 + 1e-3 * 512 * 512)
    assert layout_cost([512] * 4, PackSpec(4096, 1e-3), False) == 4 * (512 + 0.5e-3 * 512 * 512)


def _rows(seed: int, vocab: int):
    """Rows of 3 prompts (one 1 token long), 1-4 rows each, completions of 1-7 tokens, some ended by EOS."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, n).tolist() for n in (6, 1, 11)]
    rows = []
    for p in prompts:
        for _ in range(rng.integers(1, 5)):
            rows.append(build_row(p, rng.integers(3, vocab, rng.integers(1, 8)).tolist(), bool(rng.integers(2)), 2, 64))
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_log_probs_and_gradients(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    assert why_not_share_prompt(model, trust_remote_code=False) is None
    rows = _rows(0, model.config.vocab_size)
    lengths, packed = sequence_lengths(rows, FREE)
    assert packed and len(lengths) < len(rows)  # something is shared

    b = {k: torch.from_numpy(v) for k, v in collate(rows, pad_id=0).items()}
    keep = label_positions(b["labels"])
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep)
    want, counts = label_logprobs(out.logits, b["labels"], keep)
    (-want.sum()).backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    arrays, order = layout(rows, 0, FREE)
    p = {k: torch.from_numpy(v) for k, v in arrays.items()}
    mask = p["attention_mask"]
    if attn == "eager":  # as the learner does: eager adds its mask
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    keep = label_positions(p["labels"])
    out = model(input_ids=p["input_ids"], attention_mask=mask, position_ids=p["position_ids"], logits_to_keep=keep)
    got, _ = label_logprobs(out.logits, p["labels"], keep)
    (-got.sum()).backward()
    # the packed stream holds the rows in `order`: put the unpacked one in that order too
    per_row = torch.split(want.detach(), counts.tolist())
    assert torch.allclose(got.detach(), torch.cat([per_row[i] for i in order]), atol=1e-5)
    for k, prm in model.named_parameters():
        assert torch.allclose(prm.grad, want_grads[k], atol=1e-5, rtol=1e-4), k
    # and the mask matters: without it, later rows would see earlier rows' completions
    plain = model(input_ids=p["input_ids"], position_ids=p["position_ids"], logits_to_keep=keep)
    assert not torch.allclose(label_logprobs(plain.logits, p["labels"], keep)[0], got.detach(), atol=1e-3)


def test_plan_keeps_a_prompts_rows_in_one_micro_batch_and_every_rule():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    n, micro = len(groups), 8
    steps = -(-n // micro)
    plan = plan_micro_batches(n, steps, 5, 0, 0, micro, 1, None, groups)
    assert sorted(np.concatenate(plan).tolist()) == list(range(n))  # every row once
    assert [len(mb) for mb in plan] == [len(mb) for mb in plan_micro_batches(n, steps, 5, 0, 0, micro, 1)]
    seq = groups[np.concatenate(plan)]
    assert (seq[1:] != seq[:-1]).sum() == 39  # each group one run in plan order: split only by a cut
    split = sum(sum(np.isin(mb, np.flatnonzero(groups == g)).any() for mb in plan) > 1 for g in range(40))
    assert split <= len(plan) - 1  # at most one group per cut between micro-batches
    lengths = rng.integers(10, 90, n)
    grouped = plan_micro_batches(n, steps, 5, 0, 0, micro, 1, lengths, groups)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(n))
    together = sum(len(np.unique(groups[mb])) for mb in grouped)
    alone = sum(len(np.unique(groups[mb])) for mb in plan_micro_batches(n, steps, 5, 0, 0, micro, 1, lengths))
    assert together < alone  # fewer sequences to compute: prompts shared within micro-batches


def test_padded_tokens_counts_packed_sequences():
    rows = [
        build_row([1, 2, 3], [4, 5], True, 9, 16),
        build_row([1, 2, 3], [6], False, 9, 16),
        build_row([7], [8], False, 9, 16),
    ]
    mb = [np.array([0, 1, 2])]
    assert padded_tokens(rows, mb) == (6 + 4 + 2, 3 * 6)
    assert padded_tokens(rows, mb, FREE) == (8 + 2, 2 * 8)


def test_models_that_cannot_take_the_mask_are_named():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    small = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert why_not_share_prompt(llama, False) is None
    body = sum(p.numel() for p in llama.parameters()) - 2 * 64 * 16  # untied: embedding and head left out
    assert attention_ratio(llama) == pytest.approx(2 * 1 * 2 * 8 / body)
    assert "trust_remote_code" in why_not_share_prompt(llama, True)
    llama.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in why_not_share_prompt(llama, False)
    assert "sliding" in why_not_share_prompt(MistralForCausalLM(MistralConfig(sliding_window=8, **small)), False)
    assert "rotary" in why_not_share_prompt(
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)), False
    )
