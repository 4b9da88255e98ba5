"""NOLA and NoRA as tuners of the stock Hugging Face ``peft`` library.

``import peft_nola`` registers ``"NOLA"`` and ``"NORA"`` with peft, so that ``get_peft_model(model, NolaConfig(...))``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and ``AutoPeftModel*`` work as they do for LoRA.
"""

from ._registry import add_peft_type, register

add_peft_type("NOLA")  # before the config classes are used: their __post_init__ sets peft_type
add_peft_type("NORA")

from .basis import basis_rows, generator_fingerprint, uniform_stream  # noqa: E402
from .hotswap import hotswap_adapter  # noqa: E402
from .quantization import lora_quantization_aware, quantize_coefficients, quantize_lora  # noqa: E402
from .saving import save_pretrained_atomic  # noqa: E402
from .tuners.lowrank import DEFAULT_FACTOR_CACHE_BYTES, GPT2_QV_SLICES, set_factor_cache_budget  # noqa: E402
from .tuners.nola import NolaConfig, NolaLayer, NolaModel  # noqa: E402
from .tuners.nora import NoraConfig, NoraLayer, NoraModel  # noqa: E402

register("nola", NolaConfig, NolaModel, prefix="nola_")
register("nora", NoraConfig, NoraModel, prefix="nora_")

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FACTOR_CACHE_BYTES",
    "GPT2_QV_SLICES",
    "NolaConfig",
    "NolaLayer",
    "NolaModel",
    "NoraConfig",
    "NoraLayer",
    "NoraModel",
    "basis_rows",
    "generator_fingerprint",
    "hotswap_adapter",
    "lora_quantization_aware",
    "quantize_coefficients",
    "quantize_lora",
    "save_pretrained_atomic",
    "set_factor_cache_budget",
    "uniform_stream",
]
