"""The mechanism NOLA and NoRA share: a frozen base layer plus, per adapter, ``scale * up @ down`` updates.

A method subclasses :class:`LowRankLayer` and only says how its factors are built and which tensors train, through
four hooks: :meth:`LowRankLayer._init_adapter_containers` (the per-adapter containers),
:meth:`LowRankLayer._create_adapter` (an adapter's tensors), :meth:`LowRankLayer._factors` (its factors) and
:meth:`LowRankLayer._scale_and_dropout`; it subclasses :class:`LowRankTuner` and only says which layer class to build
(``prefix``, ``tuner_layer_cls``, ``method_name``). Everything else lives here once: wrapping ``nn.Linear``, GPT-2's ``Conv1D``,
``nn.Conv2d`` and bitsandbytes 8-bit/4-bit layers; adapting chosen slices of a fused output (the q and v thirds of
GPT-2's ``c_attn``); merge/unmerge; mixed-adapter batches; dtype handling.

Shapes. Every supported layer is viewed as a weight matrix ``W`` of shape ``(rows, cols)`` acting as ``y = W x``:
``(out_features, in_features)`` for linear layers (GPT-2's ``Conv1D`` stores the transpose, which merging accounts
for) and ``(out_channels * kh, in_channels / groups * kw)`` for ``Conv2d``, whose kernel is the reshaped matrix
(near-square, as in the LoRA and NOLA papers' convolution adapters). An output split into ``splits`` equal blocks
can be adapted on a subset ``adapt`` of them; each adapted block ``s`` has its own factors
``down[s]: (r, cols)`` and ``up[s]: (rows / splits, r)`` and its update is ``scale * up[s] @ down[s]``.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._peft_compat import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    _ExcludedModule,
    _filter_state_dict_by_key_prefixes,
    _get_in_out_features,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
    peft_call_locals,
    refuse_pickled_save,
    resolve_quantization_backend,
)
from ..basis import layout_fingerprint
from ..checks import (
    FLOAT_DTYPES,
    AdapterFileError,
    CheckedAdapter,
    check_adapter_dir,
    check_declared_tensors,
    check_loaded_tensors,
    check_regex,
    field_fingerprints,
    file_checksum,
    tensors_checksum,
)
from ..model_card import write_model_card

#: ``output_slices`` for GPT-2's fused ``c_attn``: adapt the query and value thirds (the papers' "QV" rows).
GPT2_QV_SLICES = {"c_attn": {"splits": 3, "adapt": [0, 2]}}

SUPPORTED_LAYERS = "torch.nn.Linear, transformers Conv1D, torch.nn.Conv2d, bitsandbytes Linear8bitLt / Linear4bit"


#: Default byte budget of a model's inference factor cache (:class:`FactorCache`); ``$PEFT_NOLA_FACTOR_CACHE_BYTES``
#: overrides it, :func:`set_factor_cache_budget` changes it on a model.
DEFAULT_FACTOR_CACHE_BYTES = 256 * 2**20
FACTOR_CACHE_ENV = "PEFT_NOLA_FACTOR_CACHE_BYTES"

# Every adapter created on a layer gets a fresh number: cache entries are keyed by it, so an adapter deleted and
# loaded again under the same name (possibly into recycled memory) never meets the old adapter's factors.
_adapter_tokens = itertools.count()


def _budget_from_env() -> int:
    value = os.environ.get(FACTOR_CACHE_ENV)
    if not value:
        return DEFAULT_FACTOR_CACHE_BYTES
    try:
        budget = int(float(value))
    except ValueError:
        raise ValueError(f"{FACTOR_CACHE_ENV} must be a number of bytes (0 turns the cache off), not {value!r}") from None
    if budget < 0:
        raise ValueError(f"{FACTOR_CACHE_ENV} must be >= 0 (0 turns the cache off), not {value!r}")
    return budget


class FactorCache:
    """The factors of a model's adapters kept between forward passes that need no gradient (inference).

    Building factors is the costly part of an unmerged NOLA forward (a product with the basis), and NoRA's
    ``(A B - C₀) Vᵀ`` is one too; in inference they depend only on the adapter's tensors, so each is built once and
    reused until one of those tensors changes. An entry records, per tensor it was built from, the tensor's in-place
    version counter (bumped by optimizer steps, ``copy_``, ``load_state_dict``, quantization), its storage address
    and dtype (changed by ``.to()`` and ``.data =``): any difference and the factors are built again, with
    the same computation and so the same bits. Writes through ``tensor.data`` bypass the version counter and are not
    seen; modify adapters through the parameters themselves. Creating or deleting an adapter and ``train()`` drop
    entries outright.

    Bounded: least recently used adapters are evicted first, whole (all their layers), once the factors held exceed
    ``budget`` bytes (:data:`DEFAULT_FACTOR_CACHE_BYTES`, ``$PEFT_NOLA_FACTOR_CACHE_BYTES``, or
    :func:`set_factor_cache_budget`; 0 turns caching off). An adapter's factors cost what LoRA's A and B of the same
    rank cost.
    """

    def __init__(self, budget: Optional[int] = None):
        self.budget = _budget_from_env() if budget is None else budget
        self.entries: OrderedDict[str, dict[int, tuple]] = OrderedDict()  # adapter -> {token: (stamp, factors)}
        self.sizes: dict[str, int] = {}
        self.nbytes = 0

    def usable(self) -> bool:
        """Whether factors may come from the cache now: no gradient wanted and not being traced by torch.compile
        (compiled graphs build factors inside the graph; the bookkeeping here is Python)."""
        return self.budget > 0 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def lookup(self, token: int, adapter_name: str, stamp: tuple) -> Optional[tuple]:
        entry = self.entries.get(adapter_name)
        item = entry.get(token) if entry is not None else None
        if item is None or item[0] != stamp:
            return None
        self.entries.move_to_end(adapter_name)
        return item[1]

    def store(self, token: int, adapter_name: str, stamp: tuple, factors: tuple) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in factors)
        if nbytes > self.budget:
            return
        self.discard(token, adapter_name)
        self.entries.setdefault(adapter_name, {})[token] = (stamp, factors)
        self.entries.move_to_end(adapter_name)
        self.sizes[adapter_name] = self.sizes.get(adapter_name, 0) + nbytes
        self.nbytes += nbytes
        self.evict()

    def evict(self) -> None:
        """Drop least recently used adapters, whole, until the factors held fit the budget."""
        while self.nbytes > self.budget and self.entries:
            self.drop(next(iter(self.entries)))

    def discard(self, token: int, adapter_name: str) -> None:
        """Forget one layer's factors of ``adapter_name``."""
        entry = self.entries.get(adapter_name)
        if entry is None or token not in entry:
            return
        nbytes = sum(t.numel() * t.element_size() for t in entry.pop(token)[1])
        self.sizes[adapter_name] -= nbytes
        self.nbytes -= nbytes
        if not entry:
            self.drop(adapter_name)

    def drop(self, adapter_name: str) -> None:
        """Forget every layer's factors of ``adapter_name``."""
        self.entries.pop(adapter_name, None)
        self.nbytes -= self.sizes.pop(adapter_name, 0)

    def clear(self) -> None:
        self.entries.clear()
        self.sizes.clear()
        self.nbytes = 0


def set_factor_cache_budget(model: nn.Module, budget_bytes: int) -> None:
    """Set the byte budget of the inference factor cache of every NOLA/NoRA tuner in ``model`` (a ``PeftModel`` or a
    model with injected adapters); 0 turns caching off. Entries beyond the new budget are evicted at once."""
    require_int("budget_bytes", budget_bytes, 0)
    found = False
    for module in model.modules():
        if isinstance(module, LowRankTuner):
            found = True
            module.factor_cache.budget = budget_bytes
            module.factor_cache.evict()
    if not found:
        raise ValueError("set_factor_cache_budget: the model has no NOLA or NoRA adapters")


def require_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` naming the config field unless ``value`` is an integer >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def require_probability(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def require_finite(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the config field unless ``value`` is a finite number (a NaN or infinite scale would
    turn every adapted layer's output into NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _names(value: Any, item_type: type = str) -> bool:
    """None, one ``item_type``, or a list/set of them (how peft's configs name modules and layers)."""
    items = value if isinstance(value, (list, set, tuple)) else [value]
    return value is None or all(isinstance(item, item_type) and not isinstance(item, bool) for item in items)


# Shared fields whose values must have these types (checked on creation and on load, before anything is adapted).
_FIELD_TYPES = {
    "target_modules": (_names, "a module name, a regex, or a list of names"),
    "exclude_modules": (_names, "a module name, a regex, or a list of names"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, (list, set, tuple)) and _names(v)), "a list of names"),
    "layers_to_transform": (lambda v: _names(v, int), "a layer index or a list of indices"),
    "layers_pattern": (_names, "a name or a list of names"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    "layout_fingerprint": (lambda v: v is None or isinstance(v, str), "a string"),
    "weights_checksum": (lambda v: v is None or isinstance(v, str), "a string"),
    "config_fingerprint": (
        lambda v: v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
        "a mapping of field names to strings",
    ),
    "task_type": (lambda v: v is None or isinstance(v, str), "a task type name or null"),
}

# peft interpolates layers_pattern into its own regex: a plain name keeps that regex linear.
_LAYERS_PATTERN = r"[A-Za-z0-9_.]+"


@dataclass
class LowRankConfig(PeftConfig):
    """Fields every low-rank method here shares; see :class:`peft_nola.NolaConfig` for their meaning."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (or dotted suffixes) of the modules to adapt, a regex matched against the full name, or "
            "'all-linear'. For example ['q_proj', 'v_proj'] or ['c_attn']. Default: peft's LoRA defaults per model type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    output_slices: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Adapt only some equal blocks of a fused output, each with its own adapter, e.g. "
            "{'c_attn': {'splits': 3, 'adapt': [0, 2]}} for the query and value parts of GPT-2's c_attn (the "
            "papers' 'QV' rows). Keys are module names or dotted suffixes."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True if the adapted layers store their weight as (fan_in, fan_out), like GPT-2's Conv1D. Each "
            "layer's own layout is detected and used; a mismatch only warns."
        },
    )
    bias: str = field(
        default="none", metadata={"help": "Which biases train: 'none', 'all', or '<method>_only' (adapted layers)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapted ones that are fully trained and saved (e.g. a new head)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapted model starts equal to the base model. False: a random non-zero update "
            "(for tests)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (see layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the ModuleList holding the layers, e.g. 'layers' or 'h' (with layers_to_transform)."},
    )
    layout_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "Set on creation: hash of the adapted layers' names, shapes and slices."}
    )
    weights_checksum: Optional[str] = field(
        default=None,
        metadata={"help": "Set on save: hash of every tensor of the adapter file as written and of the pinned fields; "
                  "checked on load."},
    )
    config_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Set on save: a short hash per pinned field (those that determine what the adapter "
                  "computes); a field edited after training is an error naming it."},
    )

    #: Fields that determine what a trained adapter computes and that a user does not change after training: covered
    #: by ``config_fingerprint`` and ``weights_checksum``. The scale (``nola_alpha``/``nora_alpha``) and the dropout
    #: are left out on purpose: a scale is the knob users turn to weaken or strengthen a trained adapter (as with
    #: LoRA's alpha), dropout acts only in training. Methods add their own (see :meth:`pinned_fields`).
    PINNED_FIELDS: ClassVar[tuple[str, ...]] = (
        "peft_type", "task_type", "target_modules", "exclude_modules", "output_slices", "modules_to_save",
        "layers_to_transform", "layers_pattern", "bias",
    )

    def __post_init__(self):
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # peft's matcher ignores layers_to_transform for a regex (peft >= 0.22 refuses it too): one rule for every
            # peft release.
            raise ValueError(
                f"layers_to_transform cannot be used when target_modules is a string (a regex or 'all-linear'), got "
                f"target_modules={self.target_modules!r}: give target_modules as a list of names such as "
                f"['q_proj', 'v_proj'], or write the layer numbers into the regex."
            )
        super().__post_init__()
        for name, (valid, expected) in _FIELD_TYPES.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        validate_output_slices(self.output_slices)
        allowed_bias = ("none", "all", f"{PeftType(self.peft_type).value.lower()}_only")
        if self.bias not in allowed_bias:
            raise ValueError(f"bias must be one of {allowed_bias}, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set but layers_to_transform is not: set both or neither")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                check_regex(name, getattr(self, name))
        patterns = self.layers_pattern if isinstance(self.layers_pattern, (list, tuple, set)) else [self.layers_pattern]
        for pattern in patterns:
            if pattern is not None and not re.fullmatch(_LAYERS_PATTERN, pattern):
                raise ValueError(f"layers_pattern must be a module name such as 'layers' or 'h' (letters, digits, "
                                 f"'_', '.'), got {pattern!r}")

    def pinned_fields(self) -> dict:
        """``{field: value}`` of :attr:`PINNED_FIELDS` in a canonical JSON form (sets as sorted lists)."""

        def canonical(value):
            if isinstance(value, (set, frozenset, list, tuple)):
                items = [canonical(v) for v in value]
                return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
            if isinstance(value, dict):
                return {str(k): canonical(v) for k, v in value.items()}
            return value.value if isinstance(value, PeftType) else value

        pinned = {name: canonical(getattr(self, name)) for name in self.PINNED_FIELDS}
        for name in ("target_modules", "modules_to_save"):
            # Sets of names to peft (PeftModelForSequenceClassification appends its heads to modules_to_save again
            # on every load).
            if isinstance(pinned[name], list):
                pinned[name] = sorted(set(pinned[name]))
        return pinned

    def prefix_for_checksum(self) -> str:
        """The method's tensor prefix (``"nola_"``), which the first checksum version covered."""
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        return PEFT_TYPE_TO_PREFIX_MAPPING[self.peft_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        # Called by PeftModel.from_pretrained and load_adapter (new name) before a model is touched: every file of
        # the adapter is checked here, and the config returned is the one built from the bytes checked (peft's own
        # from_pretrained would read the file a second time). The model-dependent checks follow in inject_adapter,
        # still before the first module is replaced.
        path = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not path.exists() and not path.is_symlink():  # a Hub id: peft downloads it (checked in the load hook)
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        _, class_kwargs, _ = cls._split_kwargs(kwargs)
        checked = check_adapter_dir(path, cls, class_kwargs=class_kwargs)
        config = checked.config
        config._checked = checked
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        # PeftModel.save_pretrained writes the weights, then this config: record the checksum of the file just
        # written (every tensor in it), if it is the one this save produced.
        pending = self.__dict__.pop("_pending_own_digest", None)
        if pending is not None:
            self.weights_checksum = file_checksum(Path(save_directory) / "adapter_model.safetensors", self, pending)
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory, self)  # after the weights and config it describes

    @classmethod
    def check_kwargs(cls, **kwargs):
        # peft drops unknown keys with a warning (forward compatibility); a key this version does not know could
        # change what the adapter computes, so here it is an error.
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"adapter_config.json has keys {cls.__name__} does not know: {unknown}. The adapter was saved by "
                f"another peft-nola version, or the file was edited; remove the keys or use that version."
            )
        return super().check_kwargs(**kwargs)


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
        if not hasattr(self, "_factor_tokens"):
            self._factor_tokens: dict[str, int] = {}
            self._batch_plan = None  # the stacked factors of the last mixed batch (see _grouped_factors)
        self._forget_factors(adapter_name)
        self._factor_tokens[adapter_name] = next(_adapter_tokens)
        self.output_slices[adapter_name] = (splits, adapt)
        self.scaling[adapter_name] = scale
        self.adapter_dropout[adapter_name] = dropout
        self._create_adapter(adapter_name, config, (self.rows // splits, self.cols), **kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

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

    def _factor_stamp(self, adapter_name: str) -> tuple:
        # A move to another device or dtype gives the tensor new storage (another address; t.device is slow to read).
        return tuple((t._version, t.data_ptr(), t.dtype) for t in self._factor_inputs(adapter_name))

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
            factors = cache.lookup(self._factor_tokens[name], name, stamp)
            if factors is None:
                missing.append((name, stamp))
            else:
                found[name] = factors
        if missing:
            for (name, stamp), factors in zip(missing, self._build_factors([name for name, _ in missing])):
                cache.store(self._factor_tokens[name], name, stamp, factors)
                found[name] = factors
        return [found[name] for name in adapter_names]

    def _forget_factors(self, adapter_name: str) -> None:
        if self._factor_cache is not None and adapter_name in self._factor_tokens:
            self._factor_cache.discard(self._factor_tokens[adapter_name], adapter_name)
        self._batch_plan = None

    def train(self, mode: bool = True):
        if mode:
            for adapter_name in list(getattr(self, "_factor_tokens", ())):
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

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
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
            samples, delta = self._grouped_delta(x, adapter_names, group)
            if samples is None:
                result += delta.to(result.dtype)
            else:
                result.index_add_(0, samples, delta.to(result.dtype))
        return result

    def _grouped_factors(self, names: list[str]) -> list["_FactorGroup"]:
        """The factors of the adapters ``names`` stacked for one batched product per group of adapters with equal
        shapes (usually one group); kept for the next call while the adapters' tensors are unchanged (every
        decoding step of ``generate`` uses the same adapters)."""
        cache = self._factor_cache
        reuse = cache is not None and cache.usable()
        if reuse:
            key = tuple((name, self._factor_tokens[name], self._factor_stamp(name), self.scaling[name]) for name in names)
            if self._batch_plan is not None and self._batch_plan[0] == key:
                return self._batch_plan[1]
        groups = self._stack_factors(names)
        self._batch_plan = (key, groups) if reuse else None
        return groups

    def _stack_factors(self, names: list[str]) -> list["_FactorGroup"]:
        """Default grouping: adapters whose factors have equal shapes and output slices; the update of sample ``i``
        is ``x_i downs[g]ᵀ ups[g]ᵀ`` with the adapter's scale folded into ``ups``."""
        groups: dict[tuple, list] = {}
        for name, (down, up) in zip(names, self._current_factors(names)):
            groups.setdefault((tuple(down.shape), tuple(up.shape), self.output_slices[name]), []).append((name, down, up))
        stacked = []
        for members in groups.values():
            downs = torch.stack([down.reshape(-1, self.cols) for _, down, _ in members])
            ups = torch.stack([self._full_up(up, name) * self.scaling[name] for name, _, up in members])
            stacked.append(_FactorGroup(tuple(name for name, _, _ in members), None, downs, ups, None))
        return stacked

    def _grouped_delta(self, x: torch.Tensor, adapter_names: list[str], group: "_FactorGroup"):
        """``(samples, delta)``: the update of every sample of the batch that uses an adapter of ``group``
        (``samples`` None: all of them, in order), by batched products over the samples gathered per adapter, as
        Punica's SGMV/BGMV kernels do: the samples of one adapter form a segment, and equal-length segments (padded
        where that adds little) go through one ``bmm`` against the stacked factors without copying them per sample;
        otherwise each sample's factors are gathered (BGMV)."""
        layout = _sample_layout(tuple(adapter_names), group.names, x.device)
        h = self._cast_input_dtype(x, group.mids.dtype)
        h = h.reshape(h.shape[0], -1, self.cols)  # (batch, tokens, cols)
        if layout.samples is not None:
            h = h.index_select(0, layout.samples)
        if group.pre is not None:
            h = h @ group.pre.T  # shared by every adapter of the group: one product for the batch
        tokens, width = h.shape[1], h.shape[2]
        if layout.slots is None:
            if layout.gather is not None:
                if layout.padded:
                    h = torch.cat([h, h.new_zeros(1, tokens, width)])
                h = h.index_select(0, layout.gather)
            h = h.reshape(len(group.names), -1, width)
            mids, ups = group.mids, group.ups
        else:
            mids = group.mids.index_select(0, layout.slots)
            ups = group.ups.index_select(0, layout.slots) if group.ups is not None else None
        h = torch.bmm(h, mids.mT)
        if ups is not None:
            h = torch.bmm(h, ups.mT)
        h = h.reshape(-1, tokens, h.shape[-1])
        if layout.back is not None:
            h = h.index_select(0, layout.back)
        if group.post is not None:
            h = h @ group.post.T
        return layout.samples, h.reshape(h.shape[0], *x.shape[1:-1], self.rows)

    def __repr__(self) -> str:
        return f"{self.method_name}." + super().__repr__()


def _dtype_names(dtype: torch.dtype) -> tuple[str, ...]:
    """safetensors dtype names a tensor stored for a parameter of ``dtype`` may have: any float for a float one."""
    from ..checks import _DTYPES

    if dtype.is_floating_point:
        return FLOAT_DTYPES
    return tuple(name for name, value in _DTYPES.items() if value == dtype)


def _load_adapter_source() -> Optional[Path]:
    """The local directory ``PeftModel.load_adapter`` is loading from, if this call runs inside it (else ``None``).
    Without it (another caller) the state-dict checks of the load hook still run."""
    from peft import PeftModel

    caller = peft_call_locals(PeftModel.load_adapter)
    return None if caller is None else _source(caller)


def _source(load_adapter_locals: dict) -> Optional[Path]:
    """The local directory of a ``load_adapter`` call (from its local variables), ``None`` for a Hub id."""
    model_id = load_adapter_locals.get("model_id")
    if model_id is None:
        return None
    subfolder = (load_adapter_locals.get("hf_hub_download_kwargs") or {}).get("subfolder")
    path = Path(model_id) / (subfolder or "")
    return path if os.path.lexists(path) else None


class _AdapterConfigs(dict):
    """A tuner's ``{adapter name: config}``. ``name in configs``, asked by ``PeftModel.load_adapter`` for a name that
    exists, checks the directory being loaded against that adapter (every file, the pinned fields, each declared
    tensor against the model) before peft reads any of it."""

    def __contains__(self, name) -> bool:
        from peft import PeftModel

        present = super().__contains__(name)
        caller = peft_call_locals(PeftModel.load_adapter, depth=0) if present else None  # asked by load_adapter
        if caller is not None:
            source, peft_model = _source(caller), caller.get("self")
            checked = getattr(self[name], "_checked", None)
            # (PeftModel.from_pretrained's own load_adapter call: checked when its config was loaded and on injection)
            if source is not None and peft_model is not None and (checked is None or checked.path != source):
                self[name]._checked = check_adapter_for_model(peft_model, source, name)
        return present


def check_adapter_for_model(peft_model, path: Union[str, os.PathLike], adapter_name: str) -> CheckedAdapter:
    """Check the adapter directory ``path`` for loading into the existing adapter ``adapter_name`` of ``peft_model``
    (a ``PeftModel`` with a NOLA/NoRA adapter of that name), before anything is read into the model.

    Runs :func:`peft_nola.checks.check_adapter_dir` (every file), then requires the file's pinned fields and
    fingerprints to equal the adapter's, and every tensor the file declares to be one a save of this adapter would
    write, with its shape and an allowed dtype. Returns the :class:`~peft_nola.checks.CheckedAdapter`; raises
    :class:`~peft_nola.checks.AdapterFileError` naming the file and the field or tensor. Used by ``load_adapter``
    onto an existing name (Trainer's resume) and meant for anything else that replaces an adapter's weights.
    """
    from peft.utils import get_peft_model_state_dict

    config = peft_model.peft_config[adapter_name]
    path = Path(path)
    checked = type(peft_model.base_model)._check_existing_adapter(config, path)
    # What a save of this adapter would write (file keys), with the in-memory config left as it was.
    saved = {name: getattr(config, name) for name in ("weights_checksum", "config_fingerprint")}
    current = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    for name, value in saved.items():
        setattr(config, name, value)
    config.__dict__.pop("_pending_own_digest", None)
    expected = {key: (tuple(t.shape), _dtype_names(t.dtype)) for key, t in current.items()}
    check_declared_tensors(checked.entries, expected, path / "adapter_model.safetensors")
    return checked


@dataclass(frozen=True)
class _FactorGroup:
    """Stacked factors of adapters sharing shapes: the update of a sample using ``names[g]`` is
    ``((x preᵀ) mids[g]ᵀ ups[g]ᵀ) postᵀ``, where ``pre``/``post`` (shared by the group) and ``ups`` may be None."""

    names: tuple
    pre: Optional[torch.Tensor]
    mids: torch.Tensor
    ups: Optional[torch.Tensor]
    post: Optional[torch.Tensor]


@dataclass(frozen=True)
class _SampleLayout:
    samples: Optional[torch.Tensor]  # batch positions using the group (None: all, in order)
    gather: Optional[torch.Tensor]  # rows of the segment layout (adapter-major) taken from those samples; n = padding
    padded: bool
    back: Optional[torch.Tensor]  # row of each sample in the flattened product's output
    slots: Optional[torch.Tensor]  # per-sample adapter index, when segments are not used


@functools.lru_cache(maxsize=64)
def _sample_layout(adapter_names: tuple, group_names: tuple, device: torch.device) -> _SampleLayout:
    # Computed once per batch composition (every layer and decoding step reuses it); index tensors are made here, not
    # in each layer's forward. None marks an identity, which is skipped.
    index = {name: i for i, name in enumerate(group_names)}
    positions = [i for i, name in enumerate(adapter_names) if name in index]
    n = len(positions)
    per_adapter = [[] for _ in group_names]
    for j, i in enumerate(positions):
        per_adapter[index[adapter_names[i]]].append(j)
    longest = max(len(rows) for rows in per_adapter)
    samples = None if n == len(adapter_names) else torch.tensor(positions, device=device)

    def tensor_unless_identity(values):
        return None if values == list(range(len(values))) else torch.tensor(values, device=device)

    if longest * len(group_names) <= 1.5 * n:
        gather = [j for rows in per_adapter for j in rows + [n] * (longest - len(rows))]
        back = [0] * n
        for row, j in enumerate(gather):
            if j < n:
                back[j] = row
        return _SampleLayout(samples, tensor_unless_identity(gather), longest * len(group_names) > n,
                             tensor_unless_identity(back), None)
    slots = torch.tensor([index[adapter_names[i]] for i in positions], device=device)
    return _SampleLayout(samples, None, False, None, slots)


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class LowRankTuner(BaseTuner):
    """The model-level half of the shared mechanism: which modules get which wrapper, and mixed-batch hooks.

    Subclasses set ``prefix``, ``tuner_layer_cls`` and ``method_name``.
    """

    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    method_name = "low-rank"

    # peft's load_adapter onto an existing adapter name (Trainer's resume) reads the weights file before any hook of
    # ours runs; its first step that reaches this tuner is "adapter_name not in self.peft_config". The configs are
    # therefore held in a dict that, asked that by load_adapter itself, checks the directory first (see
    # _AdapterConfigs), so that a FIFO, a truncated file, a pickle or a junk tensor is refused before peft opens it.
    @property
    def peft_config(self) -> dict:
        try:
            return self.__dict__["_adapter_configs"]
        except KeyError:
            raise AttributeError("peft_config") from None

    @peft_config.setter
    def peft_config(self, value: dict) -> None:
        self.__dict__["_adapter_configs"] = _AdapterConfigs(value)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # Everything that can be checked is checked before the first module is replaced, so that a bad config or
        # an adapter made for another model leaves the user's model untouched.
        peft_config = self.peft_config[adapter_name]
        if kwargs.get("state_dict") is None:
            targets = self._targeted_modules(model, peft_config)
            self._check_targets(peft_config, targets)
            checked = getattr(peft_config, "_checked", None)
            if checked is not None:  # loading: the file's tensors against this model, before it is changed
                expected = self._expected_file_tensors(model, peft_config, targets)
                check_declared_tensors(checked.entries, expected, checked.path / "adapter_model.safetensors")
        super().inject_adapter(model, adapter_name, **kwargs)

    # ----------------------------------------------------------------------------------- what a file may hold
    @classmethod
    def _file_tensor_specs(cls, config: PeftConfig, num_blocks: int, block_rows, cols) -> dict[str, tuple]:
        """``{parameter name: (shape, allowed safetensors dtypes)}`` that the adapter file holds for one adapted module
        with ``num_blocks`` adapted blocks of shape ``(block_rows, cols)``; ``None`` for a size not known without the
        model (``block_rows``/``cols`` are ``None`` then)."""
        raise NotImplementedError

    @classmethod
    def check_file_entries(cls, config: PeftConfig, entries: dict, weights_path: Path) -> None:
        """Refuse, from the header alone, any tensor that is neither one of this adapter's own (with the shape and
        dtype the config implies, as far as known without the model) nor a parameter of a ``modules_to_save`` module
        (or a bias, when ``bias`` says biases train); run by :func:`peft_nola.checks.check_adapter_dir`."""
        root = "base_model.model."
        names = list(config.modules_to_save or [])
        for key, entry in entries.items():
            module_key, _, param = key.removeprefix(root).rpartition(".")
            if key.startswith(root) and param.startswith(cls.prefix) and module_key:
                splits, adapt = resolve_slices(config.output_slices, module_key)
                specs = cls._file_tensor_specs(config, len(adapt), None, None)
                if param not in specs:
                    raise AdapterFileError(f"'{key}' in {weights_path} is not a tensor {cls.method_name} adapters have "
                                           f"(they have {sorted(specs)}); the file was edited or is not this adapter's")
                shape, dtypes = specs[param]
                if len(entry.shape) != len(shape) or any(
                    want is not None and got != want for got, want in zip(entry.shape, shape)
                ):
                    raise AdapterFileError(
                        f"'{key}' in {weights_path} has shape {entry.shape}, but its adapter_config.json implies "
                        f"{tuple('?' if d is None else d for d in shape)}: the file does not belong to its config."
                    )
                if entry.dtype not in dtypes:
                    raise AdapterFileError(
                        f"'{key}' in {weights_path} is stored as {entry.dtype}; {cls.method_name} stores it as one of "
                        f"{list(dtypes)}. Save the adapter again with peft-nola."
                    )
                continue
            if key.startswith(root) and any(module_key.endswith(name) for name in names):
                continue
            if key.startswith(root) and config.bias != "none" and param == "bias":
                continue
            raise AdapterFileError(
                f"{weights_path} holds the tensor '{key}', which is neither one of this adapter's own tensors nor a "
                f"parameter of a module in modules_to_save ({names}): loading it would overwrite the base model. "
                f"Refusing to load; the file was edited or does not belong to its adapter_config.json."
            )

    @classmethod
    def check_file_values(cls, config: PeftConfig, entries: dict, read, weights_path: Path) -> None:
        """Method-specific checks of the values of small tensors (``read(key)`` returns one), run by
        :func:`~peft_nola.checks.check_adapter_dir` after the header and checksum checks; nothing by default."""

    def _expected_file_tensors(self, model: nn.Module, config: PeftConfig, targets) -> dict[str, tuple]:
        """``{file key: (shape, allowed dtypes)}`` of everything the adapter file must hold for ``model``."""
        root = "base_model.model."
        expected = {}
        for key, base_layer in targets:
            rows, cols = matrix_shape(base_layer)
            splits, adapt = resolve_slices(config.output_slices, key)
            for param, spec in self._file_tensor_specs(config, len(adapt), rows // splits, cols).items():
                expected[f"{root}{key}.{param}"] = spec
        names = list(config.modules_to_save or [])
        target_keys = {key for key, _ in targets}
        for name, module in model.named_modules():
            if names and any(name.endswith(n) for n in names) and not isinstance(module, BaseTunerLayer):
                # Already wrapped by another adapter's modules_to_save: the file holds the original module's keys.
                module = getattr(module, "original_module", module) if isinstance(
                    module, AuxiliaryTrainingWrapper) else module
                for param, tensor in module.state_dict().items():
                    expected[f"{root}{name}.{param}"] = (tuple(tensor.shape), _dtype_names(tensor.dtype))
            if config.bias == "all" or (config.bias != "none" and name in target_keys):
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor) and not isinstance(module, BaseTunerLayer):
                    expected[f"{root}{name}.bias"] = (tuple(bias.shape), _dtype_names(bias.dtype))
        return expected

    def _check_targets(self, peft_config: PeftConfig, targets: list[tuple[str, nn.Module]]) -> None:
        """Validate the matched ``(key, base layer)`` pairs before injection, and fill in or verify the layout
        fingerprint, so that an adapter loaded onto a model with other layers is an error naming one of them."""
        for key, base_layer in targets:
            if not is_supported(base_layer):
                raise TypeError(
                    f"{self.method_name} cannot adapt module '{key}' of type {type(base_layer).__name__}. "
                    f"Supported layer types: {SUPPORTED_LAYERS}. Remove it from target_modules."
                )
        if not targets:
            return  # peft raises its own "target modules not found" error
        entries = []
        for key, base_layer in targets:
            rows, cols = matrix_shape(base_layer)
            splits, adapt = resolve_slices(peft_config.output_slices, key)
            self._check_layer(peft_config, key, rows // splits, cols)
            entries.append([key, rows, cols, splits, list(adapt), *self._layout_fields(peft_config)])
        layout = layout_fingerprint(entries)
        if peft_config.layout_fingerprint is not None and peft_config.layout_fingerprint != layout:
            key, rows, cols = entries[0][:3]
            raise ValueError(
                f"This {self.method_name} adapter was made for a different model: its layout_fingerprint is "
                f"{peft_config.layout_fingerprint!r}, but the {len(entries)} layers it targets here (e.g. '{key}' with "
                f"a {rows}x{cols} weight) give {layout!r}. Load it onto the base model it was trained on "
                f"(base_model_name_or_path={peft_config.base_model_name_or_path!r}); to start a new adapter from this "
                f"config, set its fingerprints to None."
            )
        peft_config.layout_fingerprint = layout

    def _check_layer(self, peft_config: PeftConfig, key: str, block_rows: int, cols: int) -> None:
        """Method-specific checks of one targeted weight block of shape ``(block_rows, cols)``."""

    def _hotswap_signature(self, peft_config: PeftConfig) -> dict:
        """What must be equal for one adapter's values to replace another's in place (``peft_nola.hotswap_adapter``);
        fingerprints are those ``_check_targets`` filled in for this model."""
        return {"peft_type": peft_config.peft_type, "layout_fingerprint": peft_config.layout_fingerprint,
                "r": peft_config.r}

    def _layout_fields(self, peft_config: PeftConfig) -> list:
        """Config values that change the adapter's tensor shapes, recorded in the layout fingerprint."""
        return [peft_config.r]

    def _targeted_modules(self, model: nn.Module, peft_config: PeftConfig) -> list[tuple[str, nn.Module]]:
        """The ``(key, base layer)`` pairs ``peft_config`` will adapt, found with peft's own matcher."""
        peft_config = self._prepare_adapter_config(peft_config, self.get_model_config(model))
        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        targets = []
        wrapper_prefixes = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in wrapper_prefixes):
                continue
            if isinstance(module, BaseTunerLayer):
                wrapper_prefixes.append(key + ".")
            match = self._check_target_module_exists(peft_config, key)
            if match and not isinstance(match, _ExcludedModule):
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                targets.append((key, base))
        return targets

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **self._layer_kwargs(adapter_name, current_key))
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base_layer, Conv1D) != bool(peft_config.fan_in_fan_out):
            # Each layer knows its own weight layout; the config flag only documents it, as in peft's LoRA.
            warnings.warn(
                f"fan_in_fan_out={peft_config.fan_in_fan_out} does not match '{current_key}' "
                f"({type(base_layer).__name__}); using the layer's own weight layout."
            )
        new_module = self.tuner_layer_cls(
            target, adapter_name, peft_config, module_key=current_key, **self._layer_kwargs(adapter_name, current_key)
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # peft's save/load hooks (see BaseTuner._get_adapter_state_dict). Methods change how their tensors are stored with
    # _encode_for_file/_decode_from_file; the checksum covers exactly what the file holds.

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        refuse_pickled_save(cls.method_name)
        tensors = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tensors = cls._encode_for_file(config, adapter_name, tensors)
        as_written = {cls._remove_adapter_name_from_key(key, adapter_name): value for key, value in tensors.items()}
        # peft adds the modules_to_save tensors (and may add others) after this hook, so the checksum of every tensor
        # is taken from the file itself when the config is written next to it (LowRankConfig.save_pretrained); what
        # this hook saw identifies that file as this save's.
        config.config_fingerprint = field_fingerprints(config.pinned_fields())
        config.weights_checksum = None
        config._pending_own_digest = tensors_checksum(as_written, cls.prefix)
        return tensors

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Runs inside peft's set_peft_model_state_dict before any weight is written. A new adapter's files were
        # checked when its config was loaded; load_adapter onto an existing name (Trainer's resume) reads no config,
        # so its directory is checked here, against the adapter already in the model.
        checked = getattr(config, "_checked", None)
        source = _load_adapter_source()
        if source is not None and (checked is None or checked.path != source):
            checked = cls._check_existing_adapter(config, source)
        own = {key: value for key, value in state_dict.items() if f".{cls.prefix}" in key}
        if checked is not None:
            # peft read the file again after the check: it must have read the bytes that were checked.
            if tensors_checksum(own, cls.prefix) != checked.own_digest:
                raise ValueError(f"{checked.path} changed while it was being loaded; load it again")
        elif config.weights_checksum is not None and not config.weights_checksum.startswith("v2-"):
            if tensors_checksum(own, cls.prefix) != config.weights_checksum:
                raise ValueError(
                    f"The adapter file's {cls.method_name} tensors do not match the weights_checksum recorded in its "
                    f"adapter_config.json ({config.weights_checksum!r}): the file was altered or corrupted, or "
                    f"belongs to another adapter. Save the adapter again."
                )
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, cls._decode_from_file(config, state_dict)
        )
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        check_loaded_tensors(expected, remapped, cls.prefix)
        config.__dict__.pop("_checked", None)  # a later load_adapter onto this name checks its own directory
        return remapped

    @classmethod
    def _check_existing_adapter(cls, config: PeftConfig, source: Path) -> CheckedAdapter:
        """Check the directory ``load_adapter`` reads into the existing adapter whose config is ``config``: all of
        :func:`~peft_nola.checks.check_adapter_dir`, and the file's pinned fields and fingerprints equal the adapter's
        (a checkpoint of another configuration would load into this one's layers as a different model)."""
        checked = check_adapter_dir(source, type(config))
        saved, ours = checked.config.pinned_fields(), config.pinned_fields()
        for name in ("layout_fingerprint", "basis_fingerprint"):
            if getattr(config, name, None) is not None and getattr(checked.config, name, None) is not None:
                saved[name], ours[name] = getattr(checked.config, name), getattr(config, name)
        for name in saved:
            if saved[name] != ours[name]:
                raise AdapterFileError(
                    f"{source / 'adapter_config.json'} has {name}={saved[name]!r}, but the adapter it is being loaded "
                    f"into has {name}={ours[name]!r}: the checkpoint belongs to another adapter configuration. Resume "
                    f"with the configuration it was saved with, or load it as a new adapter "
                    f"(PeftModel.from_pretrained)."
                )
        return checked

    @classmethod
    def _encode_for_file(cls, config: PeftConfig, adapter_name: str, tensors: dict) -> dict:
        """How the method's tensors are written (keys still carry the adapter name); identity by default."""
        return tensors

    @classmethod
    def _decode_from_file(cls, config: PeftConfig, tensors: dict) -> dict:
        """The inverse of :meth:`_encode_for_file`, on the file's keys."""
        return tensors

    def _layer_kwargs(self, adapter_name: str, module_key: str) -> dict:
        """Keyword arguments for the method's layer: the model's factor cache, and what the method adds (e.g. a
        shared basis store)."""
        return {"factor_cache": self.factor_cache}

    @property
    def factor_cache(self) -> FactorCache:
        """The model's inference :class:`FactorCache` (created with the first adapter)."""
        if "_factor_cache" not in self.__dict__:
            self.__dict__["_factor_cache"] = FactorCache()
        return self.__dict__["_factor_cache"]

    def add_weighted_adapter(self, *args, **kwargs):
        # peft's PeftModel forwards unknown attributes to the tuner; without this, the call fails as an
        # AttributeError on the transformers model.
        raise NotImplementedError(
            f"add_weighted_adapter is not available for {self.method_name}: a weighted sum of {self.method_name} "
            f"adapters is not a {self.method_name} adapter. The exact sum of two updates is a LoRA of the summed "
            f"ranks: export each adapter with peft_nola.export_lora (python -m peft_nola.export ADAPTER_DIR OUT_DIR), "
            f"load the LoRA adapters into one peft model and call add_weighted_adapter(..., combination_type='cat')."
        )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route ``adapter_names=[...]`` from ``forward``/``generate`` to every adapted layer (mixed batches)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set(self.peft_config)
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (loaded adapters: {sorted(known)})"
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = [
            module.register_forward_pre_hook(
                partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names), with_kwargs=True
            )
            for module in self.modules()
            if isinstance(module, (LowRankLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

