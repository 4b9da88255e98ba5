"""The mechanism NOLA and NoRA share, shaped like peft's ``tuners/lora/``: a frozen base layer plus, per adapter,
``scale * up @ down`` updates.

``config`` (shared settings and their validators), ``geometry`` (matrix shapes, output slices, name matching),
``layer`` (:class:`LowRankLayer`: set-up, math, merge, forward), ``model`` (:class:`LowRankTuner`), ``load_checks``
(every check on the way into a model), ``factor_cache`` and ``mixed_batch`` (serving).
"""

from .config import LowRankConfig, check_regex, require_finite, require_int, require_probability
from .factor_cache import DEFAULT_FACTOR_CACHE_BYTES, FACTOR_CACHE_ENV, FactorCache
from .geometry import (
    GPT2_QV_SLICES,
    SUPPORTED_LAYERS,
    is_supported,
    matrix_shape,
    modules_outside_wrappers,
    names_module,
    resolve_slices,
    validate_output_slices,
    weight_matrix,
)
from .layer import LowRankLayer, adapted_layers
from .load_checks import AdapterLoadChecks, check_adapter_for_model
from .mixed_batch import FactorGroup, grouped_delta, sample_layout
from .model import LowRankTuner, set_factor_cache_budget

__all__ = [
    "DEFAULT_FACTOR_CACHE_BYTES",
    "FACTOR_CACHE_ENV",
    "GPT2_QV_SLICES",
    "SUPPORTED_LAYERS",
    "AdapterLoadChecks",
    "FactorCache",
    "FactorGroup",
    "LowRankConfig",
    "LowRankLayer",
    "LowRankTuner",
    "adapted_layers",
    "check_adapter_for_model",
    "check_regex",
    "grouped_delta",
    "is_supported",
    "matrix_shape",
    "modules_outside_wrappers",
    "names_module",
    "require_finite",
    "require_int",
    "require_probability",
    "resolve_slices",
    "sample_layout",
    "set_factor_cache_budget",
    "validate_output_slices",
    "weight_matrix",
]
