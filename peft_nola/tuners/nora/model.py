from __future__ import annotations

import math

from torch import nn

from ...basis import layout_fingerprint
from ...svd import weight_fingerprint
from ..lowrank import LowRankTuner, matrix_shape, resolve_slices, weight_matrix
from .config import NoraConfig
from .layer import NoraLayer

# Relative tolerance of the base-weight fingerprint: float64 sums differ between machines by ~1e-15 relative, while
# a different (even fine-tuned) base model differs by far more.
_FINGERPRINT_RTOL = 1e-9


class NoraModel(LowRankTuner):
    """Injects NoRA adapters into a model; created by ``peft.get_peft_model`` with a :class:`NoraConfig`."""

    prefix = "nora_"
    tuner_layer_cls = NoraLayer
    method_name = "NoRA"

    def _check_new_adapter_config(self, config: NoraConfig) -> None:
        super()._check_new_adapter_config(config)
        modes = {c.store_outer_factors for c in self.peft_config.values()}
        if len(modes) > 1:
            raise ValueError(
                "All NoRA adapters of a model must use the same store_outer_factors setting, got both True and False"
            )

    def _check_targets(self, config: NoraConfig, targets: list[tuple[str, nn.Module]]) -> None:
        super()._check_targets(config, targets)
        if not targets:
            return  # peft raises its own "target modules not found" error
        entries = []
        for key, base_layer in targets:
            rows, cols = matrix_shape(base_layer)
            splits, adapt = resolve_slices(config.output_slices, key)
            if config.r > min(rows // splits, cols):
                raise ValueError(
                    f"r={config.r} exceeds the rank of layer '{key}', whose weight (block) is {rows // splits}x{cols}: "
                    f"choose r <= {min(rows // splits, cols)} or leave this layer out of target_modules"
                )
            entries.append([key, rows, cols, splits, list(adapt), config.r, config.inner_r])
        layout = layout_fingerprint(entries)
        if config.layout_fingerprint is not None and config.layout_fingerprint != layout:
            key, rows, cols = entries[0][:3]
            raise ValueError(
                f"This NoRA adapter was made for a different model: its layout_fingerprint is "
                f"{config.layout_fingerprint!r}, but the {len(entries)} layers it targets here (e.g. '{key}' with a "
                f"{rows}x{cols} weight) give {layout!r}. Load it onto the base model it was trained on "
                f"(base_model_name_or_path={config.base_model_name_or_path!r})."
            )
        config.layout_fingerprint = layout
        if config.store_outer_factors:
            return  # the adapter file holds U, Vᵀ and C₀: any model with these layer shapes is fine
        weights = weight_fingerprint({key: weight_matrix(base_layer) for key, base_layer in targets})
        expected = config.weight_fingerprint
        if expected is not None and not all(
            math.isclose(a, b, rel_tol=_FINGERPRINT_RTOL, abs_tol=_FINGERPRINT_RTOL * math.sqrt(weights[0]))
            for a, b in zip(expected, weights)
        ):
            raise ValueError(
                f"This NoRA adapter recomputes its frozen SVD factors from the base weights, but these are not the "
                f"weights it was trained on (weight_fingerprint {expected} != {weights}). Load it onto its own base "
                f"model (base_model_name_or_path={config.base_model_name_or_path!r}), or save adapters with "
                f"store_outer_factors=True to make them independent of the base weights."
            )
        config.weight_fingerprint = weights
