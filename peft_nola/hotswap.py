"""Replacing a loaded adapter's tensors in place with those of another saved adapter (peft's ``hotswap_adapter`` for
LoRA, which refuses other methods).

The model keeps its modules, parameters and compiled graphs; only the values change, so a model compiled with
``torch.compile`` is not recompiled (parameters are graph inputs), and the inference factor cache sees the new values
through the parameters' version counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from .checks import WEIGHTS_NAME
from .tuners.lowrank import LowRankLayer, LowRankTuner


def hotswap_adapter(model, model_name_or_path: str, adapter_name: str = "default",
                    torch_device: Optional[str] = None) -> None:
    """Replace the coefficients (NOLA) or inner factors (NoRA) of ``model``'s adapter ``adapter_name`` with those
    saved in the directory ``model_name_or_path``, in place.

    The saved adapter is checked as ``PeftModel.from_pretrained`` checks it (its files, its checksum, that it fits
    this base model: layout and basis fingerprints, NoRA's base weights) and must have the structure of the loaded
    one (same method, layers, ranks, basis seed, size and mode; see ``_hotswap_signature``); otherwise a
    ``ValueError`` names the difference and the loaded adapter is left as it was. The scale (``nola_alpha`` /
    ``nora_alpha``) may differ; under ``torch.compile`` a different scale is a Python constant of the graph and causes
    one recompilation, equal scales none.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, LowRankTuner):
        raise ValueError("peft_nola.hotswap_adapter needs a PeftModel with NOLA or NoRA adapters; for LoRA use "
                         "peft.utils.hotswap.hotswap_adapter")
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r} to hotswap (loaded: {sorted(model.peft_config)})")
    layers = [m for m in model.modules() if isinstance(m, LowRankLayer) and adapter_name in m.scaling]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                         f"hotswapping it")
    config, pairs = _load_checked(model, tuner, Path(model_name_or_path), adapter_name, torch_device)
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    for layer in layers:
        layer.scaling[adapter_name] = layer._scale_and_dropout(config)[0]
    config.inference_mode = model.peft_config[adapter_name].inference_mode
    model.peft_config[adapter_name] = config


def _load_checked(model, tuner: LowRankTuner, path: Path, adapter_name: str, torch_device: Optional[str]):
    """``(config, [(model tensor, saved value), ...])`` of the saved adapter, after every check; nothing of the model
    changes.

    The load checks themselves are the tuner's (``from_pretrained``'s file checks, ``_check_targets``,
    ``_remap_adapter_state_dict_for_load``); this is the only place hotswapping calls them.
    """
    old = model.peft_config[adapter_name]
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} holds no adapter_config.json: pass a directory written by save_pretrained")
    config = type(old).from_pretrained(str(path))  # checks the directory's files first (checks.check_adapter_dir)
    if not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path} holds no {WEIGHTS_NAME}: pass a directory written by save_pretrained")
    if config.modules_to_save or old.modules_to_save:
        raise ValueError("hotswap_adapter does not swap modules_to_save; load the adapter with load_adapter instead")
    # The fingerprints the saved config records are checked against this base model and filled in (as on load).
    tuner._check_targets(config, tuner._targeted_modules(tuner.model, config))
    new_signature, old_signature = tuner._hotswap_signature(config), tuner._hotswap_signature(old)
    differences = [key for key in old_signature if new_signature[key] != old_signature[key]]
    if differences:
        key = differences[0]
        raise ValueError(
            f"Cannot hotswap {adapter_name!r} with the adapter in {path}: its {key} is {new_signature[key]!r}, the "
            f"loaded adapter's is {old_signature[key]!r} (differing: {differences}). Hotswapping replaces values in "
            f"place and needs the same structure; load it as another adapter with load_adapter instead."
        )
    device = torch_device or next(iter(model.parameters())).device.type
    state = load_file(str(path / WEIGHTS_NAME), device=str(device))
    remapped = tuner._remap_adapter_state_dict_for_load(model, config, adapter_name, state)
    targets = model.state_dict(keep_vars=True)
    unplaced = sorted(key for key in remapped if key not in targets)
    if unplaced:
        raise ValueError(f"The adapter in {path} holds tensors this model has no place for, e.g. '{unplaced[0]}'")
    return config, [(targets[key], value.to(targets[key].dtype)) for key, value in remapped.items()]
