from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...basis import basis_rows, uniform_stream
from ...quantization import fake_quantize
from ..lowrank import LowRankLayer
from .config import NolaConfig

# Rows of the basis generated at a time by the on-the-fly mode: bounds its scratch memory to ~64 MB per chunk.
_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class BasisSpec:
    """Where an adapter's basis comes from: one stream per adapted block for each factor."""

    seed: int
    mode: str
    num_basis_A: int
    num_basis_B: int
    numel_A: int  # r * cols: one A_i, flattened (r, cols)
    numel_B: int  # block_rows * r: one B_j, flattened (block_rows, r)
    streams_A: tuple[str, ...]
    streams_B: tuple[str, ...]


class _OnTheFlyCombination(torch.autograd.Function):
    """``coef @ basis`` for one stream, generating the basis in chunks in forward and again in backward.

    Nothing of the basis is kept: memory is one chunk, and the gradient ``basis @ grad`` is formed chunk by chunk.
    """

    @staticmethod
    def forward(ctx, coef: torch.Tensor, seed: int, stream: str, numel: int) -> torch.Tensor:
        ctx.basis_args = (seed, stream, coef.shape[0], numel)
        out = None
        for start, rows in _chunks(seed, stream, coef.shape[0], numel, coef.device, coef.dtype):
            part = coef[start : start + rows.shape[0]] @ rows
            out = part if out is None else out + part
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        chunks = _chunks(*ctx.basis_args, grad_out.device, grad_out.dtype)
        return torch.cat([rows @ grad_out for _, rows in chunks]), None, None, None


def _chunks(seed: int, stream: str, num_basis: int, numel: int, device, dtype):
    step = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    for start in range(0, num_basis, step):
        end = min(num_basis, start + step)
        yield start, basis_rows(seed, stream, num_basis, numel, start, end, device=device).to(dtype)


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

    def _rank_and_scale(self, config: NolaConfig) -> tuple[int, float, float]:
        return config.r, config.nola_alpha / config.r, config.nola_dropout

    def _create_adapter(self, adapter_name, config: NolaConfig, block_shape, basis_store: BufferDict, **kwargs):
        # The store is shared by every layer and owned (registered) by the model; plain attribute, not a submodule.
        object.__setattr__(self, "_basis_store", basis_store)
        block_rows, cols = block_shape
        r, k, l = config.r, config.num_basis_A, config.num_basis_B
        _, adapt = self.output_slices[adapter_name]
        if config.basis_mode == "shared":
            streams_A = (f"A/{r}x{cols}",) * len(adapt)
            streams_B = (f"B/{block_rows}x{r}",) * len(adapt)
        else:
            streams_A = tuple(f"A/{self.module_key}/{block}" for block in adapt)
            streams_B = tuple(f"B/{self.module_key}/{block}" for block in adapt)
        self.basis_spec[adapter_name] = BasisSpec(
            config.basis_seed, config.basis_mode, k, l, r * cols, block_rows * r, streams_A, streams_B
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

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.basis_spec[adapter_name]
        coef_A, coef_B = self.nola_coef_A[adapter_name], self.nola_coef_B[adapter_name]
        quantization = self.coefficient_quantization.get(adapter_name)
        if quantization is not None:
            # QAT: the parameters are the full-precision shadows; the forward pass sees their quantized values
            coef_A, coef_B = fake_quantize(coef_A, *quantization), fake_quantize(coef_B, *quantization)
        down = self._combine(coef_A, spec, spec.streams_A, spec.numel_A).view(coef_A.shape[0], spec.numel_A // self.cols, self.cols)
        up_flat = self._combine(coef_B, spec, spec.streams_B, spec.numel_B)
        up = up_flat.view(coef_B.shape[0], spec.numel_B // down.shape[1], down.shape[1])
        return down, up

    def _combine(self, coef: torch.Tensor, spec: BasisSpec, streams: tuple[str, ...], numel: int) -> torch.Tensor:
        """``coef (S, n_basis) -> (S, numel)``: each block's coefficient-weighted sum of its basis."""
        if spec.mode == "per_layer":
            return torch.stack(
                [_OnTheFlyCombination.apply(coef[i], spec.seed, stream, numel) for i, stream in enumerate(streams)]
            )
        if len(set(streams)) == 1:
            return coef @ self._cached_basis(spec.seed, streams[0], coef.shape[1], numel, coef)
        return torch.stack(
            [coef[i] @ self._cached_basis(spec.seed, stream, coef.shape[1], numel, coef) for i, stream in enumerate(streams)]
        )

    def _cached_basis(self, seed: int, stream: str, num_basis: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """The basis of ``stream`` from the model's store, generated on first use in float32 and cast once."""
        key = re.sub(r"[^0-9A-Za-z_/:x-]", "_", f"{seed}/{stream}/{like.dtype}")
        store = self._basis_store
        if key not in store or store[key].device != like.device:
            store[key] = basis_rows(seed, stream, num_basis, numel, device=like.device).to(like.dtype)
        return store[key]
