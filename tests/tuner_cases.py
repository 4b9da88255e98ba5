"""The cases the tuner battery (``test_tuner_battery.py``) runs every method through, as peft's
``tests/testing_common.py``: how each method builds its config, which of its tensors train, and its update computed
here from its definition, independently of the library's code path.

Nothing here builds a config or a model at import: tests call these factories, so that a peft release refusing a
config fails the tests that use it, not the collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, NoraConfig, NoraLayer, basis_rows

from .conftest import TinyCNN, TinyMLP, seeded, tiny_gpt2, tiny_llama, tiny_vit

N_EMBD = 32  # tiny_gpt2's width: c_attn is a 32 -> 96 Conv1D, q, k and v blocks of 32 rows each
QV_BLOCKS = (0, 2)  # GPT2_QV_SLICES: the q and v blocks of c_attn are adapted, k is not


def c_attn_block(model_or_base, layer: int, block: int) -> torch.Tensor:
    """Block ``block`` (0 = q, 2 = v) of c_attn's weight as a (out, in) float64 matrix, read from the base model."""
    base = model_or_base.get_base_model() if hasattr(model_or_base, "get_base_model") else model_or_base
    conv = base.transformer.h[layer].attn.c_attn
    weight = getattr(conv, "base_layer", conv).weight.detach().double().T  # Conv1D stores (in, out)
    n = weight.shape[1]
    return weight[block * n : (block + 1) * n]


# ------------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Setting:
    """A tiny base model, the layers to adapt and an input for it."""

    make_base: Callable[[], nn.Module]
    targets: dict
    make_inputs: Callable[[], dict]
    rank_limit: Optional[int] = None  # the smallest rank of an adapted weight, where a method's default r exceeds it


def _tokens():
    return {"input_ids": torch.randint(1, 96, (2, 7))}


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {
    "gpt2-qv": Setting(tiny_gpt2, dict(target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True,
                                       task_type="CAUSAL_LM"), _tokens),
    "llama-qv": Setting(tiny_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), _tokens),
    "llama-all-linear": Setting(tiny_llama, dict(target_modules=ALL_LINEAR), _tokens),
    "vit-mlp": Setting(tiny_vit, dict(target_modules=["fc1", "fc2"], modules_to_save=["classifier"]),
                       lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    "mlp": Setting(lambda: seeded(TinyMLP), dict(target_modules=["lin0", "lin1"]), lambda: {"x": torch.randn(4, 12)},
                   rank_limit=6),  # lin1 is 20 -> 6
    "cnn": Setting(lambda: seeded(TinyCNN), dict(target_modules=["conv0", "conv1"]),
                   lambda: {"x": torch.randn(2, 3, 8, 8)}, rank_limit=4),  # conv1: 4 output channels
}


# ------------------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """One method (with its options) as the battery sees it; subclasses say what is specific."""

    id: str
    options: dict = field(default_factory=dict)

    # Said by each method (class attributes, not fields):
    name = ""
    layer_cls = nn.Module
    config_cls = object
    trainable = ()  # the names of the adapter's trainable tensors
    gradient_at_init = ()  # those a gradient reaches while the update is still 0
    defaults = {}  # the method's own settings (rank, basis size)
    trained_kwargs = {}  # config settings of a trained-looking adapter (with make_trained)

    def config(self, setting: str = "gpt2-qv", **kwargs):
        """The method's config for a model of ``SETTINGS``; ``kwargs`` override."""
        chosen = SETTINGS[setting]
        config = {**self.defaults, **chosen.targets, **self.options, **kwargs}
        if chosen.rank_limit is not None and "r" not in kwargs:
            config["r"] = min(config["r"], chosen.rank_limit)
            config = self.fit_rank(config)
        return self.config_cls(**config)

    def fit_rank(self, config: dict) -> dict:
        return config

    def layers(self, model) -> list:
        return [m for m in model.modules() if isinstance(m, self.layer_cls)]

    def first_trainable(self, layer) -> nn.ParameterDict:
        return getattr(layer, self.trainable[0])


class Nola(Method):
    name = "nola"
    layer_cls = NolaLayer
    config_cls = NolaConfig
    trainable = ("nola_coef_A", "nola_coef_B")
    # β = 0 at init, so the gradient of α is 0 then; β's is not.
    gradient_at_init = ("nola_coef_B",)
    R, K, L = 4, 40, 30
    defaults = dict(r=R, num_basis_A=K, num_basis_B=L)
    dropout_field = "nola_dropout"
    basis_modes = ("shared", "per_layer", "per_layer_cached")

    @property
    def basis_mode(self) -> str:
        return self.options.get("basis_mode", "shared")

    def trainable_per_block(self, config) -> int:
        """k + l coefficients per adapted block, whatever r and the block's shape."""
        return config.num_basis_A + config.num_basis_B

    # --- the update against its definition (gpt2-qv)
    definition_kwargs = dict(init_weights=False, nola_alpha=2.0, basis_seed=3)
    definition_tolerance = dict(atol=1e-6, rtol=1e-5)

    def expected_delta(self, model, index: int) -> torch.Tensor:
        """ΔW = (c / r) · B · A with A = Σ α_i A_i, B = Σ β_j B_j, in the q and v thirds of c_attn only; the basis
        matrices regenerated from seed 3 and the stream names the basis mode gives them (one basis per shape when
        shared, one per layer and block otherwise). Shape (out, in)."""
        layer = model.base_model.model.transformer.h[index].attn.c_attn
        R, K, L, n = self.R, self.K, self.L, N_EMBD
        alpha, beta = layer.nola_coef_A["default"].detach(), layer.nola_coef_B["default"].detach()
        expected = torch.zeros(3 * n, n)
        for slot, block in enumerate(QV_BLOCKS):
            if self.basis_mode == "shared":
                stream_A, stream_B = f"A/{R}x{n}", f"B/{n}x{R}"
            else:
                stream_A, stream_B = (f"{f}/transformer.h.{index}.attn.c_attn/{block}" for f in "AB")
            basis_A = basis_rows(3, stream_A, K, R * n).view(K, R, n)
            basis_B = basis_rows(3, stream_B, L, n * R).view(L, n, R)
            A = sum(alpha[slot, i] * basis_A[i] for i in range(K))
            B = sum(beta[slot, j] * basis_B[j] for j in range(L))
            expected[block * n : (block + 1) * n] = (2.0 / R) * B @ A
        return expected

    # --- a second adapter of other shapes: another rank, seed and basis mode (so modes mix in one batch)
    def second_adapter_kwargs(self) -> dict:
        modes = self.basis_modes
        return dict(basis_seed=9, r=2, basis_mode=modes[(modes.index(self.basis_mode) + 1) % len(modes)])

    def make_trained(self, model) -> None:
        """A trained-looking adapter: β drawn from N(0, 0.5²) (at init it is 0)."""
        with torch.no_grad():
            for layer in self.layers(model):
                layer.nola_coef_B["default"].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))

    def saved_kinds(self) -> set:
        return {"nola_coef_A", "nola_coef_B"}

    def saved_numel(self) -> Optional[int]:
        return 2 * 2 * (self.K + self.L)  # 2 layers x (q, v) x (k + l)

    def trainer_config(self):
        """The config the Trainer test trains (llama, q and v)."""
        return self.config("llama-qv", num_basis_A=64, num_basis_B=64)

    def bitsandbytes_config(self):
        return self.config("llama-qv", num_basis_A=64, num_basis_B=64)


class Nora(Method):
    name = "nora"
    layer_cls = NoraLayer
    config_cls = NoraConfig
    trainable = ("nora_inner_A", "nora_inner_B")
    # A₀B₀ − C₀ = 0 with A₀, B₀ ≠ 0: gradients reach both inner factors from the first step.
    gradient_at_init = ("nora_inner_A", "nora_inner_B")
    R, INNER = 8, 2
    defaults = dict(r=R, inner_r=INNER)
    trained_kwargs = dict(init_weights=False)
    dropout_field = "nora_dropout"

    def fit_rank(self, config: dict) -> dict:
        config["inner_r"] = min(config["inner_r"], config["r"])
        return config

    def trainable_per_block(self, config) -> int:
        """2 · r · inner_r: the inner LoRA A (r x inner_r) and B (inner_r x r) of each adapted block."""
        return 2 * config.r * config.inner_r

    definition_kwargs = dict(init_weights=False, nora_alpha=3.0)
    definition_tolerance = dict(atol=1e-5, rtol=1e-4)

    def expected_delta(self, model, index: int) -> torch.Tensor:
        """ΔW = (nora_alpha / inner_r) · U_r (A B − C₀) V_rᵀ in the q and v blocks, zero in the k block, with
        C₀ = diag(σ_1..σ_inner_r, 0..0) from LAPACK's singular values of the base block. Shape (out, in)."""
        layer = model.base_model.model.transformer.h[index].attn.c_attn
        R, INNER, n = self.R, self.INNER, N_EMBD
        expected = torch.zeros(3 * n, n)
        for slot, block in enumerate(QV_BLOCKS):
            U, Vt = layer.nora_U["default"][slot], layer.nora_Vt["default"][slot]
            A, B = layer.nora_inner_A["default"][slot].detach(), layer.nora_inner_B["default"][slot].detach()
            sigma = torch.linalg.svdvals(c_attn_block(model, index, block))[:R].float()
            C0 = torch.diag(sigma * (torch.arange(R) < INNER))
            expected[block * n : (block + 1) * n] = (3.0 / INNER) * U @ (A @ B - C0) @ Vt
        return expected

    def second_adapter_kwargs(self) -> dict:
        return dict(r=4, inner_r=4, nora_alpha=1.0)

    def make_trained(self, model) -> None:
        """Nothing: the battery's trained-looking NoRA adapters come from ``init_weights=False``."""

    def saved_kinds(self) -> set:
        if self.options.get("store_outer_factors"):
            return {"nora_inner_A", "nora_inner_B", "nora_U", "nora_Vt", "nora_core0"}
        return {"nora_inner_A", "nora_inner_B"}

    def saved_numel(self) -> Optional[int]:
        if self.options.get("store_outer_factors"):
            return None
        return 2 * 2 * 2 * self.R * self.INNER  # 2 layers x (q, v) x (A and B of r x inner_r)

    def trainer_config(self):
        return self.config("llama-qv", r=8, inner_r=4, target_modules=["q_proj", "v_proj", "up_proj"])

    def bitsandbytes_config(self):
        return self.config("llama-qv", r=4, inner_r=2)


def cases(*methods: Method) -> list:
    return [pytest.param(method, id=method.id) for method in methods]


NOLA_SHARED = Nola("nola-shared", dict(basis_mode="shared"))
NOLA_PER_LAYER = Nola("nola-per_layer", dict(basis_mode="per_layer"))
NOLA_PER_LAYER_CACHED = Nola("nola-per_layer_cached", dict(basis_mode="per_layer_cached"))
NORA = Nora("nora")
NORA_STORED = Nora("nora-stored", dict(store_outer_factors=True))

# Every method in each of its modes that changes the computation: NOLA's three basis modes, NoRA.
EVERY_METHOD = cases(NOLA_SHARED, NOLA_PER_LAYER, NOLA_PER_LAYER_CACHED, NORA)
# One case per method, for properties whose cost is a training run.
ONE_PER_METHOD = cases(NOLA_SHARED, NORA)
