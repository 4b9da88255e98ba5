"""NOLA's layer: each adapted block's factors are coefficient-weighted sums of a seeded random basis,
``A = Σᵢ αᵢ Aᵢ`` and ``B = Σⱼ βⱼ Bⱼ``, and its update is ``nola_alpha / r · B @ A`` (:func:`nola_factors` states it;
the layers compute the same sums through :class:`~.combiner.SharedBasisCombiner`). Everything else a layer does
(wrapping, merging, forward, mixed batches) is :class:`~peft_nola.tuners.lowrank.LowRankLayer`'s.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...basis import uniform_stream
from ...quantization import fake_quantize
from ..lowrank import LowRankLayer
from .combiner import SharedBasisCombiner
from .config import NolaConfig
from .ops import _BasisCombination  # noqa: F401  (imported from here by tests)


@dataclass(frozen=True)
class BasisSpec:
    """Where an adapter's basis comes from: one stream per adapted block for each factor."""

    seed: int
    mode: str
    r: int
    num_basis_A: int
    num_basis_B: int
    numel_A: int  # r * cols: one A_i, flattened (r, cols)
    numel_B: int  # block_rows * r: one B_j, flattened (block_rows, r)
    streams_A: tuple[str, ...]
    streams_B: tuple[str, ...]


def nola_factors(alpha: torch.Tensor, beta: torch.Tensor, basis_A: torch.Tensor, basis_B: torch.Tensor,
                 r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NOLA's factors by their definition, for one adapted weight block: ``A = Σᵢ αᵢ Aᵢ`` and ``B = Σⱼ βⱼ Bⱼ``.

    ``alpha (k,)``, ``basis_A (k, r·cols)`` (row ``i`` is ``Aᵢ`` flattened), ``beta (l,)``, ``basis_B (l, rows·r)``;
    returns ``A (r, cols)`` and ``B (rows, r)``, and the block's update is ``nola_alpha / r · B @ A``. The layers compute
    the same sums faster (:class:`SharedBasisCombiner`: all layers sharing a basis in one product, the basis generated
    on the fly in the per-layer mode); ``tests/test_nola_fast_path.py`` holds every path to this function.
    """
    return (alpha @ basis_A).view(r, -1), (beta @ basis_B).view(-1, r)


@functools.lru_cache(maxsize=4096)
def _basis_spec(*fields) -> BasisSpec:
    # One object per distinct spec: every adapter loaded onto a layer shares it (memory of many resident adapters).
    return BasisSpec(*fields)


class NolaLayer(LowRankLayer):
    """A base layer with NOLA adapters: factors are coefficient-weighted sums of a seeded random basis."""

    adapter_layer_names = ("nola_coef_A", "nola_coef_B")
    other_param_names = ("scaling", "output_slices", "adapter_dropout", "basis_spec", "coefficient_quantization")
    method_name = "nola"

    def _init_adapter_containers(self, config: NolaConfig) -> None:
        self.nola_coef_A = nn.ParameterDict({})
        self.nola_coef_B = nn.ParameterDict({})
        self.basis_spec: dict[str, BasisSpec] = {}
        # adapter name -> (bits, scheme) for quantization-aware adapters (their forward uses quantized coefficients)
        self.coefficient_quantization: dict[str, tuple[int, str] | None] = {}

    def _scale_and_dropout(self, config: NolaConfig) -> tuple[float, float]:
        return config.nola_alpha / config.r, config.nola_dropout

    def _create_adapter(self, adapter_name, config: NolaConfig, block_shape, combiner: SharedBasisCombiner, **kwargs):
        # One combiner per model, shared by its layers; its basis store is a submodule of the model, not of each layer.
        self._combiner = combiner
        block_rows, cols = block_shape
        r, k, l = config.r, config.num_basis_A, config.num_basis_B
        _, adapt = self.output_slices[adapter_name]
        if config.basis_mode == "shared":
            streams_A = (f"A/{r}x{cols}",) * len(adapt)
            streams_B = (f"B/{block_rows}x{r}",) * len(adapt)
        else:
            streams_A = tuple(f"A/{self.module_key}/{block}" for block in adapt)
            streams_B = tuple(f"B/{self.module_key}/{block}" for block in adapt)
        self.basis_spec[adapter_name] = _basis_spec(
            config.basis_seed, config.basis_mode, r, k, l, r * cols, block_rows * r, streams_A, streams_B
        )
        coef_A = torch.zeros(len(adapt), k)
        coef_B = torch.zeros(len(adapt), l)
        for i, block in enumerate(adapt):
            # α ~ U(±sqrt(3/cols)) makes A's entries as large as LoRA's Kaiming-uniform lora_A (variance 1/(3·cols)).
            coef_A[i] = uniform_stream(config.basis_seed, f"alpha/{self.module_key}/{block}", 0, k) * math.sqrt(3 / cols)
            if not config.init_weights:
                coef_B[i] = uniform_stream(config.basis_seed, f"beta/{self.module_key}/{block}", 0, l) * math.sqrt(3 / r)
        self.nola_coef_A[adapter_name] = nn.Parameter(coef_A)
        self.nola_coef_B[adapter_name] = nn.Parameter(coef_B)
        self.coefficient_quantization[adapter_name] = (
            (config.coefficient_bits, config.quantization_scheme) if config.quantization_aware else None
        )
        combiner.register(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._combiner.unregister(self, adapter_name)
        super().delete_adapter(adapter_name)

    def _effective_coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, β)`` as the forward pass sees them: quantized for quantization-aware adapters (the parameters are
        then their full-precision shadows)."""
        coef_A, coef_B = self.nola_coef_A[adapter_name], self.nola_coef_B[adapter_name]
        quantization = self.coefficient_quantization.get(adapter_name)
        if quantization is not None:
            coef_A, coef_B = fake_quantize(coef_A, *quantization), fake_quantize(coef_B, *quantization)
        return coef_A, coef_B

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Outside the layer's forward (merging, get_delta_weight, export)
        return self._shaped([adapter_name], self._combiner.factors(self, [adapter_name], from_forward=False))[0]

    def _build_factors(self, adapter_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The layer's forward
        return self._shaped(adapter_names, self._combiner.factors(self, adapter_names))

    def _shaped(self, adapter_names: list[str], flat: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shaped = []
        for name, (down, up) in zip(adapter_names, flat):
            num_blocks, r = down.shape[0], self.basis_spec[name].r
            shaped.append((down.view(num_blocks, r, self.cols), up.view(num_blocks, -1, r)))
        return shaped
