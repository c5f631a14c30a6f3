"""A completion's final answer, found the ways reasoning models write it: shared by the verifiers
(rft_ds.rewards) and by maj@k's vote (an eval set's `answer_fn: rft_ds.answers:final_answer`), so a vote
and a score read the same answer.

Each finder returns the answer's text, stripped, or None when the completion does not write one that way;
the last occurrence wins (a chain of thought may try answers before it settles). Pure.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
_STATED = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def boxed(text: str) -> str | None:
    """The content of the last closed \\boxed{...} (or \\fbox{...}), nested braces included. One pass over the
    braces (a stack), so a degenerate completion of thousands of unclosed boxes costs linear time."""
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]  # each box's opening brace
    if not starts:
        return None
    closes, stack = {}, []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closes[stack.pop()] = m.start()
    for start in reversed(starts):
        if start in closes:
            return text[start + 1 : closes[start]].strip() or None
    return None


def hashes(text: str) -> str | None:
    """What follows the last '####' on its line (GSM8K's answer line)."""
    found = _HASHES.findall(text)
    return found[-1].strip() or None if found else None


def tagged(text: str, tag: str = "answer") -> str | None:
    """The content of the last <answer>...</answer> (an unclosed last tag: to the end)."""
    opened = text.rfind(f"<{tag}>")
    if opened < 0:
        return None
    body = text[opened + len(tag) + 2 :]
    closed = body.find(f"</{tag}>")
    return (body[:closed] if closed >= 0 else body).strip() or None


def stated(text: str) -> str | None:
    """What follows the last 'the answer is' / 'final answer:', up to the end of its sentence or line."""
    found = list(_STATED.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :].split("\n", 1)[0]
    rest = boxed(rest) or re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]
    return rest.strip().strip("$").strip() or None


def last_number(text: str) -> str | None:
    """The last number written ('1,234', '-5.5' and '3/4' included), as written."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def first_line(text: str) -> str | None:
    """The first non-empty line (a completion asked to answer first, then explain)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


FINDERS: dict[str, Callable[[str], str | None]] = {
    "boxed": boxed,
    "hashes": hashes,
    "tagged": tagged,
    "stated": stated,
    "last_number": last_number,
    "first_line": first_line,
}
DEFAULT_ORDER = ("boxed", "tagged", "hashes", "stated", "last_number")


def final_answer(text: str, order: Sequence[str] = DEFAULT_ORDER) -> str | None:
    """The answer the completion gives: the first finder of `order` that finds one (an explicit \\boxed{},
    <answer> tag, '####' or 'the answer is' before the last number written). first_line is never tried
    unless asked: every completion has one."""
    for name in order:
        found = FINDERS[name](text)
        if found is not None:
            return found
    return None
