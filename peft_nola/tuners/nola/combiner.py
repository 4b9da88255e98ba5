"""The combiner that builds the factors of all NOLA layers sharing a basis in one product per forward pass."""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import TYPE_CHECKING

import torch

from .ops import _BasisCombination, basis_chunks, combine_on_the_fly

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

if TYPE_CHECKING:
    from .layer import NolaLayer


class _PerForward:
    """The combiner's state during one forward pass (or span): the factors built so far, by ``(adapter, grad)``."""

    def __init__(self, by_hook: bool, outer: "_PerForward | None"):
        self.cache: dict[tuple[str, bool], dict] = {}
        self.by_hook = by_hook  # opened by the model's forward pre-hook (closed by its forward hook)
        self.outer = outer  # the state this one replaced, restored when it ends


class SharedBasisCombiner:
    """Computes the factors of a model's NOLA layers, one product per basis during each forward pass of the model.

    The combination ``coefficients @ basis`` is memory-bound: done layer by layer, every layer reads the whole basis
    it shares with the others. While the model's forward runs (``begin``/``end`` are called by hooks on the model),
    the first layer that needs factors triggers the combination for every layer of that adapter, with the coefficient
    rows of all layers sharing a basis stacked into one product, so each basis is read once per forward. Outside a
    forward (merging, checkpoint recomputation during backward, a layer called on its own) each layer is combined on
    its own. Both are the same sums; whether BLAS adds them in the same order for one row as for several depends on
    the CPU's GEMM kernel, so the two agree within float32 rounding (the README's "Exactness"), not bit for bit.

    The per-forward state lives in a context variable, so forwards running at once in several threads each have their
    own. No state outlives its forward: torch runs forward hooks (even ``always_call`` ones) only when the forward
    returns or raises an ``Exception``, not on a ``KeyboardInterrupt`` or another ``BaseException``, so

    - ``PeftModel``'s forward and ``generate`` run inside :meth:`guard` (the tuner's ``_enable_peft_forward_hooks``),
      whose ``finally`` drops whatever an interrupted forward left;
    - a model with injected adapters and no ``PeftModel`` (``inject_adapter_in_model``, transformers'
      ``load_adapter``) has no such entry point: the next forward of the model drops the state an interrupted one
      left (the hooked model never runs inside its own forward), and until then only a NOLA layer's own forward
      could read it; merging, ``get_delta_weight`` and export never do.
    """

    def __init__(self, store: dict[str, torch.Tensor]):
        self.store = store
        self.layers: dict[str, list[NolaLayer]] = {}
        self._state: contextvars.ContextVar[_PerForward | None] = contextvars.ContextVar(
            f"peft_nola_combiner_{id(self)}", default=None)

        # While torch.compile traces (it cannot trace context variables), the state is a plain attribute: it lives
        # only during tracing, and the compiled graph runs no Python in between that could be interrupted.
        self._traced: _PerForward | None = None

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a model: a copy starts outside any forward
        state = self.__dict__.copy()
        del state["_state"]
        state["_traced"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._state = contextvars.ContextVar(f"peft_nola_combiner_{id(self)}", default=None)

    def _current(self) -> "_PerForward | None":
        return self._traced if torch.compiler.is_compiling() else self._state.get()

    def _set_current(self, state: "_PerForward | None") -> None:
        if torch.compiler.is_compiling():
            self._traced = state
        else:
            self._state.set(state)

    def begin(self, *args, **kwargs) -> None:
        """Forward pre-hook of the model: open a forward's state."""
        outer = self._current()
        if outer is not None and outer.by_hook:
            outer = outer.outer  # left by a forward that a BaseException interrupted: dropped
        self._set_current(_PerForward(by_hook=True, outer=outer))

    def end(self, *args, **kwargs) -> None:
        """Forward hook of the model (``always_call``): close the forward's state (the autograd graph keeps what
        backward needs)."""
        state = self._current()
        if state is not None and state.by_hook:
            self._set_current(state.outer)

    @contextlib.contextmanager
    def span(self):
        """Combine every layer's factors in one product per basis while the block runs (e.g. merging all layers);
        not for compiled code."""
        token = self._state.set(_PerForward(by_hook=False, outer=self._state.get()))
        try:
            yield
        finally:
            self._state.reset(token)

    @contextlib.contextmanager
    def guard(self):
        """Drop, when the block exits however it exits, any per-forward state opened inside it."""
        if torch.compiler.is_compiling():
            yield
            return
        token = self._state.set(self._state.get())
        try:
            yield
        finally:
            self._state.reset(token)

    @property
    def in_forward(self) -> bool:
        """Whether a forward pass or span of this combiner is open in the current thread or task."""
        return self._current() is not None

    def register(self, layer: "NolaLayer", adapter_name: str) -> None:
        self.layers.setdefault(adapter_name, []).append(layer)

    def unregister(self, layer: "NolaLayer", adapter_name: str) -> None:
        self.layers[adapter_name] = [other for other in self.layers.get(adapter_name, []) if other is not layer]

    def factors(self, layer: "NolaLayer", adapter_names: list[str],
                from_forward: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(down_flat (S, numel_A), up_flat (S, numel_B))`` of ``layer`` for each of ``adapter_names``; in a
        forward pass every layer's factors of every adapter not yet built are built together (one product per basis
        for all of them). ``from_forward``: asked by the layer's forward (else: merging, ``get_delta_weight``, export,
        which use a model forward's state only inside a :meth:`span`)."""
        state = self._current()
        if state is None or (state.by_hook and not from_forward):
            return self._combine_alone(layer, adapter_names)
        cache = state.cache
        grad = torch.is_grad_enabled()
        missing = [name for name in adapter_names if (name, grad) not in cache]
        if missing:
            pairs = [(other, name) for name in missing for other in self.layers.get(name, [])]
            if any(_is_shard(other, name) for other, name in pairs):
                # FSDP/ZeRO-3 with a unit per block: other blocks' coefficients are still sharded while this block
                # runs, so each layer is combined on its own (one basis read per layer).
                return self._combine_alone(layer, adapter_names)
            combined = self._combine(pairs)
            for name in missing:
                cache[name, grad] = {id(other): combined[id(other), name] for other in self.layers.get(name, [])}
        return [cache[name, grad][id(layer)] for name in adapter_names]

    def basis(self, seed: int, stream: str, num_basis: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """The basis of ``stream`` from the store, generated on first use in float32 and cast once.

        Generated chunk by chunk into its final tensor, so that building it needs no more memory than it keeps
        (generating it whole takes ~5x its size in integer scratch).
        """
        key = re.sub(r"[^0-9A-Za-z_/:x-]", "_", f"{seed}/{stream}/{num_basis}/{like.dtype}")
        basis = self.store.get(key)
        if basis is None or basis.device != like.device:
            self.store.pop(key, None)  # the copy on the old device, freed before the new one is built
            basis = torch.empty(num_basis, numel, dtype=like.dtype, device=like.device)
            for start, rows in basis_chunks(seed, stream, num_basis, numel, like.device, like.dtype):
                basis[start : start + rows.shape[0]] = rows
            self.store[key] = basis
        return basis

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
