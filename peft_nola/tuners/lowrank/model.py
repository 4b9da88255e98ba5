"""The model half of the mechanism NOLA and NoRA share: which modules get which wrapper, the checks before
injection (through :class:`~.load_checks.AdapterLoadChecks`), the model's factor cache and mixed-batch hooks.

A method subclasses :class:`LowRankTuner` and only says which layer class to build (``prefix``, ``tuner_layer_cls``,
``method_name``) and what its files hold.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from peft.config import PeftConfig

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..._peft_compat import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
)
from .config import require_int
from .factor_cache import FactorCache
from .geometry import modules_outside_wrappers
from .layer import LowRankLayer, adapter_names_from_context, mixed_batch_assignment
from .load_checks import AdapterLoadChecks, _AdapterConfigs


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


class LowRankTuner(AdapterLoadChecks, BaseTuner):
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
        # This runs for every way in: peft's loaders, inject_adapter_in_model (with or without a state_dict: peft
        # then adapts the modules the state_dict names, a subset of those checked here) and transformers' loaders.
        peft_config = self.peft_config[adapter_name]
        from_transformers = self.check_transformers_load(peft_config)
        targets = self._targeted_modules(model, peft_config)
        self._check_targets(peft_config, targets)
        self.check_file_against_model(model, peft_config, targets)
        super().inject_adapter(model, adapter_name, **kwargs)
        if from_transformers is not None:
            self.load_for_transformers(model, adapter_name, peft_config, from_transformers)

    def _targeted_modules(self, model: nn.Module, peft_config: PeftConfig) -> list[tuple[str, nn.Module]]:
        """The ``(key, base layer)`` pairs ``peft_config`` will adapt, found with peft's own matcher."""
        peft_config = self._prepare_adapter_config(peft_config, self.get_model_config(model))
        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        targets = []
        for key, module in modules_outside_wrappers(model, (BaseTunerLayer,)):
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
        if torch.compiler.is_compiling():
            raise ValueError(
                "Mixed-adapter batches (`adapter_names`) are not supported under torch.compile (the assignment is a "
                "context variable, which torch.compile cannot trace): call the uncompiled model for them."
            )
        known = set(self.peft_config)
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (loaded adapters: {sorted(known)})"
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        # The assignment lives in a context variable for the length of this call: concurrent calls from other
        # threads each see their own (peft's LoRA registers per-call hooks on the shared modules, which they all see).
        # peft's modules_to_save wrappers read adapter_names from their keyword arguments: a pre-hook registered once
        # per wrapper passes them the current context's assignment.
        for module in self.modules():
            if isinstance(module, AuxiliaryTrainingWrapper) and not module.__dict__.get("_peft_nola_assignment_hook"):
                module.register_forward_pre_hook(adapter_names_from_context, with_kwargs=True)
                module.__dict__["_peft_nola_assignment_hook"] = True
        with mixed_batch_assignment(adapter_names):
            yield
