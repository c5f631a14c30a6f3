"""The rft_ds package's import graph, from the source alone (ast, nothing imported): every module's rft_ds
imports, lazy ones inside functions included (a lazy import that dodges a circle is still a circle), the
circles (strongly connected components of more than one module) and each module's line count.

    python tools/import_graph.py            # modules, lines, imports; then the circles
    python tools/import_graph.py --check    # exit 1 when there is a circle

A module's layer is 0 when it imports nothing of rft_ds, else one above the highest module it imports; an
import inside a circle has no layer to go down to, so each such edge is a back-arrow.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "rft_ds"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The rft_ds modules `path` imports anywhere (top level or inside a function), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): {m for m in imports_of(p, modules) if m != "rft_ds"} for p in paths}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layers(g: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer; edges inside a circle are left out (they are the back-arrows)."""
    inside = {m: set(c) for c in circles(g) for m in c}
    down = {m: {x for x in deps if x not in inside.get(m, set())} for m, deps in g.items()}
    memo: dict[str, int] = {}

    def layer(m: str) -> int:
        if m not in memo:
            memo[m] = 1 + max((layer(x) for x in down[m]), default=-1)
        return memo[m]

    return {m: layer(m) for m in g}


def main() -> int:
    g = graph()
    found = circles(g)
    if "--check" not in sys.argv:
        level = layers(g)
        for m in sorted(g, key=lambda m: (level[m], m)):
            path = ROOT.parent / (m.replace(".", "/") + ".py")
            if not path.exists():
                path = ROOT.parent / m.replace(".", "/") / "__init__.py"
            lines = len(path.read_text().splitlines())
            deps = ", ".join(sorted(x.removeprefix("rft_ds.") for x in g[m])) or "-"
            print(f"{level[m]:2d} {m:32s} {lines:5d}  -> {deps}")
    back = sorted((a, b) for c in found for a in c for b in g[a] if b in c)
    for c in found:
        print("circle:", " <-> ".join(c))
    for a, b in back:
        print(f"back-arrow: {a} -> {b}")
    print(
        f"{len(g)} modules on {max(layers(g).values()) + 1} layers, {len(found)} circle(s), {len(back)} import(s) "
        "inside circles"
    )
    return 1 if found and "--check" in sys.argv else 0


if __name__ == "__main__":
    sys.exit(main())
