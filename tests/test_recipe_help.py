"""``--help`` of every recipe and script: every key with its type, default and meaning, from the config dataclasses'
``field(metadata={"help": ...})`` (the schema the docs' config reference is generated from)."""

import dataclasses
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.cli import RecipeError
from recipes.config import field_default, format_default, load_config, parse_script_args, type_name

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("recipes.nlg", "recipes.instruct", "recipes.vision", "recipes.mmlu")
RECIPE_CONFIGS = {"recipes.nlg": "NLGConfig", "recipes.instruct": "InstructConfig", "recipes.vision": "VisionConfig",
                  "recipes.mmlu": "MMLUConfig"}
# Every script that takes arguments -> its options dataclass.
SCRIPTS = {"adapter_sizes": "Options", "bench": "Options", "bench_serving": "Options", "compare_nora_lora": "Options",
           "compression_study": "StudyOptions", "export_cost": "Options", "quant_compare": "Options",
           "report": "Options", "svd_cost": "Options"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def _assert_lists_every_field(text: str, config_cls: type) -> None:
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("hidden"):
            assert f"  --{f.name}  (" not in text
            continue
        flag = f.name if f.metadata.get("positional") else f"--{f.name}"
        default = field_default(f)
        given = "required" if default is dataclasses.MISSING else f"default: {format_default(default)}"
        assert f"  {flag}  (" in text, f"{f.name} missing from --help"
        entry = text.split(f"  {flag}  (", 1)[1].split("\n", 1)[0]
        assert entry.endswith(f", {given})"), (f.name, entry)
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in " ".join(text.split()), f"{f.name}: its help text is not printed"


def test_type_names_read_as_annotations():
    assert type_name(int) == "int"
    assert type_name(str | None) == "str | None"
    assert type_name(list[float] | None) == "list[float] | None"
    assert type_name(dict) == "dict"


@pytest.mark.parametrize("module_name", RECIPES)
def test_every_recipe_config_key_has_a_meaning(module_name):
    config_cls = getattr(importlib.import_module(module_name), RECIPE_CONFIGS[module_name])
    missing = [f.name for f in dataclasses.fields(config_cls) if not str(f.metadata.get("help", "")).strip()]
    assert missing == []


@pytest.mark.parametrize("module_name", RECIPES)
def test_recipe_help_lists_every_key_with_type_default_and_meaning(module_name, capsys):
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {module_name} ")
    _assert_lists_every_field(text, getattr(module, RECIPE_CONFIGS[module_name]))


def test_help_wins_over_other_arguments_and_needs_no_config(capsys):
    from recipes.nlg import NLGConfig

    with pytest.raises(SystemExit) as exit_info:
        load_config(NLGConfig, ["--config", "does/not/exist.yaml", "--bogus", "1", "-h"])
    assert exit_info.value.code == 0
    assert "--source_column" in capsys.readouterr().out


def test_python_dash_m_recipe_help_exits_zero():
    done = subprocess.run([sys.executable, "-m", "recipes.nlg", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m recipes.nlg ")
    assert "--train_file  (str | None, default: null)" in done.stdout


def test_an_unknown_recipe_key_points_at_help():
    from recipes.nlg import NLGConfig

    with pytest.raises(RecipeError, match=r"unknown config key 'num_beam' .*Did you mean: num_beams.*--help lists"):
        load_config(NLGConfig, ["--num_beam", "4"])


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_help_lists_every_option(name, capsys):
    module = _script(name)
    options = getattr(module, SCRIPTS[name])
    missing = [f.name for f in dataclasses.fields(options) if not str(f.metadata.get("help", "")).strip()]
    assert missing == []
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    _assert_lists_every_field(capsys.readouterr().out, options)


@dataclasses.dataclass
class _Options:
    """Options of a script under test."""

    paths: list[str] = dataclasses.field(metadata={"positional": True, "help": "inputs"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "fewer rounds"})
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2], metadata={"help": "sizes"})
    kind: str | None = dataclasses.field(default=None, metadata={"choices": ["a", "b"], "help": "kind"})


def test_script_options_parse_with_argparse_syntax_into_the_dataclass():
    parsed = parse_script_args(_Options, ["x", "y", "--quick", "--sizes", "3", "4", "--kind", "b"], "usage")
    assert parsed == _Options(paths=["x", "y"], quick=True, sizes=[3, 4], kind="b")
    assert parse_script_args(_Options, ["x"], "usage") == _Options(paths=["x"])


@pytest.mark.parametrize("argv", [["x", "--bogus"], ["x", "--kind", "c"], []])
def test_a_bad_script_option_points_at_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_script_args(_Options, argv, "usage")
    assert exit_info.value.code == 2
    assert "--help lists every option" in capsys.readouterr().err
