"""Label log-probabilities through the LM head in chunks of positions: memory O(chunk x vocabulary).

The plain way (logits of every label position, then a float32 log-softmax) holds tokens x vocabulary
floats several times over: at a micro-batch of 8 rows x 2k label tokens and a 128k vocabulary that is
25-38 GB. Here the head's matmul, the log-softmax and its gradient run one chunk of positions at a time:
the forward keeps one float per position (its log-sum-exp), and the backward recomputes each chunk's
logits (one more head matmul per label token; the last chunk's probabilities are kept, so a micro-batch
that fits one chunk recomputes nothing). Same loss and gradients, to float rounding (tests).

`LabelLogprobHead` takes the LM head's place in the HF model, holding the same weight Parameter (same name,
same tie to the embedding, same ZeRO-3 partitioning), so the model's own forward, DeepSpeed's gathers and
the weight sync see nothing new. It computes plain logits unless `targets` are set for one forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024  # label positions per chunk: 1024 x 128k vocabulary x 4 B = 0.5 GB of float32 logits


class ChunkedLogp(torch.autograd.Function):
    """log p(target_i | hidden_i) = logit_i[target_i] - logsumexp(logit_i), logit_i = W hidden_i (+ b),
    computed `chunk` positions at a time. The gradient of a chunk's logits is g_i (onehot_i - softmax_i),
    cast to the head's dtype before its matmuls, as autograd does on the plain path."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        probs = None
        for lo in range(0, n, chunk):
            logits = F.linear(hidden[lo : lo + chunk], weight, bias).float()
            lse[lo : lo + chunk] = torch.logsumexp(logits, dim=-1)
            out[lo : lo + chunk] = logits.gather(-1, targets[lo : lo + chunk, None])[:, 0] - lse[lo : lo + chunk]
            if lo + chunk >= n:  # the last chunk's probabilities: its backward needs no recompute
                probs = logits.sub_(lse[lo : lo + chunk, None]).exp_()
        ctx.chunk = chunk
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, probs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        hidden, weight, bias, targets, lse, last_probs = ctx.saved_tensors
        n, chunk = hidden.shape[0], ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight's gradient sums over every chunk: in float32 when there are several (one rounding to the
        # weight's dtype at the end, as one matmul over all positions does), in place when there is one
        acc = torch.float32 if n > chunk else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
        )
        for lo in range(0, n, chunk):
            h, g, t = hidden[lo : lo + chunk], grad[lo : lo + chunk, None].float(), targets[lo : lo + chunk, None]
            if lo + chunk >= n and last_probs is not None:
                probs = last_probs
            else:
                probs = F.linear(h, weight, bias).float().sub_(lse[lo : lo + chunk, None]).exp_()
            # in place, the saved last chunk's too: a second backward (retain_graph) is refused by autograd's
            # version check, and no second chunk x vocabulary buffer is made
            dlogits = probs.mul_(-g).scatter_add_(-1, t, g)
            if grad_b is not None:
                grad_b += dlogits.sum(dim=0)
            dlogits = dlogits.to(weight.dtype)
            if need_h:
                grad_h[lo : lo + chunk] = dlogits @ weight
            if need_w:
                if acc == weight.dtype:
                    grad_w.addmm_(dlogits.t(), h)
                else:  # the chunk's product in the weight's dtype, added into float32 (no float32 copy of it)
                    grad_w.add_(dlogits.t() @ h)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
        )


def chunked_logp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """log p of each target (float32, with its graph) from hidden states (N, H) through a head (V, H)."""
    return ChunkedLogp.apply(hidden, weight, bias, targets, max(int(chunk), 1))


class LabelLogprobHead(torch.nn.Module):
    """The LM head, able to return label log-probs instead of logits for one forward (`targets`).

    With targets (B, K) set (labels at the positions the model keeps, IGNORE_INDEX where there is none),
    the model's "logits" come out as the log p of every label token, row-major, shape (M,): what
    learner.label_logprobs computes from full logits, in O(chunk x vocabulary) memory."""

    def __init__(self, head: torch.nn.Linear, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        self.weight = head.weight  # the same Parameter: its name, tie and ZeRO-3 partition are unchanged
        self.bias = head.bias
        self.chunk = chunk
        self.in_features, self.out_features = head.in_features, head.out_features
        self.targets: torch.Tensor | None = None
        self.last: torch.Tensor | None = None  # what the last label forward returned (learner's identity check)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return F.linear(hidden, self.weight, self.bias)
        mask = self.targets != IGNORE_INDEX
        self.last = chunked_logp(hidden[mask], self.weight, self.bias, self.targets[mask], self.chunk)
        return self.last

    @contextlib.contextmanager
    def label_mode(self, targets: torch.Tensor) -> Iterator[None]:
        """One forward returns label log-probs; the head is plain again afterwards, whatever happens."""
        self.targets, self.last = targets, None
        try:
            yield
        finally:
            self.targets = None


def install(model: Any, chunk: int, lora_targets: Any = ()) -> LabelLogprobHead | None:
    """Put a LabelLogprobHead in place of the model's output layer (an nn.Linear), before DeepSpeed wraps
    the model; None when the model has no such layer, or LoRA adapts it (a list of `lora_targets` naming it,
    by peft's suffix rule): its loss then takes the plain path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    if not isinstance(lora_targets, str) and any(name == t or name.endswith("." + t) for t in lora_targets or ()):
        return None
    new = LabelLogprobHead(head, chunk)
    model.set_output_embeddings(new)
    return new


def returns_head_output(forward: torch.nn.Module, head: LabelLogprobHead, device: Any) -> bool:
    """Whether the model's forward returns its LM head's output as it came, from one 2-token row without
    gradient (collective under ZeRO-3: every rank runs it, and gets the same answer). A model that soft-caps
    or scales its logits (Gemma 2, Cohere, Granite) would apply that to the label log-probs: it keeps the
    plain head."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    was_training = forward.training
    forward.eval()  # no dropout: the training RNG is not touched
    try:
        with torch.no_grad(), head.label_mode(torch.zeros((1, 1), dtype=torch.long, device=device)):
            got = forward(
                input_ids=ids, logits_to_keep=torch.zeros(1, dtype=torch.long, device=device), use_cache=False
            ).logits
            last, head.last = head.last, None
    finally:
        forward.train(was_training)
    return (
        last is not None
        and got.shape == last.shape
        and got.data_ptr() == last.data_ptr()
        and bool(torch.equal(got, last))
    )
