from __future__ import annotations

import torch
from torch import nn

from ..._peft_compat import BufferDict

from ...basis import uniform_stream
from ...svd import top_singular_triplets
from ..lowrank import FactorGroup, LowRankLayer, weight_matrix
from .config import NoraConfig


class NoraLayer(LowRankLayer):
    """A base layer with NoRA adapters: a trainable inner LoRA between frozen SVD factors of the base weight."""

    adapter_layer_names = ("nora_inner_A", "nora_inner_B")
    other_param_names = ("scaling", "output_slices", "adapter_dropout", "nora_U", "nora_Vt", "nora_core0")
    factor_input_names = ("nora_U", "nora_Vt", "nora_core0")
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
        U, Vt = torch.stack(U), torch.stack(Vt)  # (S, block_rows, r), (S, r, cols)
        if not config.store_outer_factors:
            # Adapters of equal outer rank share the frozen factors of the same weight: one copy in memory, and
            # mixed batches project the input onto V_r once for all of them (_stack_factors). Stored factors are
            # written by loading, so each adapter keeps its own.
            for name in self.nora_U:
                if name != adapter_name and _equal(self.nora_U[name], U) and _equal(self.nora_Vt[name], Vt):
                    U, Vt = self.nora_U[name], self.nora_Vt[name]
                    break
        self.nora_U[adapter_name] = U
        self.nora_Vt[adapter_name] = Vt
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

    def _stack_factors(self, names: list[str]) -> list[FactorGroup]:
        # Adapters sharing the layer's frozen U_r, V_r (same outer rank) form one group: x V_r is computed once for
        # all their samples, then each sample's r x r core (A B − C₀, scaled; block-diagonal over the adapted output
        # blocks), then U_r once.
        groups: dict[tuple, list[str]] = {}
        for name in names:
            U, Vt = self.nora_U[name], self.nora_Vt[name]
            key = (U.data_ptr(), Vt.data_ptr(), tuple(U.shape), tuple(Vt.shape), self.nora_inner_A[name].shape,
                   self.output_slices[name])
            groups.setdefault(key, []).append(name)
        stacked = []
        for members in groups.values():
            first = members[0]
            A = torch.stack([self.nora_inner_A[name] for name in members])  # (D, S, r, inner_r)
            B = torch.stack([self.nora_inner_B[name] for name in members])
            core0 = torch.stack([self.nora_core0[name] for name in members]).to(A.dtype)
            scales = torch.tensor([self.scaling[name] for name in members], dtype=A.dtype, device=A.device)
            cores = (A @ B - core0) * scales[:, None, None, None]  # (D, S, r, r)
            num_adapters, num_blocks, r, _ = cores.shape
            mids = cores.new_zeros(num_adapters, num_blocks * r, num_blocks * r)
            for block in range(num_blocks):
                mids[:, block * r : (block + 1) * r, block * r : (block + 1) * r] = cores[:, block]
            U, Vt = self.nora_U[first].to(A.dtype), self.nora_Vt[first].to(A.dtype)
            stacked.append(FactorGroup(tuple(members), Vt.reshape(-1, self.cols), mids, None, self._full_up(U, first)))
        return stacked


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
