"""How a supported base layer is seen as a weight matrix, which output blocks of it are adapted, and which module
a name in a config names.

Every supported layer is viewed as a weight matrix ``W`` of shape ``(rows, cols)`` acting as ``y = W x``:
``(out_features, in_features)`` for linear layers (GPT-2's ``Conv1D`` stores the transpose, which merging accounts
for) and ``(out_channels * kh, in_channels / groups * kw)`` for ``Conv2d``, whose kernel is the reshaped matrix
(near-square, as in the LoRA and NOLA papers' convolution adapters). An output split into ``splits`` equal blocks
can be adapted on a subset ``adapt`` of them (``output_slices``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..._peft_compat import resolve_quantization_backend

#: ``output_slices`` for GPT-2's fused ``c_attn``: adapt the query and value thirds (the papers' "QV" rows).
GPT2_QV_SLICES = {"c_attn": {"splits": 3, "adapt": [0, 2]}}

SUPPORTED_LAYERS = "torch.nn.Linear, transformers Conv1D, torch.nn.Conv2d, bitsandbytes Linear8bitLt / Linear4bit"


def validate_output_slices(output_slices: Optional[dict]) -> None:
    """Raise ``ValueError`` unless ``output_slices`` maps module-name suffixes to ``{"splits": n, "adapt": [...]}``."""
    if output_slices is None:
        return
    if not isinstance(output_slices, dict):
        raise ValueError(
            f"output_slices must be a dict like {{'c_attn': {{'splits': 3, 'adapt': [0, 2]}}}}, got {output_slices!r}"
        )
    for name, spec in output_slices.items():
        if not isinstance(spec, dict) or set(spec) != {"splits", "adapt"}:
            raise ValueError(
                f"output_slices[{name!r}] must be a dict with exactly the keys 'splits' and 'adapt', got {spec!r}"
            )
        splits, adapt = spec["splits"], spec["adapt"]
        if not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
            raise ValueError(f"output_slices[{name!r}]['splits'] must be an integer >= 1, got {splits!r}")
        if (
            not isinstance(adapt, (list, tuple))
            or not adapt
            or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < splits for i in adapt)
            or len(set(adapt)) != len(adapt)
        ):
            raise ValueError(
                f"output_slices[{name!r}]['adapt'] must be a non-empty list of distinct block indices in "
                f"0..{splits - 1}, got {adapt!r}"
            )


def names_module(name: str, module_key: str) -> bool:
    """Whether ``name`` names the module ``module_key``: the key itself or a dotted suffix of it (peft's rule for
    target_modules given as a list)."""
    return module_key == name or module_key.endswith("." + name)


def modules_outside_wrappers(model: nn.Module, wrapper_types: tuple[type, ...]):
    """``(key, module)`` of every named submodule of ``model`` (the root left out) except those inside a module of
    ``wrapper_types`` (the wrapper itself is included): the modules peft's matcher sees, not the base layers and
    adapter containers that an adapter already wraps."""
    wrapper_prefixes = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(p) for p in wrapper_prefixes):
            continue
        if isinstance(module, wrapper_types):
            wrapper_prefixes.append(key + ".")
        yield key, module


def resolve_slices(output_slices: Optional[dict], module_key: str) -> tuple[int, tuple[int, ...]]:
    """``(splits, adapt)`` for the module ``module_key``: the first ``output_slices`` entry that names it
    (:func:`names_module`), else the whole output ``(1, (0,))``."""
    for name, spec in (output_slices or {}).items():
        if names_module(name, module_key):
            return spec["splits"], tuple(sorted(spec["adapt"]))
    return 1, (0,)


def matrix_shape(base_layer: nn.Module) -> tuple[int, int]:
    """``(rows, cols)`` of the weight matrix a supported layer is viewed as (see the module docstring)."""
    if isinstance(base_layer, nn.Conv2d):
        kh, kw = base_layer.kernel_size
        return base_layer.out_channels * kh, base_layer.in_channels // base_layer.groups * kw
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return out_features, in_features
    return base_layer.out_features, base_layer.in_features


def weight_matrix(base_layer: nn.Module) -> torch.Tensor:
    """The weight of a supported layer as the ``(rows, cols)`` matrix of :func:`matrix_shape` (bitsandbytes weights
    dequantized)."""
    backend = resolve_quantization_backend(base_layer)
    weight = backend.get_base_weight(base_layer) if backend is not None else base_layer.weight
    if isinstance(base_layer, Conv1D):
        return weight.T
    return weight.reshape(matrix_shape(base_layer))


def is_supported(base_layer: nn.Module) -> bool:
    if isinstance(base_layer, (nn.Linear, Conv1D, nn.Conv2d)):
        return True
    backend = resolve_quantization_backend(base_layer)
    return backend is not None and getattr(backend, "backend_name", "") in ("bnb 8bit", "bnb 4bit")

