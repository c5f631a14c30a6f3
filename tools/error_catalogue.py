"""The error catalogue, generated from rft_ds's own raise sites so it cannot miss one: every `raise X(...)` of
an exception class rft_ds defines (ConfigError, DataError, RewardError, CheckpointError and the others found in
rft_ds/*.py), the plain exceptions of the few modules whose messages reach the user wrapped in one (PLAIN), and
the `rft_ds: error ...` lines the command prints itself. Each message is rendered as a template: the f-string's
text, with each `{expr}` shown as `<expr>`. Sites are grouped by where they are raised (GROUPS), each group with
a hand-written cause-and-fix text kept here.

    python tools/error_catalogue.py            # writes docs/reference/errors.md
    python tools/error_catalogue.py --check    # exit 1 when the page differs, or a module that raises has no group

stdlib only (ast): nothing of rft_ds is imported.
"""

from __future__ import annotations

import ast
import builtins
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rft_ds"
PAGE = ROOT / "docs" / "reference" / "errors.md"

# Plain exceptions whose text the user reads, wrapped: the built-in reward functions' (a check at start-up makes
# them a ConfigError, during scoring "scoring failed on rank r: ValueError: ..."), a reasoning-gym spec's (a
# DataError), the Slurm environment's and a model build's lock (the rank's one-line error).
PLAIN = {
    "rft_ds/rewards.py": {"ValueError", "KeyError"},
    "rft_ds/tasks.py": {"ValueError"},
    "rft_ds/slurm.py": {"ValueError"},
    "rft_ds/locked_build.py": {"TimeoutError"},
}
# The lines the command prints itself (not raised): their first literal text starts with one of these.
PRINTED = ("rft_ds: error", "rft_ds: problem")

# Where an error is raised -> the page's groups, in page order. Each module that raises a catalogued error must
# be in exactly one group (the check fails otherwise), so a new error site cannot go unexplained.
GROUPS = [
    {
        "title": "The command line and its exit codes",
        "modules": ["rft_ds/cli.py"],
        "text": """\
What `rft-ds train` (and `launch/train.py`) and `rft-ds check` print around every other error. A known error
(any class catalogued below) is one line, `rft_ds: error (rank <r>): <message>`, exit code 2 for bad input
(ConfigError, DataError, CheckpointError) and 1 for a failure during the run; an error from inside a library is
`<Type>: <its first line> (traceback in <log>)` with the traceback in `<output_dir>/logs/rank<r>.log`
(`--verbose` shows it on the terminal). Exit code 3 is not an error: the run checkpointed on a stop signal and
wants to be resumed. `rft-ds check` prints each problem as `rft_ds: problem: ...` and exits 1. An error is said
once: `(all <n> ranks)` when every rank raised it, otherwise by the rank that failed first (the others log theirs);
see [How an error looks](../guides/troubleshooting.md#how-an-error-looks).
**Fix**: read the message after the prefix; it is one of the entries below. For a library's error, open the
rank's log.""",
    },
    {
        "title": "Configuration",
        "modules": ["rft_ds/config.py", "rft_ds/api.py", "rft_ds/lora.py"],
        "text": """\
The YAML, the dotted overrides or the Python API's arguments hold a value rft_ds refuses: an unknown key (the
message names the closest valid one), a wrong type, a value out of range, or two settings that contradict each
other. Raised on every rank while the config is parsed, before any model, file or process group is touched;
`rft-ds check CONFIG` finds them in seconds. **Fix**: change the field the message names;
[the configuration reference](config.md) gives every field's type, default and meaning.""",
    },
    {
        "title": "Start-up checks: model, tokenizer, lengths, output directory, resume",
        "modules": ["rft_ds/preflight.py"],
        "text": """\
The checks a run makes before any model loads (the same list `rft-ds check` runs): the model directory holds a
causal LM (or needs `model.trust_remote_code`), the tokenizer has an EOS token, prompts plus `max_new_tokens`
fit the model's positions and `train.max_seq_length`, the output directory is writable and one directory every
node sees, a resumed checkpoint was written with a compatible config, the metric sinks asked for are installed.
A message shown as `<str(e)>` repeats a model build's error (see *Model, engines and weight sync*).
**Fix**: as the message says; for a config change refused on resume, either undo it or pass `--resume-force`
if you mean it ([Checkpoints, resume and export](../guides/checkpoints.md)).""",
    },
    {
        "title": "Rollouts: the environment and the tools",
        "modules": ["rft_ds/rollout.py"],
        "text": """\
`rollout.env` or `rollout.tools` names something that cannot be imported, called or described: the module or
attribute is missing, `make_env()` raises or returns an object without `reset()` and `step()`, or a tool's
signature and docstring give no JSON schema (each argument needs a type hint and a line under `Args:`).
Raised at start-up, on every rank, before any model loads. What goes wrong *during* a rollout is not an error:
an environment that raises, hangs past `rollout.step_timeout_s` or answers with the wrong types, and a tool
call that cannot be parsed or run, fail that trajectory only (scored `rollout.failed_score`, counted in the
`rollout_*` metrics, the first one of an epoch said on the console). **Fix**: as the message says; see
[Agents and tools](../guides/agents.md).""",
    },
    {
        "title": "Prompt data",
        "modules": ["rft_ds/data.py", "rft_ds/prompt_store.py", "rft_ds/tasks.py", "rft_ds/replay.py"],
        "text": """\
A prompt source that cannot be read (a missing file, a malformed JSONL line, a module that does not import), a
record without the prompt field, an empty or over-long prompt, chat messages the template cannot take, or a
reasoning-gym spec that names an unknown task or a config field the task does not take. Raised on every rank
before any model loads; the message names the file and line, or `<what>[<i>]`: the source (`prompts`,
`eval_prompts`, `eval.sets[k].prompts`, `data.replay_prompts`) and the prompt's position in it. **Fix**: the
record or field named; [Your first run](../guides/first-run.md) lists the sources and fields.""",
    },
    {
        "title": "Rewards and verifiers",
        "modules": ["rft_ds/reward_terms.py", "rft_ds/rewards.py"],
        "text": """\
A reward term that cannot be set up (it does not import, its signature cannot be told, it needs an argument
nobody gives, the weights do not match the terms) is refused at start-up; one that misbehaves while scoring
(raises, hangs past `reward.timeout_s`, returns something other than one finite number per sample, a reward
server that keeps failing) stops every rank with its message, naming the term and the first bad sample. The
built-in rewards' own errors (no reference answer in the metadata, a reference that does not parse as math, a
code task without tests) arrive wrapped: at start-up as `<where>: reward term <name>: <message>`, during
scoring as `scoring failed on rank <r>: ValueError: <message>`. **Fix**: the term or the prompts' metadata the
message names; [Rewards and verifiers](../guides/rewards.md).""",
    },
    {
        "title": "Evaluation",
        "modules": ["rft_ds/evaluation.py"],
        "text": """\
An eval set's `metric_fn` that returns something other than a dict, or a `train.best_metric` naming a number
the set did not report. **Fix**: return a dict of numbers from `metric_fn`; name one of the metrics the message
lists ([Evaluation and metrics](../guides/evaluation.md)).""",
    },
    {
        "title": "Checkpoints, resume and export",
        "modules": ["rft_ds/checkpoint.py", "rft_ds/export.py", "rft_ds/hf_write.py"],
        "text": """\
`--resume PATH` that is not a complete checkpoint, a checkpoint written by another version of the run-state
format, one taken inside an epoch on another number of ranks, a damaged file (its checksum), prompts other than
the ones the checkpoint was trained on, an export whose weights do not match the model config, or a rank
that could not write its share of `best_model/` or `final_model/` (a full disk on its node).
`--resume auto` skips a damaged checkpoint with a warning instead (`rft_ds: skipping checkpoint ...`) and
starts fresh when none is left. `<body>` is rank 0's verdict on the `--resume` target, sent to every rank so
that all of them raise the same line. **Fix**: resume from the checkpoint the message suggests (an end-of-epoch one
resumes on any number of ranks), on the world size it names, or with the prompts it was written with;
[Checkpoints, resume and export](../guides/checkpoints.md).""",
    },
    {
        "title": "Model, engines and weight sync",
        "modules": [
            "rft_ds/learner.py",
            "rft_ds/sampling/vllm.py",
            "rft_ds/weight_sync.py",
            "rft_ds/smollm2.py",
            "rft_ds/locked_build.py",
        ],
        "text": """\
The DeepSpeed JSON (not found, not ZeRO-3, batch sizes that disagree with the run's), a model feature the run
asked for and the model lacks (gradient checkpointing, sdpa attention for sequence parallelism), a vLLM setting
the engine cannot serve (head size or block size on CPU, a `max_model_len` or KV budget too small for the
longest request), the demo model's build, and the two weight checks: the parity check after a sync and the
stale-weight check at each grow step, which stop the run rather than let the engine sample from weights the
learner does not have. **Fix**: the setting named; for a parity or stale-weight failure, see
[How it works](../how-it-works.md#sampling-and-the-weight-hand-off): it means the engine's weights are not the
trained ones, which is a bug to report with the rank logs.""",
    },
    {
        "title": "Launch, devices and cluster",
        "modules": ["rft_ds/distributed.py", "rft_ds/recipe.py", "rft_ds/slurm.py"],
        "text": """\
A rank with no GPU it can use (NCCL without CUDA, more ranks on a node than GPUs), a rank that cannot reach the
master (`MASTER_ADDR`/`MASTER_PORT`, the network interface), a Slurm environment rft_ds cannot read, and the
error every rank raises when a stage failed on one of them: `<stage> failed on rank <r>: <Type>: <message>`,
whose message is the failing rank's own. **Fix**: for a device or rendezvous error, the launch (one rank per
GPU; `GLOO_SOCKET_IFNAME`/`NCCL_SOCKET_IFNAME` on multi-homed nodes, [Multi-node and Slurm](../guides/multi-node.md));
for a failed stage, the message after the rank; ranks that disagree on the selection are a bug to report.""",
    },
    {
        "title": "Plots and run tables",
        "modules": ["rft_ds/plot.py"],
        "text": """\
`rft-ds plot RUN_DIR` and `rft-ds runs RUN_DIR` read `<RUN_DIR>/metrics.jsonl`: it is missing, has no epoch yet,
or has a malformed line (a run killed while writing it). **Fix**: point at a run's `train.output_dir`.""",
    },
]


@dataclass
class Site:
    module: str  # rft_ds/data.py
    function: str  # the enclosing function (Class.method), or "<module>"
    kind: str  # the exception class, or "printed"
    templates: list[str]  # the message as text with <expr> placeholders (several when it comes from helpers)
    line: int = 0  # for the page's order (source order); not printed, so moving code does not change the page


def exception_classes(sources: dict[str, str]) -> set[str]:
    """The public exception classes rft_ds defines (a base that is a built-in exception other than
    BaseException, or another such class), found in the package's sources."""
    builtin = {
        n
        for n in dir(builtins)
        if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), Exception)
    }
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for src in sources.values():
            for node in ast.walk(ast.parse(src)):
                if not isinstance(node, ast.ClassDef) or node.name in found or node.name.startswith("_"):
                    continue
                bases = {
                    b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                    for b in node.bases
                }
                if bases & (builtin | found):
                    found.add(node.name)
                    changed = True
    return found


def _expr(node: ast.expr) -> str:
    text = ast.unparse(node)
    return f"<{text}>" if len(text) <= 40 else "<...>"


def render(node: ast.expr) -> str:
    """A message expression as a readable template: literal text kept, each interpolated expression as <expr>."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else _expr(v.value) if isinstance(v, ast.FormattedValue) else ""
            for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return render(node.left) + render(node.right)
    return _expr(node)


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _returns(fn: ast.FunctionDef) -> list[str]:
    """The templates of the string values a function returns (None and other values left out)."""
    out = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Return) and node.value is not None:
            v = node.value
            if isinstance(v, ast.JoinedStr) or (isinstance(v, ast.Constant) and isinstance(v.value, str)):
                out.append(render(v))
            elif isinstance(v, ast.BinOp):
                out.append(render(v))
    return out


def _functions(tree: ast.Module) -> dict[str, tuple[str, ast.FunctionDef]]:
    """Every function and method: its node -> (qualified name, node), keyed by id()."""
    out: dict = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out[id(child)] = (name, child)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def sites_in(module: str, source: str, classes: set[str], plain: set[str] = frozenset()) -> list[Site]:
    """Every catalogued error site of one module's source."""
    tree = ast.parse(source)
    funcs = _functions(tree)
    top = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    kinds = classes | set(plain)

    def raised(node: ast.AST) -> tuple[str, ast.Call] | None:
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and _name(node.exc.func) in kinds:
            return _name(node.exc.func), node.exc
        return None

    # helpers such as config._require(cond, msg): a module-level function that raises a catalogued class with one
    # of its own parameters as the message; each call of it in this module is a site
    helpers: dict[str, tuple[str, int]] = {}
    for name, fn in top.items():
        params = [a.arg for a in fn.args.args]
        for node in ast.walk(fn):
            r = raised(node)
            if r and r[1].args and isinstance(r[1].args[0], ast.Name) and r[1].args[0].id in params:
                helpers[name] = (r[0], params.index(r[1].args[0].id))

    def made_by(value: ast.expr) -> list[str]:
        """The texts a message computed by this module's functions can be: `f(...)`, `f(...) or g(...)`."""
        calls = value.values if isinstance(value, ast.BoolOp) else [value]
        found = []
        for c in calls:
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in top:
                found += _returns(top[c.func.id])
        return found

    def message(call: ast.Call, kind: str, fn: ast.FunctionDef | None) -> list[str]:
        if not call.args:
            return [f"({kind} without a message)"]
        arg = call.args[0]
        found = made_by(arg)
        if not found and isinstance(arg, ast.Name) and fn is not None:
            # a message made before the raise: the last assignment to that name above it
            before = [
                node
                for node in ast.walk(fn)
                if isinstance(node, ast.Assign)
                and node.lineno < call.lineno
                and any(isinstance(t, ast.Name) and t.id == arg.id for t in node.targets)
            ]
            if before:
                found = made_by(max(before, key=lambda n: n.lineno).value)
        return list(dict.fromkeys(found)) or [render(arg)]

    out = []

    def enclosing(target: ast.AST) -> tuple[str, ast.FunctionDef | None]:
        best = ("<module>", None)
        for name, fn in funcs.values():
            if fn.lineno <= target.lineno <= (fn.end_lineno or fn.lineno) and (
                best[1] is None or fn.lineno >= best[1].lineno
            ):
                best = (name, fn)
        return best

    for node in ast.walk(tree):
        r = raised(node)
        if r:
            name, fn = enclosing(node)
            if name in helpers and isinstance(r[1].args[0], ast.Name):
                continue  # the helper's own raise: its calls are the sites
            out.append(Site(module, name, r[0], message(r[1], r[0], fn), node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers:
            kind, pos = helpers[node.func.id]
            if len(node.args) > pos:
                out.append(Site(module, enclosing(node)[0], kind, [render(node.args[pos])], node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], (ast.JoinedStr, ast.Constant)):
            text = render(node.args[0])
            if text.startswith(PRINTED):
                out.append(Site(module, enclosing(node)[0], "printed", [text], node.lineno))
    return _unique(sorted(out, key=lambda s: s.line))


def _unique(sites: list[Site]) -> list[Site]:
    seen, out = set(), []
    for s in sites:
        key = (s.module, s.function, s.kind, tuple(s.templates))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def collect() -> tuple[dict[str, list[Site]], set[str]]:
    src = sources()
    classes = exception_classes(src)
    by_module = {}
    for module, text in src.items():
        found = sites_in(module, text, classes, PLAIN.get(module, set()))
        if found:
            by_module[module] = found
    return by_module, classes


def problems(by_module: dict[str, list[Site]]) -> list[str]:
    """Modules that raise catalogued errors but belong to no group, and groups naming a module that raises none."""
    grouped = [m for g in GROUPS for m in g["modules"]]
    out = [
        f"{m} raises catalogued errors but is in no group of tools/error_catalogue.py GROUPS: add it, with its "
        "cause and fix"
        for m in sorted(by_module)
        if m not in grouped
    ]
    out += [f"{m} is named twice in GROUPS" for m in sorted(set(grouped)) if grouped.count(m) > 1]
    out += [f"GROUPS names {m}, which raises no catalogued error" for m in grouped if m not in by_module]
    return out


def code(text: str) -> str:
    """text as one inline code span, whatever backticks it holds."""
    ticks = "`"
    while ticks in text:
        ticks += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def page(by_module: dict[str, list[Site]], classes: set[str]) -> str:
    total = sum(len(v) for v in by_module.values())
    plain = sorted({f"{c} in `{m}`" for m, cs in PLAIN.items() for c in cs})
    out = [
        "# Error catalogue",
        "",
        "Generated from rft_ds's source by `python tools/error_catalogue.py`; a test fails when this page differs",
        "from what it writes, or when a module that raises one of these errors belongs to no group below (so a new",
        f"error cannot go unexplained). {total} sites. Catalogued: every `raise` of an exception class rft_ds",
        f"defines ({', '.join(f'`{c}`' for c in sorted(classes))}); the plain exceptions whose message reaches",
        f"you wrapped in one of them ({', '.join(plain)}); and the `rft_ds: error` / `rft_ds: problem` lines the",
        "command prints. Other plain `ValueError`s and `RuntimeError`s are internal invariants: one of those",
        "reaching you is a bug, printed as `rft_ds: error (rank <r>): <Type>: <first line> (traceback in <log>)`.",
        "",
        "Each message is shown as a template: `<expr>` stands for a value filled in at run time (`<...>` for a",
        "longer expression), so search this page for the fixed words of the line you got. Where a message is made",
        "by a helper, each text the helper can return is listed. The",
        "[troubleshooting guide](../guides/troubleshooting.md) covers the situations around these errors.",
    ]
    for g in GROUPS:
        out += ["", f"## {g['title']}", "", g["text"]]
        for module in g["modules"]:
            sites = by_module.get(module, [])
            out += ["", f"### `{module}`", ""]
            for s in sites:
                where = f"`{s.function}`" + (f", {s.kind}" if s.kind != "printed" else ", printed")
                if len(s.templates) == 1:
                    out.append(f"- {code(s.templates[0])} ({where})")
                else:
                    out.append(f"- one of ({where}):")
                    out += [f"    - {code(t)}" for t in s.templates]
    return "\n".join(out) + "\n"


def main() -> int:
    by_module, classes = collect()
    bad = problems(by_module)
    for p in bad:
        print(p)
    text = page(by_module, classes)
    if "--check" in sys.argv:
        stale = not PAGE.exists() or PAGE.read_text() != text
        if stale:
            print(f"{PAGE.relative_to(ROOT)} is not what tools/error_catalogue.py writes: run it")
        return 1 if stale or bad else 0
    if bad:
        return 1
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)} ({sum(len(v) for v in by_module.values())} sites)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
