from __future__ import annotations

import torch
from torch import nn

from ..._peft_compat import BufferDict

from ...basis import uniform_stream
from ...svd import top_singular_triplets
from ..lowrank import LowRankLayer, weight_matrix
from .config import NoraConfig


class NoraLayer(LowRankLayer):
    """A base layer with NoRA adapters: a trainable inner LoRA between frozen SVD factors of the base weight."""

    adapter_layer_names = ("nora_inner_A", "nora_inner_B")
    other_param_names = ("scaling", "output_slices", "adapter_dropout", "nora_U", "nora_Vt", "nora_core0")
    method_name = "nora"

    def _init_adapter_containers(self, config: NoraConfig) -> None:
        self.nora_inner_A = nn.ParameterDict({})
        self.nora_inner_B = nn.ParameterDict({})
        # Persistent (saved in the adapter file) only when the config asks to store the outer factors; every adapter
        # of a model uses the same choice (NoraModel checks this).
        self.nora_U = BufferDict({}, persistent=config.store_outer_factors)
        self.nora_Vt = BufferDict({}, persistent=config.store_outer_factors)
        self.nora_core0 = BufferDict({}, persistent=config.store_outer_factors)

    def _scale_and_dropout(self, config: NoraConfig) -> tuple[float, float]:
        return config.nora_alpha / config.inner_r, config.nora_dropout

    def _create_adapter(self, adapter_name, config: NoraConfig, block_shape, **kwargs):
        _, adapt = self.output_slices[adapter_name]
        block_rows, _ = block_shape
        weight = weight_matrix(self.get_base_layer()).detach()
        r, inner_r = config.r, config.inner_r
        U, Vt, A, B = [], [], [], []
        for block in adapt:
            u, sigma, v = top_singular_triplets(
                weight[block * block_rows : (block + 1) * block_rows], r, method=config.svd_method
            )
            # A₀ = diag(√σ)[:, :inner_r] and B₀ = A₀ᵀ, so A₀B₀ = diag(σ_1..σ_inner_r, 0..0): Σ_r restricted.
            a0 = torch.zeros(r, inner_r, dtype=torch.float32, device=weight.device)
            a0[torch.arange(inner_r), torch.arange(inner_r)] = sigma[:inner_r].sqrt().float()
            b0 = a0.T.clone()
            if not config.init_weights:  # a non-zero update, for tests
                noise = uniform_stream(0, f"nora-init/{self.module_key}/{block}", 0, inner_r * r, device=weight.device)
                b0 += 0.5 * sigma[0].sqrt().float() * noise.view(inner_r, r)
            U.append(u.float())
            Vt.append(v.T.float())
            A.append(a0)
            B.append(b0)
        self.nora_U[adapter_name] = torch.stack(U)  # (S, block_rows, r)
        self.nora_Vt[adapter_name] = torch.stack(Vt)  # (S, r, cols)
        A, B = torch.stack(A), torch.stack(B)
        # C₀ = A₀A₀ᵀ. Each entry of a product of a diagonal A₀ with A₀ᵀ is one rounding, so A₀B₀ − C₀ is exactly 0
        # on any device.
        self.nora_core0[adapter_name] = torch.bmm(A, A.transpose(1, 2))
        self.nora_inner_A[adapter_name] = nn.Parameter(A)
        self.nora_inner_B[adapter_name] = nn.Parameter(B)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.nora_inner_A[adapter_name], self.nora_inner_B[adapter_name]
        U, Vt, core0 = (buffers[adapter_name].to(A.dtype) for buffers in (self.nora_U, self.nora_Vt, self.nora_core0))
        return (torch.bmm(A, B) - core0) @ Vt, U
