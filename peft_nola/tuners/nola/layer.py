from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..._peft_compat import BufferDict

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

from ... import kernels
from ...basis import basis_rows, basis_scale, stream_keys, uniform_stream
from ...quantization import fake_quantize
from ..lowrank import LowRankLayer
from .config import NolaConfig

# Basis elements generated at a time (on-the-fly mode, and building a stored basis): the generator's scratch is a
# few times this, a few MB.
_CHUNK_ELEMENTS = 2**18


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


class _BasisCombination(torch.autograd.Function):
    """``rows (M, k) @ basis (k, n)`` with the gradient for ``rows`` only.

    The basis is kept as a plain attribute, not a saved tensor, so the node can be traversed by several backward
    passes (one cached combination serves every micro-batch of a step, and reentrant checkpointing re-enters it).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        ctx.basis = basis
        with _no_autocast(rows):
            return rows @ basis

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.to(ctx.basis.dtype).contiguous()
        with _no_autocast(grad):
            return grad @ ctx.basis.T, None


# The on-the-fly combination is a torch custom operator: torch.compile treats it as one opaque call (with the shape
# rule below), so graphs of the per-layer mode neither trace the basis generator's integer arithmetic nor break.
@torch.library.custom_op("peft_nola::combine_on_the_fly", mutates_args=())
def combine_on_the_fly(rows: torch.Tensor, seed: int, streams: str, numel: int) -> torch.Tensor:
    """``rows[s] @ basis_s (M, numel)`` for one basis stream per row of ``rows (M, k)`` (``streams``: their names,
    one per line: an operator's schema has no list of strings), the basis generated now.

    Nothing of the basis is kept; the gradient generates it again. On CUDA with Triton one fused kernel generates
    each tile of every stream's basis in registers and multiplies it in (:mod:`peft_nola.kernels`); elsewhere each
    stream's basis is generated in chunks and multiplied chunk by chunk (memory: one chunk).
    """
    num_basis, streams = rows.shape[1], streams.split("\n")
    with _no_autocast(rows):
        if kernels.available(rows.device):
            return kernels.combine(rows, _device_keys(seed, tuple(streams), rows.device), numel, basis_scale(num_basis))
        outs = []
        for coef, stream in zip(rows, streams):
            out = None
            for start, basis in _chunks(seed, stream, num_basis, numel, rows.device, rows.dtype):
                part = coef[start : start + basis.shape[0]] @ basis
                out = part if out is None else out + part
            outs.append(out)
        return torch.stack(outs)


@combine_on_the_fly.register_fake
def _(rows, seed, streams, numel):
    return rows.new_empty(rows.shape[0], numel)


@torch.library.custom_op("peft_nola::combine_on_the_fly_grad", mutates_args=())
def combine_on_the_fly_grad(grad_out: torch.Tensor, seed: int, streams: str, num_basis: int) -> torch.Tensor:
    """The gradient of :func:`combine_on_the_fly` for its ``rows``: ``grad_out[s] @ basis_sᵀ (M, num_basis)``."""
    streams = streams.split("\n")
    with _no_autocast(grad_out):
        if kernels.available(grad_out.device):
            keys = _device_keys(seed, tuple(streams), grad_out.device)
            return kernels.combine_grad(grad_out, keys, num_basis, basis_scale(num_basis))
        numel = grad_out.shape[1]
        return torch.stack([
            torch.cat([basis @ g for _, basis in _chunks(seed, stream, num_basis, numel, g.device, g.dtype)])
            for g, stream in zip(grad_out, streams)
        ])


@combine_on_the_fly_grad.register_fake
def _(grad_out, seed, streams, num_basis):
    return grad_out.new_empty(grad_out.shape[0], num_basis)


def _combine_on_the_fly_setup(ctx, inputs, output):
    rows, seed, streams, _ = inputs
    ctx.basis_args = (seed, streams, rows.shape[1])
    ctx.dtype = rows.dtype


def _combine_on_the_fly_backward(ctx, grad_out):
    seed, streams, num_basis = ctx.basis_args
    return combine_on_the_fly_grad(grad_out.to(ctx.dtype).contiguous(), seed, streams, num_basis), None, None, None


combine_on_the_fly.register_autograd(_combine_on_the_fly_backward, setup_context=_combine_on_the_fly_setup)


@functools.lru_cache(maxsize=1024)
def _device_keys(seed: int, streams: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """The streams' keys on ``device`` for the fused kernels, made once (a host-to-device copy per step would
    synchronise the stream)."""
    return kernels.keys_tensor([stream_keys(seed, stream) for stream in streams], device)


def _no_autocast(like: torch.Tensor):
    """The basis combination runs in the coefficients' dtype: under autocast (AMP) only the adapter's products with
    the activations drop to bf16/fp16, not the sum over the k basis matrices."""
    return torch.autocast(like.device.type, enabled=False)


def _chunks(seed: int, stream: str, num_basis: int, numel: int, device, dtype):
    step = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    for start in range(0, num_basis, step):
        end = min(num_basis, start + step)
        yield start, basis_rows(seed, stream, num_basis, numel, start, end, device=device).to(dtype)


class SharedBasisCombiner:
    """Computes the factors of a model's NOLA layers, one product per basis during each forward pass of the model.

    The combination ``coefficients @ basis`` is memory-bound: done layer by layer, every layer reads the whole basis
    it shares with the others. While the model's forward runs (``begin``/``end`` are called by hooks on the model),
    the first layer that needs factors triggers the combination for every layer of that adapter, with the coefficient
    rows of all layers sharing a basis stacked into one product, so each basis is read once per forward. Outside a
    forward (merging, checkpoint recomputation during backward, a layer called on its own) each layer is combined on
    its own. Both are the same sums; whether BLAS adds them in the same order for one row as for several depends on
    the CPU's GEMM kernel, so the two agree within float32 rounding (the README's "Exactness"), not bit for bit.
    """

    def __init__(self, store: BufferDict):
        self.store = store
        self.layers: dict[str, list[NolaLayer]] = {}
        self.depth = 0
        self.cache: dict[tuple[str, bool], dict] = {}

    def begin(self, *args, **kwargs) -> None:
        self.depth += 1

    def end(self, *args, **kwargs) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.cache.clear()  # the autograd graph keeps what backward needs

    @contextlib.contextmanager
    def span(self):
        """Combine every layer's factors in one product per basis while the block runs (e.g. merging all layers)."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def register(self, layer: "NolaLayer", adapter_name: str) -> None:
        self.layers.setdefault(adapter_name, []).append(layer)

    def unregister(self, layer: "NolaLayer", adapter_name: str) -> None:
        self.layers[adapter_name] = [other for other in self.layers.get(adapter_name, []) if other is not layer]

    def factors(self, layer: "NolaLayer", adapter_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(down_flat (S, numel_A), up_flat (S, numel_B))`` of ``layer`` for each of ``adapter_names``; in a
        forward pass every layer's factors of every adapter not yet built are built together (one product per basis
        for all of them)."""
        if self.depth == 0:
            return self._combine_alone(layer, adapter_names)
        grad = torch.is_grad_enabled()
        missing = [name for name in adapter_names if (name, grad) not in self.cache]
        if missing:
            pairs = [(other, name) for name in missing for other in self.layers.get(name, [])]
            if any(_is_shard(other, name) for other, name in pairs):
                # FSDP/ZeRO-3 with a unit per block: other blocks' coefficients are still sharded while this block
                # runs, so each layer is combined on its own (one basis read per layer).
                return self._combine_alone(layer, adapter_names)
            combined = self._combine(pairs)
            for name in missing:
                self.cache[name, grad] = {id(other): combined[id(other), name] for other in self.layers.get(name, [])}
        return [self.cache[name, grad][id(layer)] for name in adapter_names]

    def basis(self, seed: int, stream: str, num_basis: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """The basis of ``stream`` from the store, generated on first use in float32 and cast once.

        Generated chunk by chunk into its final tensor, so that building it needs no more memory than it keeps
        (generating it whole takes ~5x its size in integer scratch).
        """
        key = re.sub(r"[^0-9A-Za-z_/:x-]", "_", f"{seed}/{stream}/{num_basis}/{like.dtype}")
        if key not in self.store or self.store[key].device != like.device:
            if key in self.store:
                del self.store[key]  # the copy on the old device, freed before the new one is built
            basis = torch.empty(num_basis, numel, dtype=like.dtype, device=like.device)
            for start, rows in _chunks(seed, stream, num_basis, numel, like.device, like.dtype):
                basis[start : start + rows.shape[0]] = rows
            self.store[key] = basis
        return self.store[key]

    def _combine_alone(self, layer: "NolaLayer", adapter_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``layer``'s factors of each adapter, combined without the other layers."""
        combined = self._combine([(layer, name) for name in adapter_names])
        return [combined[id(layer), name] for name in adapter_names]

    def _combine(self, pairs: list[tuple["NolaLayer", str]]) -> dict:
        """``{(layer id, adapter name): (down_flat, up_flat)}`` for the ``(layer, adapter name)`` pairs."""
        # Each layer's coefficient tensor (S, k) is cut into runs of blocks that use the same basis stream (the whole
        # tensor in shared mode, single blocks in per-layer mode); all runs of one stored basis (of every layer and
        # adapter) are stacked into one product, and all blocks of one basis size generated on the fly (per-layer
        # mode) into one combination.
        groups: dict[tuple, list] = {}  # basis key -> [(owner, position in parts, rows (n, k), streams)]
        parts: dict[tuple, list] = {}  # (layer id, adapter name, factor) -> the combined runs, in block order
        for layer, adapter_name in pairs:
            spec = layer.basis_spec[adapter_name]
            coefficients = layer._effective_coefficients(adapter_name)
            for factor, coef, streams, numel in zip("AB", coefficients, (spec.streams_A, spec.streams_B),
                                                    (spec.numel_A, spec.numel_B)):
                owner = (id(layer), adapter_name, factor)
                parts[owner] = []
                start = 0
                while start < len(streams):
                    end = start + 1
                    while end < len(streams) and streams[end] == streams[start]:
                        end += 1
                    rows = coef if end - start == len(streams) else coef[start:end]
                    # a stored basis is named in the key; generated on the fly (None), each row names its stream
                    stored = None if spec.mode == "per_layer" else streams[start]
                    key = (spec.seed, stored, coef.shape[1], numel, coef.device, coef.dtype)
                    groups.setdefault(key, []).append((owner, len(parts[owner]), rows, streams[start:end]))
                    parts[owner].append(None)
                    start = end
        for key, members in groups.items():
            seed, stream, num_basis, numel, _, _ = key
            stacked = members[0][2] if len(members) == 1 else torch.cat([rows for _, _, rows, _ in members])
            if stream is None:
                streams = "\n".join(name for *_, names in members for name in names)
                combined = combine_on_the_fly(stacked, seed, streams, numel)
            else:
                basis = self.basis(seed, stream, num_basis, numel, stacked)
                combined = _BasisCombination.apply(stacked, basis)
            pieces = combined.split([rows.shape[0] for _, _, rows, _ in members]) if len(members) > 1 else [combined]
            for (owner, position, _, _), piece in zip(members, pieces):
                parts[owner][position] = piece
        return {
            (id(layer), name): tuple(
                runs[0] if len(runs) == 1 else torch.cat(runs)
                for runs in (parts[id(layer), name, "A"], parts[id(layer), name, "B"])
            )
            for layer, name in pairs
        }


def _is_shard(layer: "NolaLayer", adapter_name: str) -> bool:
    """Whether ``layer``'s coefficients are a shard (FSDP2/DTensor) or an empty placeholder (FSDP1, ZeRO-3)."""
    return any(
        isinstance(coef, DTensor) or coef.numel() == 0
        for coef in (layer.nola_coef_A[adapter_name], layer.nola_coef_B[adapter_name])
    )


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
        return self._build_factors([adapter_name])[0]

    def _build_factors(self, adapter_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shaped = []
        for name, (down, up) in zip(adapter_names, self._combiner.factors(self, adapter_names)):
            num_blocks, r = down.shape[0], self.basis_spec[name].r
            shaped.append((down.view(num_blocks, r, self.cols), up.view(num_blocks, -1, r)))
        return shaped
