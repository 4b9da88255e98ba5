"""Quantized adapter weights at 2-8 bits: the NOLA paper's quantized coefficients (its Section 2 and Table 4).

NOLA stores an adapter as a seed plus coefficients, so quantizing the coefficients shrinks the stored adapter
further while the basis and the base model stay in full precision. Two ways in:

* post-training quantization (PTQ): :func:`quantize_coefficients` rounds a trained adapter's coefficients in place;
  :func:`quantize_lora` does the same to peft LoRA's ``lora_A``/``lora_B`` weights, for the paper's comparison
  (and :func:`lora_quantization_aware` gives LoRA quantization-aware training);
* quantization-aware training (QAT): ``NolaConfig(coefficient_bits=b, quantization_aware=True)``; the forward pass
  uses the quantized coefficients, the optimizer updates full-precision shadow coefficients, and gradients pass the
  rounding unchanged (a straight-through estimator, :func:`fake_quantize`).

Scheme (per tensor, i.e. per adapted layer and factor; one ``scale`` and one ``offset`` each)::

    value = offset + code * scale,     code an unsigned integer in [0, 2**bits - 1]

* ``"affine"`` (the default): the range ``[min(x, 0), max(x, 0)]`` is split into ``2**bits - 1`` steps, using all
  ``2**bits`` codes;
* ``"symmetric"``: ``[-max|x|, max|x|]`` with ``2**bits - 1`` codes centred on an exact zero (3 levels at 2 bits).

Affine is the default because of the 2-bit results of ``scripts/quant_compare.py`` (tiny GPT-2 on E2E, held-out
loss on reference tokens): with only 3 levels, symmetric 2-bit PTQ lost most of the adapters' gain (+1.26 nats for
NOLA, +0.91 for LoRA, against +0.06 and +0.02 with affine), while at 3-8 bits the two schemes stayed within
0.005 nats of each other. Including 0 in the range changes nothing for trained coefficients, which straddle zero,
and keeps every dequantized value exact (below). Per tensor (not per block or per row) because the header then
costs 48 bytes per adapted layer and factor, which is small next to its ``k`` or ``l`` coefficients.

Exactness. ``scale`` is rounded up to 16 significant bits and ``offset`` to a multiple of ``scale``'s last bit, so
``offset + code * scale`` is computed without rounding in float32 (every term is an integer below ``2**24`` times
one power of two). Hence quantizing dequantized values gives back the same codes, scale and offset: saving a
PTQ-quantized or QAT-trained adapter re-quantizes it to the identical values, and a loaded packed adapter
reproduces the in-memory quantized model bit for bit (for float32 coefficients, the adapters' default; a model
cast to bfloat16 rounds the dequantized values again). Rounding the scale up costs a relative ``2**-16`` of
resolution.

Storage. Codes are packed LSB-first into ``ceil(numel * bits / 8)`` bytes (:func:`pack_codes`), stored as a uint8
tensor under the coefficient's own key (e.g. ``...c_attn.nola_coef_A``), next to a float64 header tensor
``...c_attn.nola_coef_A_qheader`` holding ``[format version, bits, scale, offset, *shape]`` (:func:`pack_tensor`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

MIN_BITS, MAX_BITS = 2, 8
SCHEMES = ("affine", "symmetric")
DEFAULT_SCHEME = "affine"
#: Key suffix of the header tensor stored next to each packed tensor.
HEADER_SUFFIX = "_qheader"
HEADER_FORMAT_VERSION = 1
_HEADER_FIXED_FIELDS = 4  # version, bits, scale, offset; the shape follows
_SCALE_SIGNIFICANT_BITS = 16


def validate_bits(bits, name: str = "bits") -> int:
    """Return ``bits`` as an ``int`` if it is an integer from 2 to 8, else raise ``ValueError`` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return int(bits)


def validate_scheme(scheme, name: str = "scheme") -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"{name} must be one of {SCHEMES}, got {scheme!r}")
    return scheme


@dataclass
class QuantizedTensor:
    """``codes`` (uint8, the input's shape) with ``value = offset + codes * scale`` (0-d float32 tensors)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int


def _scale_and_grid_unit(step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``step`` (> 0) rounded up to 16 significant bits, and the value of that scale's last significant bit."""
    mantissa, exponent = torch.frexp(step)  # step = mantissa * 2**exponent, mantissa in [0.5, 1)
    mantissa = torch.ceil(mantissa * 2.0**_SCALE_SIGNIFICANT_BITS) * 2.0**-_SCALE_SIGNIFICANT_BITS
    unit_exponent = exponent - _SCALE_SIGNIFICANT_BITS
    return torch.ldexp(mantissa, exponent), torch.ldexp(torch.ones_like(step), unit_exponent)


def quantize(x: torch.Tensor, bits: int, scheme: str = DEFAULT_SCHEME) -> QuantizedTensor:
    """Quantize ``x`` per tensor (see the module docstring for the schemes). Works in float32; no host sync.

    ``|x - dequantize(quantize(x))| <= scale / 2`` up to float32 rounding (about ``scale * 2**-15``).
    """
    bits = validate_bits(bits)
    validate_scheme(scheme)
    x = x.detach().float()
    if x.numel() == 0:
        zero = x.new_zeros(())
        return QuantizedTensor(torch.zeros_like(x, dtype=torch.uint8), zero, zero.clone(), bits)
    max_code = 2**bits - 1
    if scheme == "symmetric":
        half_range = 2 ** (bits - 1) - 1  # codes 0 .. 2 * half_range, zero at code half_range
        scale, _ = _scale_and_grid_unit(x.abs().max() / half_range)
        offset = -half_range * scale  # exact: an integer below 2**8 times a 16-bit significand
    else:
        low = torch.clamp(x.min(), max=0.0)
        high = torch.clamp(x.max(), min=0.0)
        scale, unit = _scale_and_grid_unit((high - low) / max_code)
        offset = torch.floor(low / unit) * unit  # division by a power of two: exact
    # An all-zero tensor gives scale 0 and offset 0: every code then dequantizes to 0.
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - offset) / safe_scale).clamp_(0, max_code)
    return QuantizedTensor(codes.to(torch.uint8), scale, offset, bits)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """``offset + codes * scale`` in float32 (exact, see the module docstring)."""
    return q.offset + q.codes.float() * q.scale


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values exactly; backward: the gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
        return dequantize(quantize(x, bits, scheme)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


def fake_quantize(x: torch.Tensor, bits: int, scheme: str = DEFAULT_SCHEME) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the forward pass, identity in the backward pass (QAT's STE).

    A custom autograd function rather than ``x + (q - x).detach()``, whose float sum is not always exactly ``q``.
    """
    return _StraightThrough.apply(x, bits, scheme)


# ------------------------------------------------------------------------------------------------------ packing
def packed_length(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` bits each."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any shape, flattened in C order) LSB-first into a 1-D uint8 tensor."""
    bits = validate_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed at {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    bit_stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    padding = (-bit_stream.numel()) % 8
    bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(padding)]).view(-1, 8)
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=flat.device)
    return (bit_stream * weights).sum(1).to(torch.uint8)


def unpack_codes(payload: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: ``numel`` codes as a 1-D uint8 tensor.

    Raises ``ValueError`` unless ``payload`` is a 1-D uint8 tensor of exactly ``ceil(numel * bits / 8)`` bytes.
    """
    bits = validate_bits(bits)
    expected = packed_length(numel, bits)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
        raise ValueError(
            f"a packed payload of {numel} {bits}-bit codes must be a 1-D uint8 tensor of {expected} bytes, got "
            f"{payload.dtype} of shape {tuple(payload.shape)}"
        )
    shifts = torch.arange(8, dtype=torch.int32, device=payload.device)
    bit_stream = ((payload.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits].view(numel, bits)
    weights = 2 ** torch.arange(bits, dtype=torch.int32, device=payload.device)
    return (bit_stream * weights).sum(1).to(torch.uint8)


def pack_tensor(x: torch.Tensor, bits: int, scheme: str = DEFAULT_SCHEME) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` and return ``(payload, header)``: packed uint8 codes and the float64 header
    ``[format version, bits, scale, offset, *shape]`` (float64 holds the float32 scale/offset and the sizes exactly).

    Raises ``ValueError`` if ``x`` holds NaN or Inf (they have no code).
    """
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot quantize a tensor holding NaN or Inf values")
    q = quantize(x, bits, scheme)
    header = torch.tensor(
        [HEADER_FORMAT_VERSION, q.bits, float(q.scale), float(q.offset), *x.shape], dtype=torch.float64
    )
    return pack_codes(q.codes.cpu(), bits), header


def unpack_tensor(payload: torch.Tensor, header: torch.Tensor, name: str = "tensor", bits: Optional[int] = None):
    """The float32 tensor stored as ``(payload, header)`` by :func:`pack_tensor`.

    Raises ``ValueError`` naming ``name`` if the header is malformed, if its bit width differs from ``bits`` (when
    given), or if the payload's length disagrees with the header's shape and bit width.
    """
    fields = header.detach().cpu().to(torch.float64).reshape(-1).tolist() if header.dim() <= 1 else None
    if (
        fields is None
        or len(fields) < _HEADER_FIXED_FIELDS
        or fields[0] != HEADER_FORMAT_VERSION
        or any(v != int(v) or v < 0 for v in [fields[1], *fields[_HEADER_FIXED_FIELDS:]])
    ):
        raise ValueError(
            f"'{name}{HEADER_SUFFIX}' is not a valid quantization header (expected a 1-D tensor [version="
            f"{HEADER_FORMAT_VERSION}, bits, scale, offset, *shape]), got {header.tolist()}"
        )
    stored_bits = int(fields[1])
    if stored_bits < MIN_BITS or stored_bits > MAX_BITS:
        raise ValueError(f"'{name}{HEADER_SUFFIX}' says {stored_bits} bits; only {MIN_BITS}..{MAX_BITS} exist")
    if bits is not None and stored_bits != bits:
        raise ValueError(
            f"'{name}' is stored at {stored_bits} bits but the adapter config says coefficient_bits={bits}"
        )
    shape = tuple(int(v) for v in fields[_HEADER_FIXED_FIELDS:])
    numel = math.prod(shape)
    expected = packed_length(numel, stored_bits)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
        raise ValueError(
            f"The packed payload '{name}' does not match its header: the header describes a {shape} tensor at "
            f"{stored_bits} bits, which takes {expected} bytes, but the payload is a {payload.dtype} tensor of shape "
            f"{tuple(payload.shape)}. The adapter file is corrupt or was edited."
        )
    codes = unpack_codes(payload, stored_bits, numel).view(shape)
    scale = torch.tensor(fields[2], dtype=torch.float32)
    offset = torch.tensor(fields[3], dtype=torch.float32)
    return dequantize(QuantizedTensor(codes, scale, offset, stored_bits))


# --------------------------------------------------------------------------------------------- model-level API
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
    from .tuners.nola import NolaConfig, NolaLayer

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
