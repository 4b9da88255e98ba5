"""The public API survives the library's reorganisation: every name ``peft_nola.__all__`` promises, every name the
README's examples and text use, and every module path scripts, recipes and tests import from resolve; the export
command line still starts; and no module of the library imports another in a circle."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import peft_nola

ROOT = Path(__file__).resolve().parents[1]

# (module, name) pairs named in the README (code blocks and text), and imported by scripts/, recipes/ and tests/.
DOCUMENTED = [
    ("peft_nola", "NolaConfig"), ("peft_nola", "NoraConfig"), ("peft_nola", "GPT2_QV_SLICES"),
    ("peft_nola", "hotswap_adapter"), ("peft_nola", "set_factor_cache_budget"), ("peft_nola", "quantize_coefficients"),
    ("peft_nola", "save_pretrained_atomic"), ("peft_nola", "export_lora"), ("peft_nola", "check_adapter_for_model"),
    ("peft_nola.checks", "check_adapter_dir"), ("peft_nola.checks", "AdapterFileError"),
    ("peft_nola.export", "export_lora"), ("peft_nola.export", "ExportError"), ("peft_nola.export", "main"),
    ("peft_nola.export", "CONSUMER_RULES"), ("peft_nola.export", "_llama_permute"),
    ("peft_nola.basis", "uniform_stream"), ("peft_nola.basis", "basis_rows"), ("peft_nola.basis", "basis_scale"),
    ("peft_nola.basis", "stream_keys"), ("peft_nola.svd", "top_singular_triplets"),
    ("peft_nola.svd", "weight_fingerprint"), ("peft_nola.quantization", "SCHEMES"),
    ("peft_nola.model_card", "looks_like_local_path"), ("peft_nola.saving", "_save_lock"),
    ("peft_nola.tuners.lowrank", "DEFAULT_FACTOR_CACHE_BYTES"), ("peft_nola.tuners.lowrank", "FACTOR_CACHE_ENV"),
    ("peft_nola.tuners.lowrank", "FactorCache"), ("peft_nola.tuners.lowrank", "names_module"),
    ("peft_nola.tuners.lowrank", "LowRankLayer"), ("peft_nola.tuners.lowrank", "LowRankTuner"),
    ("peft_nola.tuners.lowrank", "LowRankConfig"),
    ("peft_nola.tuners.nola.layer", "SharedBasisCombiner"), ("peft_nola.tuners.nola.layer", "_BasisCombination"),
    ("peft_nola.tuners.nola.layer", "nola_factors"),
    ("peft_nola", "kernels"), ("peft_nola", "_peft_compat"),
]


@pytest.mark.parametrize("name", sorted(peft_nola.__all__))
def test_every_name_in_all_is_importable(name):
    assert getattr(peft_nola, name) is not None


@pytest.mark.parametrize("module, name", DOCUMENTED, ids=[f"{m}.{n}" for m, n in DOCUMENTED])
def test_every_documented_and_used_name_is_importable(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"


def test_the_readme_names_only_importable_peft_nola_attributes():
    # Every `from peft_nola import a, b` line of the README's code blocks.
    text = (ROOT / "README.md").read_text()
    names = []
    for line in text.splitlines():
        if line.startswith("from peft_nola import "):
            names += [n.strip() for n in line.split("#")[0].removeprefix("from peft_nola import ").split(",")]
    assert names, "the README imports nothing from peft_nola: the check would be vacuous"
    missing = [n for n in names if not hasattr(peft_nola, n)]
    assert not missing


def test_the_export_command_line_still_starts():
    result = subprocess.run([sys.executable, "-m", "peft_nola.export", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "adapter_dir" in result.stdout
    assert "RuntimeWarning" not in result.stderr  # runpy warns when the module was already imported by the package


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """The peft_nola modules ``path`` imports at module level (not inside functions)."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
            continue
        nodes = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else [
            n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
        ] if isinstance(node, ast.Try) else []
        for imp in nodes:
            if isinstance(imp, ast.Import):
                found |= {a.name for a in imp.names if a.name.startswith("peft_nola")}
            elif imp.level:
                base = package.split(".")[: len(package.split(".")) - imp.level + 1]
                target = ".".join(base + ([imp.module] if imp.module else []))
                found.add(target)
                found |= {f"{target}.{a.name}" for a in imp.names}
            elif imp.module and imp.module.startswith("peft_nola"):
                found.add(imp.module)
    return found


def test_no_import_circle_among_the_library_modules():
    package_root = ROOT / "peft_nola"
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package_root.rglob("*.py")}
    graph = {name: {m for m in _module_imports(path, package_root) if m in files and m != name}
             for name, path in files.items()}
    # A module importing its own package's __init__ (or a parent package) is how Python runs packages, not a circle:
    # drop edges from a module to a package containing it.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    # A package's __init__ re-exporting its submodules is not a circle either.
    graph = {name: {m for m in deps if not (path.name == "__init__.py" and m.startswith(name + "."))}
             for (name, deps), path in zip(graph.items(), files.values())}
    state, circles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, f"import circles: {circles}"


def test_no_library_module_is_longer_than_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "peft_nola").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
