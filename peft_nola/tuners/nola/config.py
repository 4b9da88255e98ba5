from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils import PeftType

from ...model_card import ModelCardMixin
from ...quantization import DEFAULT_SCHEME, validate_bits, validate_scheme
from ..lowrank import LowRankConfig, require_int, require_probability

BASIS_MODES = ("shared", "per_layer", "per_layer_cached")


@dataclass
class NolaConfig(ModelCardMixin, LowRankConfig):
    """Configuration of a NOLA adapter (Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of
    Random Basis", ICLR 2024, arXiv 2310.02556).

    For an adapted weight ``W`` (viewed as ``y = W x``, shape ``(m, n)``) NOLA adds
    ``ΔW = (nola_alpha / r) · B · A`` with ``A = Σ_{i<k} α_i A_i`` (``r x n``, input side) and
    ``B = Σ_{j<l} β_j B_j`` (``m x r``, output side), where the ``A_i`` and ``B_j`` are frozen pseudo-random matrices
    generated from ``basis_seed``; only ``α`` (k numbers) and ``β`` (l numbers) train, so each adapted layer (or
    adapted block, see ``output_slices``) has ``k + l`` trainable parameters whatever ``r`` and its shape.
    The saved adapter holds the coefficients only; the basis is regenerated bit-identically from the seed by
    :mod:`peft_nola.basis` on any device.

    Paper symbols → names here: ``k`` → ``num_basis_A``, ``l`` → ``num_basis_B``, ``c`` → ``nola_alpha``,
    ``r`` → ``r``, the random seed → ``basis_seed``; α → ``nola_coef_A``, β → ``nola_coef_B`` (the trainable tensors).
    (The paper writes ``ΔW = A B`` with ``A`` on the output side; here, as in peft's LoRA, ``A`` is the input-side
    factor and ``B`` the output-side one that starts at zero.)

    Basis and initialisation. Basis entries are uniform on (-1, 1) times ``1/sqrt(k)`` (for ``A_i``) or ``1/sqrt(l)``
    (for ``B_j``), the scale of the authors' code. ``β = 0``, so the adapted model equals the base model at init;
    ``α`` is drawn (from the same seeded generator) uniform on ``±sqrt(3 / n)``, which gives ``A`` entries of variance
    ``1 / (3n)``: the scale of LoRA's Kaiming-uniform ``lora_A``. Gradients reach ``β`` from the first step.

    Basis memory (``basis_mode``):
      * ``"shared"`` (default): one basis per distinct ``(r, n)`` / ``(m, r)`` shape, shared by every layer of that
        shape (the paper's "shared basis" variant, its Table 2); each layer still has its own coefficients. Cost:
        ``k·r·n + l·m·r`` floats per distinct shape, generated once and cached in non-persistent buffers, so training
        runs at LoRA's speed. This is the default because it is both the fastest and among the smallest.
      * ``"per_layer"``: an independent basis per layer (the paper's main setting), regenerated on the fly in chunks
        in every forward and backward; no basis memory, but generation costs time every step.
      * ``"per_layer_cached"``: an independent basis per layer kept in memory: fast, but ``(k·r·n + l·m·r)`` floats
        per layer (3 GB for GPT-2 medium QV at k=l=1000, r=8).

    Quantized coefficients (the paper's Section 2 and Table 4; see :mod:`peft_nola.quantization`). With
    ``coefficient_bits=b`` (2..8) the saved adapter stores α and β as packed ``b``-bit integers plus a small header
    per tensor (``≈ b/8`` bytes per coefficient), and ``PeftModel.from_pretrained`` dequantizes them on load:
      * ``quantization_aware=False``: training is in full precision and saving quantizes (post-training
        quantization; :func:`peft_nola.quantize_coefficients` does the same to the model in memory);
      * ``quantization_aware=True``: quantization-aware training. The forward pass uses the quantized coefficients,
        the optimizer updates the full-precision ones (the trainable parameters), and gradients pass the rounding
        unchanged (straight-through estimator). The saved adapter is the quantized one, so resuming training from
        a saved checkpoint restarts from the quantized values.
    ``quantization_scheme`` is ``"affine"`` (min/max range, all ``2**b`` levels; the default, measured better at 2-3
    bits) or ``"symmetric"`` (``±max|x|``, ``2**b - 1`` levels around an exact zero). The basis and the base model
    stay in full precision. With ``coefficient_bits=None`` (the default) nothing is quantized, and the quantization
    fields are left out of ``adapter_config.json``, which stays as it was before they existed.

    The basis never enters the state dict. ``basis_fingerprint`` and ``layout_fingerprint`` are filled in when the
    adapter is created and checked when it is loaded: a generator that does not reproduce the basis, or a model
    whose adapted layers differ in names or shapes, is an error, never a silently different model.
    """

    r: int = field(default=8, metadata={"help": "Rank of the update (the paper's r)."})
    num_basis_A: int = field(default=1000, metadata={"help": "k: number of basis matrices (and coefficients) for A."})
    num_basis_B: int = field(default=1000, metadata={"help": "l: number of basis matrices (and coefficients) for B."})
    nola_alpha: float = field(default=1.0, metadata={"help": "c: the update is scaled by nola_alpha / r."})
    nola_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    basis_seed: int = field(default=0, metadata={"help": "Seed of the basis (and of α's initial values), >= 0."})
    basis_mode: str = field(
        default="shared", metadata={"help": f"How the basis is held: one of {BASIS_MODES} (see the class docstring)."}
    )
    coefficient_bits: Optional[int] = field(
        default=None,
        metadata={"help": "Store the coefficients as packed integers of this many bits (2..8); None: float32."},
    )
    quantization_aware: bool = field(
        default=False,
        metadata={"help": "Train with quantized coefficients in the forward pass (QAT, straight-through)."},
    )
    quantization_scheme: str = field(
        default=DEFAULT_SCHEME, metadata={"help": "Per-tensor quantizer: 'affine' (min/max) or 'symmetric' (absmax)."}
    )
    basis_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "Set on creation: hash of the generator's output for basis_seed."}
    )

    def __post_init__(self):
        self.peft_type = PeftType.NOLA
        super().__post_init__()
        require_int("r", self.r, 1)
        require_int("num_basis_A", self.num_basis_A, 1)
        require_int("num_basis_B", self.num_basis_B, 1)
        require_int("basis_seed", self.basis_seed, 0)
        require_probability("nola_dropout", self.nola_dropout)
        if isinstance(self.nola_alpha, bool) or not isinstance(self.nola_alpha, (int, float)):
            raise ValueError(f"nola_alpha must be a number, got {self.nola_alpha!r}")
        if self.basis_mode not in BASIS_MODES:
            raise ValueError(f"basis_mode must be one of {BASIS_MODES}, got {self.basis_mode!r}")
        if self.coefficient_bits is not None:
            self.coefficient_bits = validate_bits(self.coefficient_bits, "coefficient_bits")
        if not isinstance(self.quantization_aware, bool):
            raise ValueError(f"quantization_aware must be True or False, got {self.quantization_aware!r}")
        if self.quantization_aware and self.coefficient_bits is None:
            raise ValueError("quantization_aware=True needs coefficient_bits (an integer from 2 to 8)")
        validate_scheme(self.quantization_scheme, "quantization_scheme")

    def to_dict(self) -> dict:
        config = super().to_dict()
        if config.get("coefficient_bits") is None:
            # Unquantized adapters keep the adapter_config.json of releases without quantization, byte for byte,
            # so those releases still read them; the left-out fields only matter when coefficient_bits is set.
            for name in ("coefficient_bits", "quantization_aware", "quantization_scheme"):
                config.pop(name, None)
        return config
