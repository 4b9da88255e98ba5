"""NOLA and NoRA as tuners of the stock Hugging Face ``peft`` library.

``import peft_nola`` registers ``"NOLA"`` and ``"NORA"`` with peft, so that ``get_peft_model(model, NolaConfig(...))``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and ``AutoPeftModel*`` work as they do for LoRA.
"""

from ._registry import add_peft_type, register

add_peft_type("NOLA")  # before the config classes are used: their __post_init__ sets peft_type
add_peft_type("NORA")

from .basis import basis_rows, generator_fingerprint, uniform_stream  # noqa: E402
from .checks import AdapterFileError, check_adapter_dir  # noqa: E402
from .hotswap import hotswap_adapter  # noqa: E402
from .quantize_adapters import lora_quantization_aware, quantize_coefficients, quantize_lora  # noqa: E402
from .saving import save_pretrained_atomic  # noqa: E402
from .tuners.lowrank import (  # noqa: E402
    DEFAULT_FACTOR_CACHE_BYTES,
    GPT2_QV_SLICES,
    check_adapter_for_model,
    set_factor_cache_budget,
)
from .tuners.nola import NolaConfig, NolaLayer, NolaModel  # noqa: E402
from .tuners.nora import NoraConfig, NoraLayer, NoraModel  # noqa: E402

register("nola", NolaConfig, NolaModel, prefix="nola_")
register("nora", NoraConfig, NoraModel, prefix="nora_")

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use, so that `python -m peft_nola.export` does not find its module already imported.
    if name == "export_lora":
        from .export import export_lora

        return export_lora
    raise AttributeError(f"module 'peft_nola' has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "DEFAULT_FACTOR_CACHE_BYTES",
    "GPT2_QV_SLICES",
    "NolaConfig",
    "NolaLayer",
    "NolaModel",
    "NoraConfig",
    "NoraLayer",
    "NoraModel",
    "basis_rows",
    "export_lora",
    "check_adapter_dir",
    "check_adapter_for_model",
    "generator_fingerprint",
    "hotswap_adapter",
    "lora_quantization_aware",
    "quantize_coefficients",
    "quantize_lora",
    "save_pretrained_atomic",
    "set_factor_cache_budget",
    "uniform_stream",
]
