"""The package's layout holds: no import circle (lazy imports inside functions count, tools/import_graph.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


def test_no_import_circle():
    assert import_graph.circles(import_graph.graph()) == []


def test_circle_finder_finds_one():
    """The check can fail: a made-up graph with a circle through three modules is found."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.circles(g) == [["a", "b", "c"]]


def test_script_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_graph.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "0 circle(s)" in out.stdout, out.stdout + out.stderr
