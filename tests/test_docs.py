"""The documentation that is generated from the code matches it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current_and_every_field_explained():
    """docs/reference/config.md is what tools/config_reference.py writes from rft_ds/config.py, and every
    field of every section has a comment there that explains it."""
    p = subprocess.run(
        [sys.executable, "tools/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_config_reference_finds_a_field_without_comment():
    """The check can fail: a field with no comment above it or after it has no explanation."""
    sys.path.insert(0, str(ROOT / "tools"))
    import config_reference

    src = "class TrainConfig:\n    # why a\n    a: int = 1\n    b: int = 2\n    c: int = 3  # why c\n"
    assert config_reference.explanations(src)["TrainConfig"] == {"a": "why a", "b": "", "c": "why c"}


def test_error_catalogue_is_current_and_every_raising_module_grouped():
    """docs/reference/errors.md is what tools/error_catalogue.py writes from rft_ds's raise sites, and every module
    that raises a catalogued error has a group (with its cause-and-fix text) in the generator."""
    p = subprocess.run(
        [sys.executable, "tools/error_catalogue.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_error_catalogue_finds_a_made_up_raise_site():
    """The check can fail: a new module's raise sites are found (a direct raise, one through a helper that raises
    its message argument, a printed error line), rendered as templates, and flagged as belonging to no group."""
    sys.path.insert(0, str(ROOT / "tools"))
    import error_catalogue

    src = (
        "from rft_ds.errors import ConfigError\n"
        "def _require(cond, msg):\n"
        "    if not cond:\n"
        "        raise ConfigError(msg)\n"
        "class Made:\n"
        "    def up(self, x):\n"
        "        _require(x > 0, f'made.x must be > 0, got {x!r}')\n"
        "        if x > 9:\n"
        "            raise ConfigError(f'made.x={x} is ' + 'too big')\n"
        "        print(f'rft_ds: error: {x}')\n"
        "        raise ValueError('an internal invariant')\n"
    )
    sites = error_catalogue.sites_in("rft_ds/made_up.py", src, {"ConfigError"})
    assert [(s.function, s.kind, s.templates) for s in sites] == [
        ("Made.up", "ConfigError", ["made.x must be > 0, got <x>"]),
        ("Made.up", "ConfigError", ["made.x=<x> is too big"]),
        ("Made.up", "printed", ["rft_ds: error: <x>"]),
    ]
    by_module, _ = error_catalogue.collect()
    assert "rft_ds/made_up.py: " not in "".join(error_catalogue.problems(by_module))
    found = error_catalogue.problems({**by_module, "rft_ds/made_up.py": sites})
    assert [p for p in found if p.startswith("rft_ds/made_up.py raises catalogued errors but is in no group")]
    classes = error_catalogue.exception_classes(
        {
            "a.py": "class FooError(ValueError): pass\nclass _Hidden(Exception): pass",
            "b.py": "class Bar(FooError): pass",
        }
    )
    assert classes == {"FooError", "Bar"}
