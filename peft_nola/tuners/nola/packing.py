"""How NOLA's coefficients are stored in the adapter file when ``coefficient_bits`` is set: each coefficient tensor
as packed integers under its own key plus a small header tensor under ``"<key>_qheader"``
(:func:`peft_nola.quantization.pack_tensor`); on load the pair becomes the float tensor again."""

from __future__ import annotations

import torch

from ...quantization import HEADER_SUFFIX, pack_tensor, unpack_tensor
from .layer import NolaLayer

COEFFICIENT_NAMES = tuple(f".{name}" for name in NolaLayer.adapter_layer_names)


def pack_coefficients(config, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict ``tensors`` (keys still carrying ``adapter_name``) with every coefficient packed at
    ``config.coefficient_bits`` (unchanged when that is None)."""
    bits = getattr(config, "coefficient_bits", None)
    if bits is None:
        return tensors
    packed = {}
    for key, value in tensors.items():
        param_key = key.removesuffix(f".{adapter_name}")
        if param_key != key and param_key.endswith(COEFFICIENT_NAMES):
            try:
                payload, header = pack_tensor(value, bits, config.quantization_scheme)
            except ValueError as error:
                raise ValueError(f"Cannot save '{param_key}' at {bits} bits: {error}") from None
            packed[key] = payload
            # Named so that peft's removal of the adapter name yields "<coefficient key>_qheader".
            packed[f"{param_key}{HEADER_SUFFIX}.{adapter_name}"] = header
        else:
            packed[key] = value
    return packed


def unpack_coefficients(state_dict: dict[str, torch.Tensor], bits) -> dict[str, torch.Tensor]:
    """A checkpoint state dict with every packed coefficient (payload + header) replaced by its float32 tensor.

    Raises ``ValueError`` when the file and ``coefficient_bits`` disagree: packed tensors without the setting (or at
    another bit width), a coefficient stored in float although the config says it is packed, or a payload whose
    length disagrees with its header.
    """
    headers = {key.removesuffix(HEADER_SUFFIX): key for key in state_dict if key.endswith(HEADER_SUFFIX)}
    if headers and bits is None:
        raise ValueError(
            f"The adapter file holds packed (quantized) coefficients, e.g. '{next(iter(headers))}', but its "
            f"adapter_config.json has no coefficient_bits: the config does not belong to this file."
        )
    unpacked = {}
    for key, value in state_dict.items():
        if key.endswith(HEADER_SUFFIX):
            continue
        if key in headers:
            unpacked[key] = unpack_tensor(value, state_dict[headers[key]], name=key, bits=bits)
        elif bits is not None and key.endswith(COEFFICIENT_NAMES):
            raise ValueError(
                f"adapter_config.json says coefficient_bits={bits}, but '{key}' is stored as a {value.dtype} tensor "
                f"without its '{key}{HEADER_SUFFIX}' header: the config does not belong to this file."
            )
        else:
            unpacked[key] = value
    missing = sorted(set(headers) - set(unpacked))
    if missing:
        raise ValueError(f"The adapter file has the header '{missing[0]}{HEADER_SUFFIX}' but no '{missing[0]}' payload")
    return unpacked
