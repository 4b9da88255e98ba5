from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...adapter_files import FLOAT_DTYPES
from ...svd import rounding_tolerance, weight_fingerprint
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

    @classmethod
    def _file_tensor_specs(cls, config: NoraConfig, num_blocks: int, block_rows, cols) -> dict[str, tuple]:
        r, inner_r, floats = config.r, config.inner_r, FLOAT_DTYPES
        specs = {"nora_inner_A": ((num_blocks, r, inner_r), floats), "nora_inner_B": ((num_blocks, inner_r, r), floats)}
        if config.store_outer_factors:
            specs.update(nora_U=((num_blocks, block_rows, r), floats), nora_Vt=((num_blocks, r, cols), floats),
                         nora_core0=((num_blocks, r, r), floats))
        return specs

    def _layout_fields(self, config: NoraConfig) -> list:
        return [config.r, config.inner_r]

    def hotswap_signature(self, config: NoraConfig) -> dict:
        signature = super().hotswap_signature(config)
        for name in ("inner_r", "store_outer_factors", "svd_method"):
            signature[name] = getattr(config, name)
        return signature

    def _check_targets(self, config: NoraConfig, targets: list[tuple[str, nn.Module]]) -> None:
        super()._check_targets(config, targets)
        if config.store_outer_factors or not targets:
            return  # stored factors: any model with these layer shapes is fine
        matrices = {key: weight_matrix(base_layer) for key, base_layer in targets}
        weights = weight_fingerprint(matrices)
        expected = config.weight_fingerprint
        strict = [_FINGERPRINT_RTOL * (abs(w) + math.sqrt(weights[0])) for w in weights]
        if expected is not None and not _close(expected, weights, strict):
            # A copy of the same base in a lower precision (bfloat16, float16) is the same model: its fingerprint
            # differs by at most the rounding of every weight. Anything further away is another model.
            dtype = min((m.dtype for m in matrices.values()), key=lambda d: torch.finfo(d).bits)
            unit_roundoff = torch.finfo(dtype).eps / 2
            rounded = unit_roundoff > torch.finfo(torch.float32).eps and _close(
                expected, weights, rounding_tolerance(matrices, unit_roundoff)
            )
            if not rounded:
                raise ValueError(
                    f"This NoRA adapter recomputes its frozen SVD factors from the base weights, but these are not "
                    f"the weights it was trained on (weight_fingerprint {expected} != {weights}"
                    + (f", allowing for {dtype} rounding" if unit_roundoff > torch.finfo(torch.float32).eps else "")
                    + f"). Load it onto its own base model (base_model_name_or_path={config.base_model_name_or_path!r}), "
                    f"or save adapters with store_outer_factors=True to make them independent of the base weights."
                )
            warnings.warn(
                f"The base weights are {dtype}, a rounded copy of the weights this NoRA adapter was trained on: its "
                f"frozen SVD factors are recomputed from the rounded weights, so its update differs from the trained "
                f"one by about that rounding (relative {unit_roundoff:.1e}). Load the base in the dtype it was "
                f"trained in to reproduce it exactly."
            )
            return  # the adapter keeps the fingerprint of the weights it was trained on
        config.weight_fingerprint = weights


def _close(expected: list, actual: list, tolerances: list) -> bool:
    # An empty or short list must not match: zip() would compare nothing.
    if not isinstance(expected, (list, tuple)) or len(expected) != len(actual) or not expected:
        return False
    return all(abs(a - b) <= tol for a, b, tol in zip(expected, actual, tolerances))
