"""The demo task: integer arithmetic with an exactly checkable answer.

Problems come from a seeded generator. Whether a problem belongs to the eval split is decided by a hash
of the problem itself, so train and eval never share a problem whatever sizes are asked for, and the
eval accuracy is held out. The reward is exact match on the last number of the completion
(`rft_ds.rewards:numeric_match`, reading the `answer` metadata).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TEMPLATE = "What is {a} {op} {b}? Answer with just the number."
COT_TEMPLATE = "What is {a} {op} {b}?"  # the reasoning demo's: how to answer is the system prompt's to say
EVAL_SHARE = 5  # one problem in 5 belongs to the eval split


def _is_eval(a: int, op: str, b: int) -> bool:
    return int.from_bytes(hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=4).digest(), "little") % EVAL_SHARE == 0


def problems(
    n: int, split: str = "train", seed: int = 0, digits: int = 2, ops: str = "+", template: str = TEMPLATE
) -> list[dict[str, Any]]:
    """n distinct problems of one split, each {"prompt", "answer"}; the same for the same arguments."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be made of {''.join(OPS)!r}, got {ops!r}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    capacity = (hi - lo + 1) ** 2 * len(set(ops)) // (EVAL_SHARE if split == "eval" else 1) // 2
    if n > capacity:
        raise ValueError(f"{n} {split} problems with {digits} digits and ops {ops!r} is too many (at most {capacity})")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        key = (rng.randint(lo, hi), rng.choice(ops), rng.randint(lo, hi))
        if key in seen or _is_eval(*key) != (split == "eval"):
            continue
        seen.add(key)
        a, op, b = key
        out.append({"prompt": template.format(a=a, op=op, b=b), "answer": str(OPS[op](a, b))})
    return out


def train_prompts(n: int = 256, seed: int = 0, digits: int = 2, ops: str = "+") -> list[dict[str, Any]]:
    return problems(n, "train", seed, digits, ops)


def eval_prompts(n: int = 128, seed: int = 0, digits: int = 2, ops: str = "+") -> list[dict[str, Any]]:
    return problems(n, "eval", seed, digits, ops)


def eval_subtraction(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """A neighbouring task the demo never trains on (2-digit subtraction): its second eval set, where
    forgetting, or transfer, shows."""
    return problems(n, "eval", seed, 2, "-")


# The reasoning demo's sets (`make demo-reasoning`): the same problems and splits, asked without "just the
# number", so that the system prompt's "think step by step" is the only instruction on how to answer.
def cot_train_prompts(n: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    """The reasoning demo's training problems: 2-digit additions of the train split."""
    return problems(n, "train", seed, 2, "+", COT_TEMPLATE)


def cot_eval_prompts(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Its held-out additions: the eval split, never trained on."""
    return problems(n, "eval", seed, 2, "+", COT_TEMPLATE)


def cot_eval_subtraction(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """2-digit subtractions of the eval split (the base model, with a chain of thought: 0.03 greedy)."""
    return problems(n, "eval", seed, 2, "-", COT_TEMPLATE)


def cot_times_table() -> list[dict[str, Any]]:
    """The 64 products a * b for a, b in 2..9: a neighbouring skill the base model mostly has (so forgetting
    has room to show, which 2-digit subtraction, near 0 before training, does not)."""
    return [
        {"prompt": COT_TEMPLATE.format(a=a, op="*", b=b), "answer": str(a * b)}
        for a in range(2, 10)
        for b in range(2, 10)
    ]


def cot_replay_prompts(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Neighbouring skills for data.replay_prompts: subtraction and multiplication from the train split, so
    no forgetting-set problem is among them."""
    return problems(n, "train", seed, 2, "-*", COT_TEMPLATE)


# --- the tool demo: 3-digit multiplication, which SmolLM2-135M cannot do in its head, with a calculator tool


TOOL_TEMPLATE = "What is {a} {op} {b}?"
# One worked example before each question (a chat prompt): SmolLM2-135M never calls a tool zero-shot (0 of 512
# samples on the Intel Xeon box), with it about one sample in five does, and RFT keeps the ones that were right.
TOOL_EXAMPLE = [
    {"role": "user", "content": "What is 123 * 45?"},
    {
        "role": "assistant",
        "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>',
    },
    {"role": "tool", "content": "5535"},
    {"role": "assistant", "content": "5535"},
]


def _with_example(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "prompt": TOOL_EXAMPLE + [{"role": "user", "content": r["prompt"]}]} for r in rows]


def tool_train_prompts(n: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    return _with_example(problems(n, "train", seed, digits=3, ops="*", template=TOOL_TEMPLATE))


def tool_eval_prompts(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    return _with_example(problems(n, "eval", seed, digits=3, ops="*", template=TOOL_TEMPLATE))


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * and parentheses.

    Args:
        expression: the expression to evaluate, e.g. "347 * 29"
    """
    import ast

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            a, b = value(node.left), value(node.right)
            if max(abs(a), abs(b)) > 10**12:
                raise ValueError("numbers too large")
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    return str(value(ast.parse(str(expression), mode="eval").body))
