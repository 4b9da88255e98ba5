"""Every name and behaviour of peft that is not its documented public API and that this package relies on, in one
place (the floor is the oldest peft release that has them all: pyproject.toml, tested by CI's floor job).

peft has no plugin API beyond ``register_peft_method``; a tuner is a ``BaseTuner`` subclass and leans on its private
helpers and hooks as peft's own tuners do. ``tests/test_peft_compat.py`` checks each name and hook below against the
installed peft, so a release that drops or renames one fails loudly, naming it, instead of deep inside a forward.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

#: ``(module, name)`` pairs imported from peft that are private (underscored) or undocumented.
PRIVATE_NAMES = (
    ("peft.tuners._buffer_dict", "BufferDict"),
    ("peft.tuners.tuners_utils", "_ExcludedModule"),
    ("peft.tuners.tuners_utils", "_filter_state_dict_by_key_prefixes"),
    ("peft.tuners.tuners_utils", "_get_in_out_features"),
    ("peft.tuners.tuners_utils", "_get_tuner_state_dict_key_prefixes"),
    ("peft.tuners.tuners_utils", "_maybe_include_all_linear_layers"),
    ("peft.tuners.tuners_utils", "check_adapters_to_merge"),
    ("peft.utils", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    ("peft.utils", "resolve_quantization_backend"),
    ("peft.utils.other", "AuxiliaryTrainingWrapper"),
)

#: ``(class, method or attribute)`` hooks of peft's base classes that the tuners here override or call.
HOOKS = (
    ("peft.tuners.tuners_utils.BaseTuner", "_get_adapter_state_dict"),
    ("peft.tuners.tuners_utils.BaseTuner", "_remap_adapter_state_dict_for_load"),
    ("peft.tuners.tuners_utils.BaseTuner", "_remove_adapter_name_from_key"),
    ("peft.tuners.tuners_utils.BaseTuner", "_prepare_adapter_config"),
    ("peft.tuners.tuners_utils.BaseTuner", "_pre_injection_hook"),
    ("peft.tuners.tuners_utils.BaseTuner", "_check_new_adapter_config"),
    ("peft.tuners.tuners_utils.BaseTuner", "_check_target_module_exists"),
    ("peft.tuners.tuners_utils.BaseTuner", "_create_and_replace"),
    ("peft.tuners.tuners_utils.BaseTuner", "_replace_module"),
    ("peft.peft_model.PeftModel", "_enable_peft_forward_hooks"),  # enters the tuner's (mixed-batch routing)
    ("peft.tuners.tuners_utils.BaseTuner", "_unload_and_optionally_merge"),
    ("peft.tuners.tuners_utils.BaseTuner", "uses_shared_state"),
    ("peft.tuners.tuners_utils.BaseTunerLayer", "_move_adapter_to_device_of_base_layer"),
    ("peft.tuners.tuners_utils.BaseTunerLayer", "_cast_input_dtype"),
    ("peft.tuners.tuners_utils.BaseTunerLayer", "get_base_weight"),
    ("peft.tuners.tuners_utils.BaseTunerLayer", "set_base_weight"),
    # its locals ``safe_serialization`` (refuse_pickled_save), ``save_directory`` and ``is_main_process``; it asks
    # ``peft_config.keys()`` before create_or_update_model_card writes README.md (load_checks._unlink_linked_card)
    ("peft.peft_model.PeftModel", "save_pretrained"),
    ("peft.peft_model.PeftModel", "load_adapter"),  # its locals ``model_id``, ``hf_hub_download_kwargs``, ``self``
)

#: transformers' adapter loader (``model.load_adapter(dir)``, also run by ``AutoModel*.from_pretrained(adapter_dir)``):
#: it builds the config with ``PeftConfig.from_pretrained``, calls ``inject_adapter_in_model`` (our tuner's
#: ``inject_adapter``) and then loads the file's raw tensors itself. Its locals ``peft_model_id``, ``load_config``
#: (``download_kwargs["subfolder"]``), ``adapter_state_dict`` and ``peft_weight_conversions`` (the key renamings it
#: applies afterwards; a list it extends itself) are read by :func:`transformers_load_adapter_call`.
#: ``load_config``, ``peft_weight_conversions`` and ``WeightRenaming`` are what its newer releases (5.25) have; the
#: subfolder is then read from ``adapter_kwargs``, and a quantized adapter is refused with a clear error, without them.
TRANSFORMERS_HOOKS = (("transformers.integrations.peft", "PeftAdapterMixin"),)
TRANSFORMERS_LOAD_ADAPTER_LOCALS = ("peft_model_id", "adapter_state_dict", "adapter_kwargs")


def private_name(module: str, name: str):
    """``module.name`` from the installed peft, or an ImportError that names it and the fix."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        import peft

        raise ImportError(
            f"peft-nola needs {module}.{name}, which peft {peft.__version__} does not have. Install the peft release "
            f"pyproject.toml asks for (pip install -U 'peft>=0.21')."
        ) from None


BufferDict = private_name("peft.tuners._buffer_dict", "BufferDict")
_ExcludedModule = private_name("peft.tuners.tuners_utils", "_ExcludedModule")
_filter_state_dict_by_key_prefixes = private_name("peft.tuners.tuners_utils", "_filter_state_dict_by_key_prefixes")
_get_in_out_features = private_name("peft.tuners.tuners_utils", "_get_in_out_features")
_get_tuner_state_dict_key_prefixes = private_name("peft.tuners.tuners_utils", "_get_tuner_state_dict_key_prefixes")
_maybe_include_all_linear_layers = private_name("peft.tuners.tuners_utils", "_maybe_include_all_linear_layers")
check_adapters_to_merge = private_name("peft.tuners.tuners_utils", "check_adapters_to_merge")
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = private_name(
    "peft.utils", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
)
resolve_quantization_backend = private_name("peft.utils", "resolve_quantization_backend")
AuxiliaryTrainingWrapper = private_name("peft.utils.other", "AuxiliaryTrainingWrapper")


def peft_call_locals(function, depth: Optional[int] = None) -> Optional[dict]:
    """The local variables of the innermost running call of the peft ``function`` (e.g. ``PeftModel.load_adapter``)
    on this thread's stack above the caller, or ``None``; with ``depth``, only the frame that many levels above the
    caller is considered.

    peft passes a tuner's hooks neither the ``safe_serialization`` flag of ``save_pretrained`` nor the directory
    ``load_adapter`` reads; a plugin that must act on them (before peft writes or reads a file) can only read them
    from the caller's frame. The frame is recognised by ``function``'s code object, which is exact.
    """
    code = function.__code__
    frame = sys._getframe(2)
    levels = 0
    while frame is not None and (depth is None or levels <= depth):
        if frame.f_code is code and (depth is None or levels == depth):
            return frame.f_locals
        frame, levels = frame.f_back, levels + 1
    return None


def refuse_pickled_save(method_name: str) -> None:
    """Raise ``ValueError`` when called from ``PeftModel.save_pretrained(..., safe_serialization=False)``.

    That call would write ``adapter_model.bin`` (a pickle), which loading refuses: this package never unpickles an
    adapter. peft builds the state dict before it writes any weights, so this check, run from the tuner's
    state-dict hook, stops the save before a weights file exists (peft has written the model card README.md by then).
    """
    from peft import PeftModel

    caller = peft_call_locals(PeftModel.save_pretrained)
    if caller is not None and caller.get("safe_serialization", True) is False:
        raise ValueError(
            f"{method_name} adapters are saved as safetensors only (adapter_model.safetensors): "
            f"save_pretrained(safe_serialization=False) would write a pickle, adapter_model.bin, which this "
            f"package refuses to load. Call save_pretrained without safe_serialization=False (with the "
            f"Trainer: leave save_safetensors=True)."
        )


def transformers_load_adapter_call() -> Optional[dict]:
    """The local variables of the running ``PeftAdapterMixin.load_adapter`` call of transformers on this thread's
    stack, or ``None`` (transformers not installed, or not called from it). See :data:`TRANSFORMERS_HOOKS`."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:
        return None
    return peft_call_locals(PeftAdapterMixin.load_adapter)


def keep_transformers_from_loading(load_adapter_locals: dict, key_pattern: str, adapter_name: str) -> None:
    """Make the running transformers ``load_adapter`` leave alone the file keys matching the regular expression
    ``key_pattern`` (matched at the end of a key): the tuner loaded and decoded them already from the bytes that
    were checked (the packed coefficients of a quantized adapter do not have the parameters' shapes, and transformers'
    raw copy would fail after the adapter was injected).

    transformers' own list of key renamings is extended, as transformers itself does after injection, with one that
    sends those keys to a name no module has (its load report then lists them as unexpected and the parameters they
    decode to as missing, although they were loaded). ``key_pattern=None`` only checks that this is possible.
    """
    try:
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        WeightRenaming = None
    conversions = load_adapter_locals.get("peft_weight_conversions")
    if WeightRenaming is None or not isinstance(conversions, list):
        raise RuntimeError(
            "peft-nola cannot load this quantized adapter through the installed transformers' load_adapter (it has no "
            "list of key renamings to keep its raw copy of the packed coefficients out). Load it with "
            "PeftModel.from_pretrained(base_model, adapter_dir), or upgrade transformers (5.25 is tested)."
        )
    if key_pattern is None:
        return  # only asked whether it can
    conversions.insert(0, WeightRenaming(rf"({key_pattern})$", rf"\1.peft_nola_loaded_{adapter_name}"))
