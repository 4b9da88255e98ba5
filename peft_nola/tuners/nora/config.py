from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils import PeftType

from ...svd import SVD_METHODS
from ...model_card import ModelCardMixin
from ..lowrank import LowRankConfig, require_int, require_probability


@dataclass
class NoraConfig(ModelCardMixin, LowRankConfig):
    """Configuration of a NoRA adapter (Lin et al., "NoRA: Nested Low-Rank Adaptation", arXiv 2408.10280).

    For an adapted weight ``W`` (viewed as ``y = W x``, shape ``(m, n)``) with SVD ``W = U Σ Vᵀ``, NoRA keeps the top
    ``r`` singular directions ``U_r (m x r)``, ``V_r (n x r)`` frozen and trains an inner LoRA ``A (r x inner_r)``,
    ``B (inner_r x r)`` on the ``r x r`` core:

        ΔW = scale · U_r (A B − C₀) V_rᵀ,    scale = nora_alpha / inner_r,

    where ``A₀ = diag(√σ)[:, :inner_r]``, ``B₀ = A₀ᵀ`` ("the inner LoRA is initialised with Σ") and
    ``C₀ = A₀ B₀ = diag(σ_1, …, σ_inner_r, 0, …, 0)``, the restriction of ``Σ_r`` to its top ``inner_r`` directions.
    So training starts from the SVD-informed point (the inner factors span the dominant singular directions with
    their magnitudes) while ``ΔW = 0``: the adapted model equals the base model at init. ``C₀`` is a frozen
    buffer. Trainable parameters per adapted layer (or block, see ``output_slices``): ``2 · r · inner_r``.

    Outer factors are computed in float64 from the base weight (bitsandbytes 8-bit/4-bit weights are dequantized
    first), with a fixed sign convention (:mod:`peft_nola.svd`). ``store_outer_factors=False`` (default) keeps the
    adapter file tiny and recomputes them on load; ``weight_fingerprint`` (filled in on creation) is then checked
    so that loading onto a different base model is an error. ``store_outer_factors=True`` writes ``U_r``, ``V_rᵀ``
    and ``C₀`` into the adapter file, which then loads onto any model with the same layer shapes.
    """

    r: int = field(default=16, metadata={"help": "Outer rank: number of singular directions kept (frozen)."})
    inner_r: int = field(default=4, metadata={"help": "Rank of the trainable inner LoRA, 1 <= inner_r <= r."})
    nora_alpha: float = field(default=4.0, metadata={"help": "The update is scaled by nora_alpha / inner_r."})
    nora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    store_outer_factors: bool = field(
        default=False,
        metadata={"help": "Save U_r, V_r^T and C0 in the adapter file (True) or recompute them from the base weights."},
    )
    svd_method: str = field(
        default="auto",
        metadata={
            "help": f"One of {SVD_METHODS}: exact SVD, a seeded randomized range-finder SVD (much faster on large "
            "layers), or 'auto': exact up to 2048 on the smaller side, randomized above (see peft_nola.svd)."
        },
    )
    weight_fingerprint: Optional[list] = field(
        default=None, metadata={"help": "Set on creation: identifies the base weights the factors come from."}
    )

    def __post_init__(self):
        self.peft_type = PeftType.NORA
        super().__post_init__()
        require_int("r", self.r, 1)
        require_int("inner_r", self.inner_r, 1)
        if self.inner_r > self.r:
            raise ValueError(f"inner_r must be <= r, got inner_r={self.inner_r} and r={self.r}")
        require_probability("nora_dropout", self.nora_dropout)
        if isinstance(self.nora_alpha, bool) or not isinstance(self.nora_alpha, (int, float)):
            raise ValueError(f"nora_alpha must be a number, got {self.nora_alpha!r}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
