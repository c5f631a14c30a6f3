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
