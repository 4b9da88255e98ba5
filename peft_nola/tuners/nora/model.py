from __future__ import annotations

import math

from torch import nn

from ...svd import weight_fingerprint
from ..lowrank import LowRankTuner, weight_matrix
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

    def _check_layer(self, config: NoraConfig, key: str, block_rows: int, cols: int) -> None:
        if config.r > min(block_rows, cols):
            raise ValueError(
                f"r={config.r} exceeds the rank of layer '{key}', whose weight (block) is {block_rows}x{cols}: "
                f"choose r <= {min(block_rows, cols)} or leave this layer out of target_modules"
            )

    def _layout_fields(self, config: NoraConfig) -> list:
        return [config.r, config.inner_r]

    def _hotswap_signature(self, config: NoraConfig) -> dict:
        signature = super()._hotswap_signature(config)
        for name in ("inner_r", "store_outer_factors", "svd_method"):
            signature[name] = getattr(config, name)
        return signature

    def _check_targets(self, config: NoraConfig, targets: list[tuple[str, nn.Module]]) -> None:
        super()._check_targets(config, targets)
        if config.store_outer_factors or not targets:
            return  # stored factors: any model with these layer shapes is fine
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
