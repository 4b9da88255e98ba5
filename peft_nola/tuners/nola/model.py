from __future__ import annotations

from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...basis import generator_fingerprint, layout_fingerprint
from ..lowrank import LowRankTuner, is_supported, matrix_shape, resolve_slices
from .config import NolaConfig
from .layer import NolaLayer


class NolaModel(LowRankTuner):
    """Injects NOLA adapters into a model; created by ``peft.get_peft_model`` with a :class:`NolaConfig`.

    Holds the shared basis store ``nola_basis``: non-persistent buffers (never in the state dict), generated lazily
    on the device and in the dtype of the coefficients, and moved with the model by ``.to()``.
    """

    prefix = "nola_"
    tuner_layer_cls = NolaLayer
    method_name = "NOLA"
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: NolaConfig, adapter_name: str) -> None:
        if "nola_basis" not in self._modules:
            self.nola_basis = BufferDict({}, persistent=False)

    def _layer_kwargs(self, adapter_name: str, module_key: str) -> dict:
        return {"basis_store": self.nola_basis}

    def _check_targets(self, config: NolaConfig, targets: list[tuple[str, nn.Module]]) -> None:
        super()._check_targets(config, targets)
        if not targets:
            return  # peft raises its own "target modules not found" error
        entries = []
        for key, base_layer in targets:
            splits, adapt = resolve_slices(config.output_slices, key)
            entries.append([key, *matrix_shape(base_layer), splits, list(adapt), config.r])
        fingerprints = {
            "basis_fingerprint": generator_fingerprint(config.basis_seed),
            "layout_fingerprint": layout_fingerprint(entries),
        }
        if config.basis_fingerprint is not None and config.basis_fingerprint != fingerprints["basis_fingerprint"]:
            raise ValueError(
                f"The NOLA basis cannot be reproduced here: the adapter's basis_fingerprint is "
                f"{config.basis_fingerprint!r} but this installation generates {fingerprints['basis_fingerprint']!r} "
                f"for basis_seed={config.basis_seed}. The adapter was saved by a peft-nola version with a different "
                f"basis generator; load it with that version."
            )
        if config.layout_fingerprint is not None and config.layout_fingerprint != fingerprints["layout_fingerprint"]:
            key, rows, cols = entries[0][:3]
            raise ValueError(
                f"This NOLA adapter was made for a different model: its layout_fingerprint is "
                f"{config.layout_fingerprint!r}, but the {len(entries)} layers it targets here (e.g. '{key}' with a "
                f"{rows}x{cols} weight) give {fingerprints['layout_fingerprint']!r}. Load it onto the base model it "
                f"was trained on (base_model_name_or_path={config.base_model_name_or_path!r}); to start a new adapter "
                f"from this config, set basis_fingerprint and layout_fingerprint to None."
            )
        config.basis_fingerprint = fingerprints["basis_fingerprint"]
        config.layout_fingerprint = fingerprints["layout_fingerprint"]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # Cached bases are regenerated on demand; dropping them all frees the ones no adapter uses any more.
        for key in list(self.nola_basis):
            del self.nola_basis[key]
