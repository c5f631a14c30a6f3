"""The documentation holds: the pages generated from the code match it, and the README's and the guides' code
blocks and links work."""

import ast
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


# --- the README and the pages under docs/: their code blocks, their links --------------------------------------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SECTIONS = {"model", "data", "method", "selection", "reward", "sampler", "train", "eval"}
FENCE = re.compile(r"^( *)```(\w*)\s*$")


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of each fenced block, indented ones (in list items) included."""
    blocks, open_, lines = [], None, path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if open_ is None and m:
            open_ = (m.group(2), n + 1, len(m.group(1)), [])
        elif open_ is not None and line.strip() == "```":
            blocks.append((open_[0], open_[1], "\n".join(open_[3])))
            open_ = None
        elif open_ is not None:
            open_[3].append(line[open_[2] :])
    assert open_ is None, f"{path}: a code block opened at line {open_[1] - 1} is never closed"
    return blocks


def all_blocks(lang: str) -> list[tuple[str, str]]:
    return [
        (f"{p.relative_to(ROOT)}:{n}", text) for p in PAGES for language, n, text in code_blocks(p) if language == lang
    ]


def test_python_blocks_parse():
    blocks = all_blocks("python")
    assert len(blocks) >= 4
    for where, text in blocks:
        try:
            ast.parse(text)
        except SyntaxError as e:
            raise AssertionError(f"{where}: {e}") from None


def test_yaml_blocks_load_and_run_configs_validate():
    """Every ```yaml block is YAML; every one made of run-config sections (model, data, ...) passes rft_ds's own
    parsing and validation, the one `rft-ds check` and every rank start with (unknown keys, types, ranges,
    contradictions), without a model: a fragment without model.model_path gets a placeholder one."""
    from rft_ds.config import ConfigError, RFTRunConfig

    blocks, configs = all_blocks("yaml"), 0
    assert blocks
    for where, text in blocks:
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise AssertionError(f"{where}: {e}") from None
        if isinstance(d, dict) and d and set(d) <= SECTIONS:
            d = copy.deepcopy(d)
            d.setdefault("model", {}).setdefault("model_path", "placeholder/model")
            try:
                RFTRunConfig.from_dict(d)
            except ConfigError as e:
                raise AssertionError(f"{where}: {e}") from None
            configs += 1
    assert configs >= 10


def test_json_blocks_load():
    blocks = all_blocks("json")
    assert blocks
    for where, text in blocks:
        for line in text.splitlines():  # JSONL: one record per line
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise AssertionError(f"{where}: {e}") from None


def test_a_validation_error_in_a_block_is_caught():
    """The check can fail: a mistyped key in a config block is refused by the same validation."""
    from rft_ds.config import ConfigError, RFTRunConfig

    with pytest.raises(ConfigError, match="did you mean"):
        RFTRunConfig.from_dict({"model": {"model_path": "m"}, "selection": {"min_scor": 1.0}})


def test_readme_own_task_example_loads_its_data_and_scores(tmp_path, monkeypatch):
    """The README's run on your own JSONL with your own reward function, up to the model: its YAML loads (inputs
    beside it), its JSONL is a prompt source with the metadata the reward needs, its reward imports by name from
    the working directory, passes the start-up argument check, and scores."""
    from rft_ds.config import RFTRunConfig
    from rft_ds.data import load_source, normalize
    from rft_ds.reward_terms import build_terms, check_arguments

    readme = ROOT / "README.md"
    (jsonl,) = [t for lang, _, t in code_blocks(readme) if lang == "json"]
    (reward,) = [t for lang, _, t in code_blocks(readme) if lang == "python" and "def score" in t]
    (config,) = [t for lang, _, t in code_blocks(readme) if lang == "yaml" and "my_reward:score" in t]
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / "data" / name).write_text(jsonl + "\n" + '{"prompt": "What is 2 + 3?", "answer": "5"}\n')
    (tmp_path / "my_reward.py").write_text(reward + "\n")
    (tmp_path / "my_task.yaml").write_text(config + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    cfg = RFTRunConfig.load_yaml("my_task.yaml")
    texts, metas = normalize(load_source(cfg.data.prompts, "prompts", cfg.data.prompt_field), "prompts", "prompt")
    assert texts == ["What is 17 + 25?", "What is 2 + 3?"] and metas[0] == {"answer": "42"}
    terms = build_terms(cfg.reward)
    check_arguments(terms, set(metas[0]))
    outputs = ["17 + 25 = 42", "The answer is 6."]
    scores = terms[0].fn(samples=texts, prompts=texts, outputs=outputs, answer=[m["answer"] for m in metas])
    assert scores == [1.0, 0.0]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs makes an anchor from): lowercase, markup and punctuation dropped."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_links_point_at_files_and_headings():
    """Every relative link in the README names a file of the repository, and a #fragment one of its headings."""
    text = (ROOT / "README.md").read_text()
    links = [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]
    assert len(links) >= 15
    for target in links:
        path, _, fragment = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        assert file.exists(), f"README.md links to {target}: no such file"
        if fragment and file.suffix == ".md":
            assert fragment in anchors(file), f"README.md links to {target}: no such heading in {path}"


def test_readme_is_a_front_door():
    """Short, with the two commands near the top exactly as they run, and every docs page in the site's nav."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    top = "\n".join(lines[:30])
    assert "\nmake demo " in top and "\nmake test " in top
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"


def test_every_config_field_the_pages_name_exists():
    """A `section.field` named in the README or a guide (train.save_interval, model.lora.r, ...) is a field of that
    section's dataclass in rft_ds/config.py: a renamed or removed field cannot linger in the prose."""
    import dataclasses

    from rft_ds import config

    classes = {s: getattr(config, c) for s, c in config_reference_sections().items()}
    fields = {s: {f.name for f in dataclasses.fields(cls)} for s, cls in classes.items()}
    named = re.compile(r"(?<![\w./-])(" + "|".join(fields) + r")\.(\w+)")
    generated = {"config.md", "errors.md", "results.md"}
    found = 0
    for page in PAGES:
        if page.name in generated:
            continue
        for m in named.finditer(page.read_text()):
            section, field = m.groups()
            if field in ("py", "yaml", "jsonl", "json", "md"):  # a file name, not a field
                continue
            found += 1
            assert field in fields[section], f"{page.relative_to(ROOT)} names {m.group(0)}, not a field of {section}"
    assert found >= 100


def config_reference_sections() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tools"))
    import config_reference

    return config_reference.SECTIONS


def test_readme_tool_example_loads_and_its_tool_runs(tmp_path, monkeypatch):
    """The README's agent example: its my_tools.py and its rollout line, added to its my_task.yaml, load as a run
    would (the tool's schema from its signature and docstring), and the calculator computes and refuses."""
    from rft_ds.config import RFTRunConfig
    from rft_ds.rollout import ToolCallError, load_spec

    readme = ROOT / "README.md"
    (tools,) = [t for lang, _, t in code_blocks(readme) if lang == "python" and "def calculator" in t]
    (config,) = [t for lang, _, t in code_blocks(readme) if lang == "yaml" and "my_reward:score" in t]
    rollout = re.search(r"`(rollout: \{.*?\})`", readme.read_text()).group(1)
    (tmp_path / "my_tools.py").write_text(tools + "\n")
    (tmp_path / "my_reward.py").write_text(
        "def score(samples, prompts, outputs, **kwargs):\n    return [0.0] * len(outputs)\n"
    )
    (tmp_path / "my_task.yaml").write_text(config + "\n" + rollout + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RFTRunConfig.load_yaml("my_task.yaml")
    spec = load_spec(cfg.rollout)
    assert [s["function"]["name"] for s in spec.schemas] == ["calculator"]
    env = spec.make_env()
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "347 * 29"}}</tool_call>'
    assert env.step(call)[0][0]["content"] == "10063"
    for bad in ("2 ** 999999", "__import__('os')"):
        with pytest.raises(ToolCallError, match="not arithmetic"):
            env.step(call.replace("347 * 29", bad))
