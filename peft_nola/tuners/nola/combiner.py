"""The combiner that builds the factors of all NOLA layers sharing a basis in one product per forward pass."""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

import torch

from ..._peft_compat import BufferDict
from .ops import _BasisCombination, basis_chunks, combine_on_the_fly

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

if TYPE_CHECKING:
    from .layer import NolaLayer


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
            for start, rows in basis_chunks(seed, stream, num_basis, numel, like.device, like.dtype):
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
