"""The configuration reference, generated from rft_ds/config.py so it cannot drift: every field of every
section, its type, its default, whether a resume refuses a change to it (config.RESUME_FIELDS), and the
comment that explains it in the source (the comment lines right above the field, and the one after it).

    python tools/config_reference.py            # writes docs/reference/config.md
    python tools/config_reference.py --check    # exit 1 when the page differs or a field has no comment
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "rft_ds" / "config.py"
PAGE = ROOT / "docs" / "reference" / "config.md"
# the YAML section of each config class, in the order the page lists them
SECTIONS = {
    "model": "ModelConfig",
    "data": "DataConfig",
    "method": "RFTConfig",
    "selection": "SelectionConfig",
    "reward": "RewardConfig",
    "sampler": "SamplerConfig",
    "train": "TrainConfig",
    "eval": "EvalConfig",
    "rollout": "RolloutConfig",
}
# refused on resume by other means than config.RESUME_FIELDS
BY_CONTENT = {"data.prompts": "refused (the prompts' digest)"}


def comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def explanations(source: str) -> dict[str, dict[str, str]]:
    """class name -> field -> its explanation: the comment lines right above it (up to a blank line, code or
    the previous field) and the comment that ends its own line."""
    lines, notes = source.splitlines(), comments(source)
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in SECTIONS.values():
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if not isinstance(stmt, ast.AnnAssign):
                continue
            above, n = [], stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, notes[n])
                n -= 1
            after = notes.get(stmt.end_lineno, "")
            fields[stmt.target.id] = " ".join(above + ([after] if after else []))
    return out


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if not isinstance(value, str) else f'"{value}"' if value else '""'


def page() -> tuple[str, list[str]]:
    """The page's text, and the fields that have no explanation."""
    sys.path.insert(0, str(ROOT))
    from rft_ds import config

    notes = explanations(SOURCE.read_text())
    missing = []
    out = [
        "# Configuration reference",
        "",
        "Generated from `rft_ds/config.py` by `python tools/config_reference.py`; a test fails when this page",
        "differs from what it writes, or when a field has no comment in the source. Each section is a mapping in",
        "the run's YAML (`train: {epochs: 4}`), and any field can be set on the command line as a dotted override",
        "(`train.epochs=4`). *Resume*: a resume with a changed value is refused in one line unless",
        "`--resume-force` (the pools, schedule and seeds would no longer mean what they meant).",
    ]
    for section, cls_name in SECTIONS.items():
        cls = getattr(config, cls_name)
        doc = (cls.__doc__ or "").strip() if cls.__doc__ and not cls.__doc__.startswith(cls_name + "(") else ""
        out += ["", f"## `{section}`", ""] + ([doc, ""] if doc else [])
        out += ["| field | type | default | resume | what it does |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            text = notes.get(cls_name, {}).get(f.name, "")
            if not text:
                missing.append(f"{section}.{f.name}")
            key = f"{section}.{f.name}"
            refused = any(key == r or (r.endswith(".*") and key.startswith(r[:-1])) for r in config.RESUME_FIELDS)
            cell = text.replace("|", "\\|")
            resume = BY_CONTENT.get(key, "refused" if refused else "")
            out.append(f"| `{f.name}` | `{f.type}` | `{default_of(f)}` | {resume} | {cell} |")
    return "\n".join(out) + "\n", missing


def main() -> int:
    text, missing = page()
    for m in missing:
        print(f"no comment explains {m} in rft_ds/config.py")
    if "--check" in sys.argv:
        stale = not PAGE.exists() or PAGE.read_text() != text
        if stale:
            print(f"{PAGE.relative_to(ROOT)} is not what tools/config_reference.py writes: run it")
        return 1 if stale or missing else 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
