"""Quantizing the adapters of a model in place: NOLA's coefficients and, for the paper's baseline, peft LoRA's factors.

The math on tensors (the quantizer, packing, the straight-through estimator) is :mod:`peft_nola.quantization`; this
module walks models and adapter layers.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantization import DEFAULT_SCHEME, dequantize, fake_quantize, quantize, validate_bits, validate_scheme
from .tuners.nola import NolaConfig, NolaLayer


def quantize_coefficients(
    model: torch.nn.Module, bits: int, adapter_name: str = "default", scheme: Optional[str] = None
) -> dict:
    """Post-training quantization of a NOLA adapter's coefficients, in place.

    Every ``nola_coef_A``/``nola_coef_B`` tensor of ``adapter_name`` is replaced by its ``bits``-bit quantized
    values (per tensor, ``scheme``: the adapter config's ``quantization_scheme`` unless given). The adapter config
    then records ``coefficient_bits=bits`` (and the scheme), so ``model.save_pretrained`` writes the packed
    adapter and ``PeftModel.from_pretrained`` reproduces this model's outputs exactly. A quantization-aware adapter
    keeps training at the new bit width.

    Returns:
        ``{"bits", "scheme", "tensors", "coefficients", "max_abs_error"}`` for reporting.
    """
    bits = validate_bits(bits)
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, NolaConfig):
        raise ValueError(
            f"quantize_coefficients needs a model with a NOLA adapter named {adapter_name!r} (a PeftModel made with "
            f"NolaConfig); its adapters are {sorted(getattr(model, 'peft_config', {}))}"
        )
    scheme = validate_scheme(config.quantization_scheme if scheme is None else scheme)
    tensors = coefficients = 0
    max_error = 0.0
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, NolaLayer) or adapter_name not in layer.nola_coef_A:
                continue
            for coef in (layer.nola_coef_A[adapter_name], layer.nola_coef_B[adapter_name]):
                if not bool(torch.isfinite(coef).all()):
                    raise ValueError(f"NaN or Inf coefficients in '{layer.module_key}': nothing was quantized there")
                quantized = dequantize(quantize(coef, bits, scheme)).to(coef.dtype)
                max_error = max(max_error, float((quantized.float() - coef.float()).abs().max()))
                coef.copy_(quantized)
                tensors += 1
                coefficients += coef.numel()
            if layer.coefficient_quantization.get(adapter_name) is not None:
                layer.coefficient_quantization[adapter_name] = (bits, scheme)
    config.coefficient_bits = bits
    config.quantization_scheme = scheme
    return {"bits": bits, "scheme": scheme, "tensors": tensors, "coefficients": coefficients, "max_abs_error": max_error}


class _FakeQuantize(torch.nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: the weight seen by the forward pass is quantized."""

    def __init__(self, bits: int, scheme: str):
        super().__init__()
        self.bits, self.scheme = bits, scheme

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.scheme)


def _lora_factors(model: torch.nn.Module, adapter_name: str) -> list[torch.nn.Module]:
    factors = []
    for module in model.modules():
        for name in ("lora_A", "lora_B"):
            container = getattr(module, name, None)
            if isinstance(container, torch.nn.ModuleDict) and adapter_name in container:
                factors.append(container[adapter_name])
    if not factors:
        raise ValueError(f"found no lora_A/lora_B weights of an adapter named {adapter_name!r}")
    return factors


def lora_quantization_aware(
    model: torch.nn.Module, bits: int, adapter_name: str = "default", scheme: str = DEFAULT_SCHEME
) -> int:
    """Quantization-aware training for a peft LoRA adapter (the NOLA paper's quantized-LoRA baseline).

    Registers a parametrization on every ``lora_A``/``lora_B`` weight of ``adapter_name``: the forward pass uses
    the ``bits``-bit quantized weight (per tensor, ``scheme``), the optimizer updates the full-precision weight
    (``...parametrizations.weight.original``), and gradients pass the rounding unchanged. Call
    :func:`quantize_lora` with the same ``bits`` after training: it removes the parametrizations, leaving the
    quantized weights as plain tensors that peft saves as usual. Returns the number of weights parametrized.
    """
    from torch.nn.utils import parametrize

    bits = validate_bits(bits)
    validate_scheme(scheme)
    factors = _lora_factors(model, adapter_name)
    for factor in factors:
        if parametrize.is_parametrized(factor, "weight"):
            raise ValueError("this LoRA adapter is already quantization-aware; call quantize_lora to finish first")
        parametrize.register_parametrization(factor, "weight", _FakeQuantize(bits, scheme))
    return len(factors)


def quantize_lora(
    model: torch.nn.Module, bits: int, adapter_name: str = "default", scheme: str = DEFAULT_SCHEME
) -> dict:
    """Post-training fake-quantization of a peft LoRA adapter, in place: every ``lora_A``/``lora_B`` weight of
    ``adapter_name`` becomes its ``bits``-bit quantized values (per weight tensor, same scheme as NOLA's
    coefficients). The weights stay float tensors, so the adapter saves and loads as an ordinary LoRA adapter; this
    is for measuring quantized LoRA (the NOLA paper's LoRA-vs-NOLA comparison), not for storage. On an adapter made
    quantization-aware by :func:`lora_quantization_aware` it first replaces the full-precision shadows by the
    quantized weights the forward pass used, and removes the parametrizations.

    Returns:
        ``{"bits", "scheme", "tensors", "parameters", "max_abs_error"}``.
    """
    from torch.nn.utils import parametrize

    bits = validate_bits(bits)
    validate_scheme(scheme)
    tensors = parameters = 0
    max_error = 0.0
    for factor in _lora_factors(model, adapter_name):
        if parametrize.is_parametrized(factor, "weight"):
            parametrize.remove_parametrizations(factor, "weight", leave_parametrized=True)
        weight = factor.weight
        with torch.no_grad():
            quantized = dequantize(quantize(weight, bits, scheme)).to(weight.dtype)
            max_error = max(max_error, float((quantized.float() - weight.float()).abs().max()))
            weight.copy_(quantized)
        tensors += 1
        parameters += weight.numel()
    return {"bits": bits, "scheme": scheme, "tensors": tensors, "parameters": parameters, "max_abs_error": max_error}
