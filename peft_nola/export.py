"""Export a NOLA or NoRA adapter as a plain LoRA adapter that any LoRA consumer can serve.

Both methods add, per adapted weight (or output block), an update of exactly rank ``r``: ``scale · up @ down`` with
``down (r, cols)`` and ``up (rows, r)`` (NOLA: the seeded basis combined with the coefficients; NoRA:
``down = (A B − C₀) V_rᵀ``, ``up = U_r``). peft's LoRA computes ``lora_B(lora_A(x)) · lora_alpha / r``, so
``lora_A = down``, ``lora_B = scale · up`` and ``lora_alpha = r`` reproduce the update with no approximation beyond
float rounding. The cases that need more than that:

* **Fused output slices** (GPT-2's ``c_attn`` with the q and v thirds adapted): one LoRA on the whole layer whose
  ``lora_A`` stacks the S blocks' ``down`` (rank ``S·r``) and whose ``lora_B`` is block-structured (block ``s`` in the
  rows of its slice and the columns of its ``r`` hidden units, zeros elsewhere): the S updates exactly, and zero
  on the slices that are not adapted.
* **Conv2d**: NOLA views the kernel ``(out, in, kh, kw)`` as an ``(out·kh) x (in·kw)`` matrix, while LoRA's
  convolution is ``lora_A`` (a kh x kw convolution to R channels) followed by ``lora_B`` (1x1), i.e. a rank-R
  factorisation of the ``out x (in·kh·kw)`` matrix. Row ``o`` of the latter is the concatenation of NOLA's rows
  ``o·kh … o·kh+kh−1``, so it factors exactly as ``up.view(out, kh·r) @ blockdiag(down, …, down)``: rank
  ``kh·r``. When ``out`` or ``in·kh·kw`` is smaller, the identity on that side is exact at that rank instead.
  Refused: grouped, dilated or non-zero-padded convolutions (peft's ``lora_A`` is an ungrouped, undilated,
  zero-padded convolution, so it would compute another function).
* **Layers of different ranks** in one adapter (a fused layer next to a plain one): every layer is padded with zero
  rows/columns to the largest rank, which every consumer reads (not all read peft's ``rank_pattern``).
* **Quantized coefficients**: the factors are built from the coefficients the forward pass uses (dequantized
  values; for quantization-aware adapters the quantized ones), so the export computes what the model computes.

Refused with a reason: trained biases (``bias != "none"``), an adapter merged into the base weights, NoRA adapters
whose outer factors must be recomputed when no base weights are given. ``modules_to_save`` tensors are carried the
way peft's LoRA saves them. Whenever a consumer would reject the result (vLLM rejects ``modules_to_save``, GPT-2
and convolutions), the export warns, naming the consumer and its reason.

Which serving engines accept the result is written to ``export_report.json`` next to the adapter; the rules come
from the engines' loaders (see :mod:`peft_nola.lora_consumers`); the GGUF writer is :mod:`peft_nola.gguf_export`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._peft_compat import AuxiliaryTrainingWrapper
from .checks import check_adapter_dir
from .constants import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from .errors import ExportError
from .gguf_export import _llama_permute, write_gguf  # noqa: F401  (_llama_permute: imported from here by tests)
from .lora_consumers import CONSUMER_RULES, LLAMA_MODEL_TYPES, consumer_verdicts
from .tuners.lowrank import LowRankLayer, adapted_layers, modules_outside_wrappers, names_module
from .tuners.nola import NolaConfig
from .tuners.nola.memory import available_memory, format_bytes
from .tuners.nora import NoraConfig

FORMATS = ("peft", "gguf")
REPORT_FILE = "export_report.json"
GGUF_FILE = "adapter_model.gguf"
STAGING_PREFIX = ".export-staging-"


def _pad_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``lora_A`` and columns of ``lora_B`` up to ``rank``: the same update at a higher rank."""
    extra = rank - lora_A.shape[0]
    if extra == 0:
        return lora_A, lora_B
    lora_A = torch.cat([lora_A, lora_A.new_zeros(extra, *lora_A.shape[1:])])
    lora_B = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], extra, *lora_B.shape[2:])], dim=1)
    return lora_A, lora_B


# --------------------------------------------------------------------------------------------- checks up front
def _check_exportable(model: PeftModel, adapter_name: str, fmt: str) -> tuple[PeftConfig, list[LowRankLayer]]:
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(model, PeftModel):
        raise ExportError(
            f"export_lora takes a PeftModel with a NOLA or NoRA adapter or an adapter directory, got "
            f"{type(model).__name__}"
        )
    if adapter_name not in model.peft_config:
        raise ExportError(
            f"The model has no adapter named {adapter_name!r}; its adapters are {sorted(model.peft_config)}. "
            f"Pass adapter_name= (--adapter_name) with one of them."
        )
    config = model.peft_config[adapter_name]
    if not isinstance(config, (NolaConfig, NoraConfig)):
        raise ExportError(
            f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not NOLA or NoRA: a LoRA adapter is served "
            f"as it is; other methods cannot be exported by peft_nola."
        )
    if config.bias != "none":
        raise ExportError(
            f"Adapter {adapter_name!r} trains biases (bias={config.bias!r}): the trained biases are base-model "
            f"weights, which a LoRA adapter for vLLM/TGI/llama.cpp cannot carry. Train with bias='none', or merge "
            f"the adapter into the model (merge_and_unload) and serve the merged model."
        )
    layers = adapted_layers(model, adapter_name)
    if not layers:
        raise ExportError(f"Adapter {adapter_name!r} adapts no layer of this model: nothing to export.")
    for layer in layers:
        if adapter_name in layer.merged_adapters:
            raise ExportError(
                f"Adapter {adapter_name!r} is merged into the base weights of '{layer.module_key}': an adapter "
                f"exported now would be added a second time. Call model.unmerge_adapter() first."
            )
        if layer.is_conv2d:
            conv = layer.get_base_layer()
            if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
                raise ExportError(
                    f"'{layer.module_key}' is a Conv2d with groups={conv.groups}, dilation={tuple(conv.dilation)}, "
                    f"padding_mode={conv.padding_mode!r}: peft's LoRA lora_A is an ungrouped, undilated, "
                    f"zero-padded convolution, so no LoRA adapter computes this layer's update. Leave the layer "
                    f"out of target_modules, or merge the adapter (merge_and_unload) and serve the merged model."
                )
    if fmt == "gguf":
        model_type = getattr(model.get_base_model().config, "model_type", None)
        problems = []
        if model_type not in LLAMA_MODEL_TYPES:
            problems.append(f"the base model's type is {model_type!r}, GGUF export supports {LLAMA_MODEL_TYPES}")
        kinds = {type(layer.get_base_layer()).__name__ for layer in layers if layer.is_conv2d or layer.fan_in_fan_out}
        if kinds:
            problems.append(f"it adapts {sorted(kinds)} layers, llama.cpp adapters hold only linear LoRA pairs")
        if config.modules_to_save:
            problems.append(
                f"it has modules_to_save={sorted(config.modules_to_save)}, which llama.cpp's converter rejects "
                f"(full tensors in an adapter)"
            )
        if problems:
            raise ExportError(
                f"Cannot write adapter {adapter_name!r} as a llama.cpp LoRA: {'; '.join(problems)}. "
                f"Use --format peft."
            )
    return config, layers


# ------------------------------------------------------------------------------------------------ loading a dir
def _base_location(path: Union[str, Path]) -> tuple[str, Optional[str]]:
    """``(from_pretrained location, gguf_file)`` for a model directory or a ``.gguf`` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return str(path), None


def _model_class(config, task_type: Optional[str]):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    if task_type == "CAUSAL_LM" or task_type is None:
        return transformers.AutoModelForCausalLM
    raise ExportError(
        f"Cannot tell which model class the adapter's base is (task_type={task_type!r}, no architectures in its "
        f"config): pass the base model itself (base_model=<nn.Module>)."
    )


def _base_config(base: Union[str, Path]):
    """The transformers config of the base ``base`` (a model directory or a ``.gguf`` file); an error names it."""
    from transformers import AutoConfig

    location, gguf_file = _base_location(base)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise ExportError(
            f"Cannot read the base model's config from {str(base)!r}: {error}. Pass base_model= (--base) a model "
            f"directory holding config.json, or a .gguf file."
        ) from None


def _skeleton(base: Union[str, Path], adapter_dir: Path, prefix: str, task_type: Optional[str]) -> nn.Module:
    """The base architecture on the meta device with only the modules the adapter file touches made real (zeros):
    enough to rebuild the adapter's factors when they do not depend on the base weights.

    Nothing is allocated before the adapter's files pass :func:`~peft_nola.checks.check_adapter_dir`, every module the
    file names exists in this base, every full tensor it holds (``modules_to_save``) has the base's shape there, and
    the modules to make real fit in the memory available.
    """
    checked = check_adapter_dir(adapter_dir)
    config = _base_config(base)
    with torch.device("meta"):
        cls = _model_class(config, task_type)
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    weights = adapter_dir / WEIGHTS_NAME
    where = f"the base model {str(base)!r} ({type(model).__name__})"
    another_base = "the adapter was made for another base model: pass base_model= (--base) the model it was trained on"
    paths = set()
    for key, entry in checked.entries.items():
        name = key.removeprefix(KEY_PREFIX)
        own = f".{prefix}" in name
        path = name.split(f".{prefix}")[0] if own else name.rsplit(".", 1)[0]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ExportError(f"{weights} holds '{key}' for the module '{path}', which {where} does not have: "
                              f"{another_base}.") from None
        if not own:  # a full tensor (modules_to_save): it replaces the base's, so it must have its shape
            tensor = getattr(module, name.rsplit(".", 1)[1], None)
            if not isinstance(tensor, torch.Tensor):
                raise ExportError(f"{weights} holds '{key}', but the module '{path}' of {where} has no tensor "
                                  f"'{name.rsplit('.', 1)[1]}': {another_base}.")
            if tuple(tensor.shape) != tuple(entry.shape):
                raise ExportError(f"{weights} holds '{key}' of shape {tuple(entry.shape)}, but {where} has "
                                  f"{tuple(tensor.shape)} there: {another_base}.")
        paths.add(path)
    modules = [model.get_submodule(path) for path in paths]
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}  # nested: once
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    available, what = available_memory(torch.device("cpu"))
    if available is not None and needed > available:
        raise ExportError(
            f"Exporting {adapter_dir} against {where} would allocate {format_bytes(needed)} for the {len(paths)} "
            f"modules the adapter touches, more than the {format_bytes(available)} of {what}: {another_base}, or "
            f"export on a machine with more memory."
        )
    for path in sorted(paths):
        module = model.get_submodule(path)
        module.to_empty(device="cpu", recurse=True)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.zero_()
    return model.eval()


def _load_base(base: Union[str, Path], task_type: Optional[str]) -> nn.Module:
    location, gguf_file = _base_location(base)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    cls = _model_class(_base_config(base), task_type)
    return cls.from_pretrained(location, dtype=torch.float32, **kwargs).eval()


def load_for_export(
    adapter_dir: Union[str, Path], adapter_name: str = "default", base_model: Union[None, str, Path, nn.Module] = None
) -> PeftModel:
    """A PeftModel holding the adapter saved in ``adapter_dir``, built as cheaply as its method allows.

    NOLA, and NoRA saved with its outer factors: only the base's architecture is needed (its config; the layers the
    adapter touches are made on the CPU, everything else stays on the meta device). NoRA saved without its outer
    factors: the base weights it was trained on, checked against its ``weight_fingerprint`` on load. ``base_model``
    is an ``nn.Module`` (adapted in place, as ``PeftModel.from_pretrained`` does), a model directory or a ``.gguf``
    file; ``None`` uses the adapter's ``base_model_name_or_path``.
    """
    import peft_nola  # noqa: F401  (registers the tuners with peft)

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise ExportError(f"{adapter_dir} has no adapter_config.json: pass a directory written by save_pretrained")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if not isinstance(config, (NolaConfig, NoraConfig)):
        raise ExportError(f"{adapter_dir} holds a {config.peft_type} adapter, not NOLA or NoRA")
    needs_weights = isinstance(config, NoraConfig) and not config.store_outer_factors
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        base = base_model or config.base_model_name_or_path
        if not base or not (Path(base).is_dir() or (Path(base).suffix == ".gguf" and Path(base).is_file())):
            what = (
                "the base weights it was trained on (NoRA recomputes its outer factors from them)"
                if needs_weights
                else "the base model's config (architecture and layer shapes; no weights)"
            )
            given = (
                f"the base given, {str(base_model)!r}, is not a model directory or a .gguf file"
                if base_model
                else f"no base was given and the adapter's base_model_name_or_path={config.base_model_name_or_path!r} "
                f"is not a local directory"
            )
            raise ExportError(
                f"Exporting {adapter_dir} needs {what}, but {given}: pass base_model= (--base) a model directory or "
                f".gguf file."
            )
        if needs_weights:
            model = _load_base(base, config.task_type)
        else:
            prefix = "nola_" if isinstance(config, NolaConfig) else "nora_"
            model = _skeleton(base, adapter_dir, prefix, config.task_type)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, config=config)
    except ValueError as error:
        if base_model is None or isinstance(base_model, nn.Module):
            raise
        # The loader's message names the base the adapter records; the one that was tried is the --base given.
        raise ExportError(f"{adapter_dir} does not fit the base given, {str(base_model)!r}: {error}") from error


# ------------------------------------------------------------------------------------------------------- export
def _target_modules(model: PeftModel, keys: list[str]) -> list[str]:
    """The shortest target_modules peft's matcher resolves to exactly ``keys``: their last names if those match no
    other module, else the full keys."""
    names = sorted({key.rsplit(".", 1)[-1] for key in keys})
    wrapped = modules_outside_wrappers(model.get_base_model(), (BaseTunerLayer, AuxiliaryTrainingWrapper))
    matched = {key for key, _ in wrapped if any(names_module(n, key) for n in names)}
    return names if matched == set(keys) else sorted(keys)


def _modules_to_save_tensors(model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """Trained copies of ``modules_to_save`` under the keys peft's LoRA saves them with."""
    tensors = {}
    for key, module in model.get_base_model().named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for name, tensor in module.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{KEY_PREFIX}{key}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors


def export_lora(
    model_or_adapter_dir: Union[PeftModel, str, Path],
    out_dir: Union[str, Path],
    adapter_name: str = "default",
    base_model: Union[None, str, Path, nn.Module] = None,
    format: str = "peft",
) -> dict:
    """Write the NOLA or NoRA adapter ``adapter_name`` as an exactly equivalent LoRA adapter in ``out_dir``.

    Args:
        model_or_adapter_dir: a ``PeftModel`` holding the adapter (what its forward pass computes is exported), or a
            directory written by ``save_pretrained`` (what ``PeftModel.from_pretrained`` would compute from it).
        out_dir: created if needed. ``format="peft"``: ``adapter_config.json`` (``peft_type: LORA``) and
            ``adapter_model.safetensors``, for ``PeftModel.from_pretrained``, vLLM, TGI or llama.cpp's
            ``convert_lora_to_gguf.py``. ``format="gguf"``: ``adapter_model.gguf``, a llama.cpp LoRA adapter
            (LLaMA-architecture bases). Both also get ``export_report.json``.
        adapter_name: which adapter of a model (or the name to load a directory's adapter under).
        base_model: only for a directory: see :func:`load_for_export`.
        format: ``"peft"`` or ``"gguf"``.

    Returns:
        The report written to ``export_report.json``: rank, files, sizes, seconds, and per consumer whether it
        accepts the result (``True``/``False``/``None`` for cannot tell) with the reasons.

    Raises:
        ExportError: for an adapter that cannot be exported exactly, before anything is written.
    """
    start = time.perf_counter()
    source = Path(model_or_adapter_dir) if isinstance(model_or_adapter_dir, (str, Path)) else None
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, source)
    if source is not None:
        model = load_for_export(source, adapter_name, base_model)
    else:
        model = model_or_adapter_dir
    config, layers = _check_exportable(model, adapter_name, format)

    combiner = getattr(model.base_model, "nola_combiner", None)
    with combiner.span() if combiner is not None else nullcontext():  # one basis read for all layers
        factors = {layer.module_key: layer.lora_factors(adapter_name) for layer in layers}
    rank = max(lora_A.shape[0] for lora_A, _ in factors.values())
    factors = {key: _pad_rank(*pair, rank) for key, pair in factors.items()}

    base_config = model.get_base_model().config if hasattr(model.get_base_model(), "config") else None
    model_type = getattr(base_config, "model_type", None)
    extra = _modules_to_save_tensors(model, adapter_name)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=_target_modules(model, list(factors)),
        lora_dropout=getattr(config, "nola_dropout", getattr(config, "nora_dropout", 0.0)),
        fan_in_fan_out=any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers),
        bias="none",
        modules_to_save=sorted(config.modules_to_save) if config.modules_to_save else None,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        task_type=config.task_type,
        inference_mode=True,
    )
    kinds = sorted({type(layer.get_base_layer()).__name__ for layer in layers})
    with _staged(out_dir) as staging:  # written apart, then moved in: links planted in out_dir are replaced
        if format == "peft":
            tensors = {}
            for key, (lora_A, lora_B) in factors.items():
                tensors[f"{KEY_PREFIX}{key}.lora_A.weight"] = lora_A.detach().cpu().contiguous()
                tensors[f"{KEY_PREFIX}{key}.lora_B.weight"] = lora_B.detach().cpu().contiguous()
            tensors.update(extra)
            lora_config.save_pretrained(str(staging))
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            files = [CONFIG_NAME, WEIGHTS_NAME]
            verdicts = consumer_verdicts(lora_config.to_dict(), list(tensors), kinds, model_type)
        else:
            write_gguf(staging / GGUF_FILE, factors, base_config, alpha=float(rank))
            files = [GGUF_FILE]
            verdicts = {"llama.cpp": {"accepts": True, "reasons": []}}
        report = {
            "source": str(source) if source else "in-memory model",
            "method": str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type),
            "adapter_name": adapter_name,
            "format": format,
            "rank": rank,
            "layers": len(layers),
            "layer_types": kinds,
            "files": {name: (staging / name).stat().st_size for name in files},
            "seconds": round(time.perf_counter() - start, 3),
            "consumers": verdicts,
            "rules": {name: CONSUMER_RULES[name] for name in verdicts},
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    rejecting = sorted(name for name, verdict in verdicts.items() if verdict["accepts"] is False)
    if rejecting:
        warnings.warn(
            f"peft loads the exported adapter in {out_dir}, but "
            + "; ".join(f"{name}: {verdicts[name]['reasons'][0]}" for name in rejecting)
            + f" (all reasons in {REPORT_FILE})"
        )
    return report


# ------------------------------------------------------------------------------------------------ output folder
def _check_out_dir(out_dir: Path, source: Optional[Path]) -> None:
    """Refuse, before anything is loaded or written, an output folder the export cannot use or would damage."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise ExportError(f"out_dir {str(out_dir)!r} is a link to nothing: remove it, or pass another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(
            f"out_dir {str(out_dir)!r} exists and is not a folder: pass a folder (created if it does not exist)"
        )
    if source is not None and out_dir.is_dir() and source.exists() and os.path.samefile(source, out_dir):
        raise ExportError(
            f"out_dir {str(out_dir)!r} is the adapter's own folder {str(source)!r}: the LoRA export would overwrite "
            f"the adapter it is made from. Pass another folder, e.g. {str(source.resolve().parent / 'lora')!r}"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME, GGUF_FILE, REPORT_FILE):
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
            raise ExportError(f"{out_dir / name} is a folder, where the export writes the file {name}: move it away, "
                              f"or pass another out_dir")


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """``with _staged(out_dir) as staging:`` the files written into the fresh folder ``staging`` (made inside
    ``out_dir``, so on its file system) are moved into ``out_dir`` with ``os.replace`` when the block succeeds, which
    replaces a link of the same name instead of writing through it. On failure nothing is moved, and an ``out_dir``
    this call created is removed."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    except OSError as error:
        raise ExportError(f"Cannot write into out_dir {str(out_dir)!r}: {error}") from None
    try:
        yield staging
        for entry in sorted(staging.iterdir()):
            os.replace(entry, out_dir / entry.name)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peft_nola.export",
        description="Export a NOLA or NoRA adapter as an exactly equivalent LoRA adapter (peft format or GGUF).",
    )
    parser.add_argument("adapter_dir", help="directory written by save_pretrained")
    parser.add_argument("out_dir", help="where to write the LoRA adapter")
    parser.add_argument("--base", default=None, help="base model directory or .gguf file (default: the adapter's "
                        "base_model_name_or_path); NOLA needs only its config, NoRA without stored factors its weights")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--adapter_name", default="default")
    args = parser.parse_args(argv)
    try:
        report = export_lora(args.adapter_dir, args.out_dir, args.adapter_name, args.base, format=args.format)
    except (ValueError, MemoryError) as error:  # the library's refusals (ExportError, AdapterFileError, checks)
        parser.exit(2, f"error: {error}\n")
    print(json.dumps({k: report[k] for k in ("method", "format", "rank", "layers", "files", "seconds")}))
    for name, verdict in report["consumers"].items():
        state = {True: "accepts", False: "REJECTS", None: "unknown"}[verdict["accepts"]]
        print(f"{name}: {state}" + (f" ({'; '.join(verdict['reasons'])})" if verdict["reasons"] else ""))
    if report["consumers"].get("vllm", {}).get("max_lora_rank"):
        print(f"vllm: serve with --enable-lora --max-lora-rank {report['consumers']['vllm']['max_lora_rank']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
