"""Every name and behaviour of peft that is not its documented public API and that this package relies on, in one
place (the floor is the oldest peft release that has them all: pyproject.toml, tested by CI's floor job).

peft has no plugin API beyond ``register_peft_method``; a tuner is a ``BaseTuner`` subclass and leans on its private
helpers and hooks as peft's own tuners do. ``tests/test_peft_compat.py`` checks each name and hook below against the
installed peft, so a release that drops or renames one fails loudly, naming it, instead of deep inside a forward.
"""

from __future__ import annotations

import importlib
import sys

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
    ("peft.peft_model.PeftModel", "save_pretrained"),  # its local ``safe_serialization``: refuse_pickled_save
)


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


def refuse_pickled_save(method_name: str) -> None:
    """Raise ``ValueError`` when called from ``PeftModel.save_pretrained(..., safe_serialization=False)``.

    That call would write ``adapter_model.bin`` (a pickle), which loading refuses: this package never unpickles an
    adapter. peft builds the state dict before it writes any weights, so this check, run from the tuner's
    state-dict hook, stops the save before a weights file exists. peft passes no flag down to the tuner; the only way
    for a plugin to see it is the caller's frame.
    """
    from peft import PeftModel

    code = PeftModel.save_pretrained.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            if frame.f_locals.get("safe_serialization", True) is False:
                raise ValueError(
                    f"{method_name} adapters are saved as safetensors only (adapter_model.safetensors): "
                    f"save_pretrained(safe_serialization=False) would write a pickle, adapter_model.bin, which this "
                    f"package refuses to load. Call save_pretrained without safe_serialization=False (with the "
                    f"Trainer: leave save_safetensors=True)."
                )
            return
        frame = frame.f_back
