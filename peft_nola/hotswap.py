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

from .tuners.lowrank import LowRankTuner, adapted_layers


def hotswap_adapter(model, model_name_or_path: str, adapter_name: str = "default",
                    torch_device: Optional[str] = None) -> None:
    """Replace the coefficients (NOLA) or inner factors (NoRA) of ``model``'s adapter ``adapter_name`` with those
    saved in the directory ``model_name_or_path``, in place.

    The saved adapter is checked as ``PeftModel.from_pretrained`` checks it (its files, its checksum, that it fits
    this base model: layout and basis fingerprints, NoRA's base weights) and must have the structure of the loaded
    one (same method, layers, ranks, basis seed, size and mode; see ``LowRankTuner.hotswap_signature``); otherwise a
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
    layers = adapted_layers(model, adapter_name)
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                         f"hotswapping it")
    config, pairs = tuner.read_checked_adapter(model, Path(model_name_or_path), adapter_name, torch_device)
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    for layer in layers:
        layer.set_scale_from_config(adapter_name, config)
    config.inference_mode = model.peft_config[adapter_name].inference_mode
    model.peft_config[adapter_name] = config
