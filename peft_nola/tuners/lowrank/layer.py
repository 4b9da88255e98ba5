"""The layer half of the mechanism NOLA and NoRA share: a frozen base layer plus, per adapter, ``scale * up @ down``.

A method subclasses :class:`LowRankLayer` and only says how its factors are built and which tensors train, through
four hooks: :meth:`LowRankLayer._init_adapter_containers` (the per-adapter containers),
:meth:`LowRankLayer._create_adapter` (an adapter's tensors), :meth:`LowRankLayer._factors` (its factors) and
:meth:`LowRankLayer._scale_and_dropout`. Everything else lives here once: wrapping ``nn.Linear``, GPT-2's ``Conv1D``,
``nn.Conv2d`` and bitsandbytes 8-bit/4-bit layers; adapting chosen slices of a fused output (the q and v thirds of
GPT-2's ``c_attn``); merge/unmerge; mixed-adapter batches (:mod:`.mixed_batch`); the inference factor cache
(:mod:`.factor_cache`); dtype handling.

Shapes (see :mod:`.geometry`): the base weight is a ``(rows, cols)`` matrix; an output split into ``splits`` equal
blocks can be adapted on a subset ``adapt`` of them; each adapted block ``s`` has its own factors
``down[s]: (r, cols)`` and ``up[s]: (rows / splits, r)`` and its update is ``scale * up[s] @ down[s]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..._peft_compat import _get_in_out_features, check_adapters_to_merge, resolve_quantization_backend
from .factor_cache import FactorCache
from .geometry import matrix_shape, resolve_slices
from .mixed_batch import FactorGroup, grouped_delta

# Every adapter created on a layer gets a fresh number: cache entries are keyed by it, so an adapter deleted and
# loaded again under the same name (possibly into recycled memory) never meets the old adapter's factors.
_adapter_tokens = itertools.count()

# The adapter assignment of the mixed-batch forward running in this thread (or asyncio task): set around a forward by
# the tuner (``forward(..., adapter_names=[...])``, see :func:`mixed_batch_assignment`) and read by every layer. A
# context variable rather than per-call forward hooks on shared modules, which concurrent forwards from several
# threads would each see.
_ADAPTER_NAMES: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("peft_nola_adapter_names",
                                                                              default=None)


@contextlib.contextmanager
def mixed_batch_assignment(adapter_names: list[str]):
    """While the block runs, in this thread or task only, every NOLA/NoRA layer (and peft's ``modules_to_save``
    wrappers, through :func:`adapter_names_from_context`) runs sample ``i`` with ``adapter_names[i]``."""
    token = _ADAPTER_NAMES.set(adapter_names)
    try:
        yield
    finally:
        _ADAPTER_NAMES.reset(token)


def adapter_names_from_context(module, args, kwargs):
    """Forward pre-hook (``with_kwargs=True``) for modules that take ``adapter_names`` as a keyword (peft's
    ``AuxiliaryTrainingWrapper``): passes the assignment of the current context, if any."""
    adapter_names = _ADAPTER_NAMES.get()
    if adapter_names is None or "adapter_names" in kwargs:
        return None
    return args, {**kwargs, "adapter_names": adapter_names}


class LowRankLayer(nn.Module, BaseTunerLayer):
    """A frozen base layer plus, per adapter, ``scale * up @ down`` on the adapted output blocks.

    Subclasses set ``adapter_layer_names`` (the trainable containers) and ``other_param_names`` (which must include
    ``"scaling"``, ``"output_slices"``, ``"adapter_dropout"``), and implement ``_create_adapter`` and ``_factors``.
    """

    method_name = "low-rank"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PeftConfig, module_key: str, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.module_key = module_key
        self.rows, self.cols = matrix_shape(self.get_base_layer())
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())  # as peft's LoRA layers
        self.is_conv2d = isinstance(self.get_base_layer(), nn.Conv2d)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.scaling: dict[str, float] = {}
        self.output_slices: dict[str, tuple[int, tuple[int, ...]]] = {}
        # Dropout probabilities, applied functionally: a module per adapter and layer would make every module walk
        # (peft does several per load_adapter) grow with the number of loaded adapters.
        self.adapter_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        # Inference factor cache state: the model's cache (given by the tuner), each adapter's cache token, and the
        # stacked factors of the last mixed batch (see _grouped_factors).
        self._factor_cache: Optional[FactorCache] = None
        self._factor_tokens: dict[str, int] = {}
        self._batch_plan = None
        self._init_adapter_containers(config)
        self.update_layer(adapter_name, config, **kwargs)

    # ----------------------------------------------------------------------------------------------- method hooks
    def _init_adapter_containers(self, config: PeftConfig) -> None:
        """Create the (empty) per-adapter containers named in ``adapter_layer_names`` / ``other_param_names``."""
        raise NotImplementedError

    def _create_adapter(self, adapter_name: str, config: PeftConfig, block_shape: tuple[int, int], **kwargs) -> None:
        """Create the adapter's tensors; ``block_shape`` is ``(rows / splits, cols)`` of each adapted block."""
        raise NotImplementedError

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``down (S, r, cols)`` and ``up (S, rows / splits, r)`` for the S adapted blocks, with autograd."""
        raise NotImplementedError

    def _scale_and_dropout(self, config: PeftConfig) -> tuple[float, float]:
        """``(scale, dropout probability)`` of an adapter from its config."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------------- set-up
    def update_layer(self, adapter_name: str, config: PeftConfig, inference_mode: bool = False, **kwargs) -> None:
        splits, adapt = resolve_slices(config.output_slices, self.module_key)
        if self.rows % splits:
            raise ValueError(
                f"output_slices splits '{self.module_key}' into {splits} blocks, but its output size {self.rows} is "
                f"not divisible by {splits}"
            )
        if splits > 1 and self.is_conv2d:
            raise ValueError(f"output_slices cannot be used on the Conv2d layer '{self.module_key}'")
        scale, dropout = self._scale_and_dropout(config)
        self._factor_cache = kwargs.pop("factor_cache", None)
        self._forget_factors(adapter_name)
        self._factor_tokens[adapter_name] = next(_adapter_tokens)
        self.output_slices[adapter_name] = (splits, adapt)
        self.scaling[adapter_name] = scale
        self.adapter_dropout[adapter_name] = dropout
        self._create_adapter(adapter_name, config, (self.rows // splits, self.cols), **kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_scale_from_config(self, adapter_name: str, config: PeftConfig) -> None:
        """Set the adapter's scale to the one ``config`` gives (its dropout is kept); used by hotswapping."""
        self.scaling[adapter_name] = self._scale_and_dropout(config)[0]

    # ------------------------------------------------------------------------------------------ factor cache
    #: The per-adapter containers (ParameterDict / BufferDict) an adapter's factors are computed from; their
    #: changes invalidate cached factors.
    factor_input_names: tuple[str, ...] = ()

    def _factor_inputs(self, adapter_name: str) -> list[torch.Tensor]:
        # Read from the containers' own dicts: ParameterDict.__getitem__ and Module.__getattr__ cost microseconds,
        # paid per layer and forward.
        inputs = []
        for name in self.adapter_layer_names + self.factor_input_names:
            container = self._modules[name]
            tensors = container._parameters if isinstance(container, nn.ParameterDict) else container._buffers
            inputs.append(tensors[adapter_name])
        return inputs

    def _factor_stamp(self, adapter_name: str) -> Optional[tuple]:
        """Per tensor the adapter's factors are built from: its in-place version, storage address and dtype (a move to
        another device or dtype, or a replaced ``.data``, gives it new storage; ``t.device`` is slow to read). None
        when one is an inference tensor (made under ``torch.inference_mode()``): it has no version counter, so its
        factors are built at every forward. Sound only with :meth:`_factor_pins` kept alongside (see there)."""
        stamp = []
        for t in self._factor_inputs(adapter_name):
            if t.is_inference():
                return None
            stamp.append((t._version, t.data_ptr(), t.dtype))
        return tuple(stamp)

    def _factor_pins(self, adapter_name: str) -> tuple:
        """The storages of the tensors a stamp was taken from, kept as long as the factors built from them: while
        a storage lives its address belongs to it, so a tensor found at a stamped address later is a view of the same
        storage (whose in-place writes bump the version), never new memory the allocator handed out again (after
        ``.half().float()`` or parameters replaced twice)."""
        return tuple(t.untyped_storage() for t in self._factor_inputs(adapter_name))

    def _build_factors(self, adapter_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh factors of several adapters; methods that can build them together override this."""
        return [self._factors(name) for name in adapter_names]

    def _current_factors(self, adapter_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(down, up)`` of each named adapter (see :meth:`_factors`): from the model's :class:`FactorCache` in
        inference while their tensors are unchanged, else built (the missing ones together) and cached."""
        cache = self._factor_cache
        if cache is None or not cache.usable():
            return self._build_factors(adapter_names)
        found, missing = {}, []
        for name in adapter_names:
            stamp = self._factor_stamp(name)
            factors = None if stamp is None else cache.lookup(self._factor_tokens[name], name, stamp)
            if factors is None:
                missing.append((name, stamp))
            else:
                found[name] = factors
        if missing:
            for (name, stamp), factors in zip(missing, self._build_factors([name for name, _ in missing])):
                if stamp is not None:
                    cache.store(self._factor_tokens[name], name, stamp, factors, pins=self._factor_pins(name))
                found[name] = factors
        return [found[name] for name in adapter_names]

    def _forget_factors(self, adapter_name: str) -> None:
        if self._factor_cache is not None and adapter_name in self._factor_tokens:
            self._factor_cache.discard(self._factor_tokens[adapter_name], adapter_name)
        self._batch_plan = None

    def train(self, mode: bool = True):
        if mode:
            for adapter_name in list(self._factor_tokens):
                self._forget_factors(adapter_name)
        return super().train(mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._forget_factors(adapter_name)
        self._factor_tokens.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # ---------------------------------------------------------------------------------------------------- math
    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` plus the adapter's contribution to the layer's output for input ``x``."""
        (down, up), = self._current_factors([adapter_name])
        x = self._cast_input_dtype(x, down.dtype)
        if self.adapter_dropout[adapter_name] > 0:
            x = F.dropout(x, self.adapter_dropout[adapter_name], self.training)
        scale = self.scaling[adapter_name]
        if self.is_conv2d:
            delta = self.get_base_layer()._conv_forward(x, self._conv_kernel(down, up) * scale, None)
            return result + delta.to(result.dtype)
        num_blocks, r, _ = down.shape
        hidden = F.linear(x, down.reshape(num_blocks * r, self.cols))  # (..., S * r)
        up = self._full_up(up, adapter_name)  # (rows, S * r): one product covers every adapted block
        if result.dtype != hidden.dtype:
            return result + (F.linear(hidden, up) * scale).to(result.dtype)
        # addmm adds the scaled product to the base output in one pass over it.
        flat = torch.addmm(result.reshape(-1, self.rows), hidden.reshape(-1, num_blocks * r), up.T, alpha=scale)
        return flat.view(result.shape)

    def _full_up(self, up: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The output-side factors ``(S, rows / splits, r)`` as one ``(rows, S * r)`` matrix: block ``s`` sits in the
        rows of its output slice and the columns of its ``r`` hidden units, zeros elsewhere."""
        splits, adapt = self.output_slices[adapter_name]
        if splits == 1:
            return up[0]
        num_blocks, block_rows, r = up.shape
        blocks = torch.block_diag(*up.unbind(0)).split(block_rows)  # block s in columns s*r:(s+1)*r
        # Placed by concatenation rather than an index tensor, which would be a synchronising host-to-device copy.
        zeros = blocks[0].new_zeros(block_rows, num_blocks * r)
        by_slice = dict(zip(adapt, blocks))
        return torch.cat([by_slice.get(j, zeros) for j in range(splits)])

    def _conv_kernel(self, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return (up[0] @ down[0]).view(self.get_base_layer().weight.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's weight update, shaped and laid out like the base layer's weight."""
        with torch.no_grad():
            down, up = self._factors(adapter_name)
        scale = self.scaling[adapter_name]
        if self.is_conv2d:
            return self._conv_kernel(down, up) * scale
        # Each adapted block's product written straight into its rows, scaled inside the GEMM: no products with the
        # zero blocks of the full up matrix, and no second pass over the (rows, cols) result.
        splits, adapt = self.output_slices[adapter_name]
        block_rows = self.rows // splits
        delta = down.new_empty(self.rows, self.cols)
        for j in range(splits):
            rows = delta[j * block_rows : (j + 1) * block_rows]
            if j in adapt:
                block = adapt.index(j)
                torch.addmm(rows, up[block], down[block], beta=0, alpha=scale, out=rows)
            else:
                rows.zero_()
        return delta.T if self.fan_in_fan_out else delta

    # ------------------------------------------------------------------------------------------- merge/unmerge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or the named) adapters' updates into the base weight.

        With ``safe_merge`` the sum is formed in a copy and checked for NaN/Inf before it replaces the weight.
        """
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self.scaling:
                continue
            weight = self.get_base_weight()
            if safe_merge:
                weight = weight.clone()
            weight += self.get_delta_weight(adapter_name).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs or Infs in the merged weights of '{self.module_key}': adapter {adapter_name!r}")
            self.set_base_weight(weight)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's update from the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            weight = self.get_base_weight()
            weight -= self.get_delta_weight(adapter_name).to(weight.dtype)
            self.set_base_weight(weight)

    # ------------------------------------------------------------------------------------------ as LoRA factors
    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(lora_A.weight, lora_B.weight)`` of a peft LoRA layer that adds exactly this adapter's update, scale
        folded into ``lora_B`` (so ``lora_alpha = r``); used by :func:`peft_nola.export_lora`.

        Linear-like layers: ``lora_A (S·r, cols)`` (the S blocks' ``down`` stacked), ``lora_B (rows, S·r)`` (the
        block-structured ``up``). Conv2d: ``lora_A (R, in, kh, kw)``, ``lora_B (out, R, 1, 1)``: row ``o`` of the
        ``(out, in·kh·kw)`` update is the kernel matrix's rows ``o·kh … o·kh+kh−1`` side by side, so it factors
        exactly as ``up.view(out, kh·r) @ blockdiag(down, …, down)`` at ``R = kh·r``; when ``out`` or ``in·kh·kw`` is
        smaller, the identity on that side is exact at that rank instead.
        """
        with torch.no_grad():
            down, up = self._factors(adapter_name)
            scale = self.scaling[adapter_name]
            if self.is_conv2d:
                return self._conv_lora_factors(adapter_name, down[0], up[0], scale)
            return down.reshape(-1, self.cols).clone(), self._full_up(up, adapter_name) * scale

    def _conv_lora_factors(self, adapter_name: str, down, up, scale):
        out_ch, in_ch, kh, kw = self.get_base_layer().weight.shape
        r, patch = down.shape[0], in_ch * kh * kw
        rank = min(kh * r, out_ch, patch)
        if rank == kh * r:
            lora_B = (up.reshape(out_ch, kh * r) * scale)[:, :, None, None]
            lora_A = torch.block_diag(*[down] * kh).view(kh * r, in_ch, kh, kw)
        elif rank == out_ch:
            lora_B = torch.eye(out_ch, dtype=down.dtype, device=down.device)[:, :, None, None]
            lora_A = self.get_delta_weight(adapter_name)
        else:  # lora_A extracts every patch unchanged (an identity kernel), lora_B applies the update to it
            lora_A = torch.eye(patch, dtype=down.dtype, device=down.device).view(patch, in_ch, kh, kw)
            lora_B = self.get_delta_weight(adapter_name).reshape(out_ch, patch)[:, :, None, None]
        return lora_A.contiguous(), lora_B.contiguous()

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None and not torch.compiler.is_compiling():  # (refused under compile: see the tuner)
            adapter_names = _ADAPTER_NAMES.get()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter_name in self.active_adapters:
            if adapter_name in self.scaling:
                result = self._add_delta(result, x, adapter_name)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Sample ``i`` of the batch uses adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        # peft's LoRA wording (LoraLayer._check_forward_args), which callers and peft's tests match on.
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        names = [name for name in dict.fromkeys(adapter_names) if name in self.scaling]
        result = self.base_layer(x, *args, **kwargs)
        if not names:
            return result
        result = result.clone()  # the base layer may hand out a tensor it keeps (bitsandbytes), or a view
        if self.is_conv2d:  # kernels differ per sample: one convolution per adapter
            for adapter_name in names:
                rows = [i for i, name in enumerate(adapter_names) if name == adapter_name]
                result[rows] = self._add_delta(result[rows], x[rows], adapter_name)
            return result
        for group in self._grouped_factors(names):
            samples, delta = grouped_delta(self._cast_input_dtype(x, group.mids.dtype), adapter_names, group, self.rows)
            if samples is None:
                result += delta.to(result.dtype)
            else:
                result.index_add_(0, samples, delta.to(result.dtype))
        return result

    def _grouped_factors(self, names: list[str]) -> list[FactorGroup]:
        """The factors of the adapters ``names`` stacked for one batched product per group of adapters with equal
        shapes (usually one group); kept for the next call while the adapters' tensors are unchanged (every
        decoding step of ``generate`` uses the same adapters)."""
        cache = self._factor_cache
        reuse = cache is not None and cache.usable()
        if reuse:
            key = tuple((name, self._factor_tokens[name], self._factor_stamp(name), self.scaling[name]) for name in names)
            reuse = all(stamp is not None for _, _, stamp, _ in key)
        plan = self._batch_plan
        if reuse and plan is not None and plan[0] == key:
            return plan[1]
        groups = self._stack_factors(names)
        # the plan pins the stamped storages as the factor cache does (see _factor_pins)
        self._batch_plan = (key, groups, [self._factor_pins(name) for name in names]) if reuse else None
        return groups

    def _stack_factors(self, names: list[str]) -> list[FactorGroup]:
        """Default grouping: adapters whose factors have equal shapes and output slices; the update of sample ``i``
        is ``x_i downs[g]ᵀ ups[g]ᵀ`` with the adapter's scale folded into ``ups``."""
        groups: dict[tuple, list] = {}
        for name, (down, up) in zip(names, self._current_factors(names)):
            groups.setdefault((tuple(down.shape), tuple(up.shape), self.output_slices[name]), []).append((name, down, up))
        stacked = []
        for members in groups.values():
            downs = torch.stack([down.reshape(-1, self.cols) for _, down, _ in members])
            ups = torch.stack([self._full_up(up, name) * self.scaling[name] for name, _, up in members])
            stacked.append(FactorGroup(tuple(name for name, _, _ in members), None, downs, ups, None))
        return stacked

    def __repr__(self) -> str:
        return f"{self.method_name}." + super().__repr__()


def adapted_layers(model: nn.Module, adapter_name: str) -> list[LowRankLayer]:
    """The NOLA/NoRA layers of ``model`` that hold the adapter ``adapter_name``, in module order."""
    return [m for m in model.modules() if isinstance(m, LowRankLayer) and adapter_name in m.scaling]
