"""Quantized adapter weights at 2-8 bits: the NOLA paper's quantized coefficients (its Section 2 and Table 4).

NOLA stores an adapter as a seed plus coefficients, so quantizing the coefficients shrinks the stored adapter
further while the basis and the base model stay in full precision. Two ways in:

* post-training quantization (PTQ): :func:`peft_nola.quantize_coefficients` rounds a trained adapter's coefficients
  in place; :func:`peft_nola.quantize_lora` does the same to peft LoRA's ``lora_A``/``lora_B`` weights, for the
  paper's comparison (and :func:`peft_nola.lora_quantization_aware` gives LoRA quantization-aware training); those
  walk models and live in :mod:`peft_nola.quantize_adapters`; this module is the pure math on tensors;
* quantization-aware training (QAT): ``NolaConfig(coefficient_bits=b, quantization_aware=True)``; the forward pass
  uses the quantized coefficients, the optimizer updates full-precision shadow coefficients, and gradients pass the
  rounding unchanged (a straight-through estimator, :func:`fake_quantize`).

Scheme (per tensor, i.e. per adapted layer and factor; one ``scale`` and one ``offset`` each)::

    value = offset + code * scale,     code an unsigned integer in [0, 2**bits - 1]

* ``"affine"`` (the default): the range ``[min(x, 0), max(x, 0)]`` is split into ``2**bits - 1`` steps, using all
  ``2**bits`` codes;
* ``"symmetric"``: ``[-max|x|, max|x|]`` with ``2**bits - 1`` codes centred on an exact zero (3 levels at 2 bits).

Affine is the default because symmetric 2-bit quantization has only 3 levels and lost most of the adapters' gain
in ``scripts/quant_compare.py`` (the README's "Quantized coefficients" has the figures). Including 0 in the range
changes nothing for trained coefficients, which straddle zero, and keeps every dequantized value exact (below). Per tensor (not per block or per row) because the header then
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
