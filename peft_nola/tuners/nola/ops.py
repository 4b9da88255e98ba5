"""The basis combinations ``coefficients @ basis`` NOLA's layers run: with a stored basis as an autograd function
(:class:`_BasisCombination`), and with the basis generated on the fly as a torch custom operator
(:func:`combine_on_the_fly`, with its gradient), fused into one kernel on CUDA with Triton (:mod:`peft_nola.kernels`).
"""

from __future__ import annotations

import functools

import torch

from ... import kernels
from ...basis import basis_rows, basis_scale, stream_keys

# Basis elements generated at a time (on-the-fly mode, and building a stored basis): the generator's scratch is a
# few times this, a few MB.
_CHUNK_ELEMENTS = 2**18


class _BasisCombination(torch.autograd.Function):
    """``rows (M, k) @ basis (k, n)`` with the gradient for ``rows`` only.

    The basis is kept as a plain attribute, not a saved tensor, so the node can be traversed by several backward
    passes (one cached combination serves every micro-batch of a step, and reentrant checkpointing re-enters it).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        ctx.basis = basis
        with _no_autocast(rows):
            return rows @ basis

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.to(ctx.basis.dtype).contiguous()
        with _no_autocast(grad):
            return grad @ ctx.basis.T, None


# The on-the-fly combination is a torch custom operator: torch.compile treats it as one opaque call (with the shape
# rule below), so graphs of the per-layer mode neither trace the basis generator's integer arithmetic nor break.
@torch.library.custom_op("peft_nola::combine_on_the_fly", mutates_args=())
def combine_on_the_fly(rows: torch.Tensor, seed: int, streams: str, numel: int) -> torch.Tensor:
    """``rows[s] @ basis_s (M, numel)`` for one basis stream per row of ``rows (M, k)`` (``streams``: their names,
    one per line: an operator's schema has no list of strings), the basis generated now.

    Nothing of the basis is kept; the gradient generates it again. On CUDA with Triton one fused kernel generates
    each tile of every stream's basis in registers and multiplies it in (:mod:`peft_nola.kernels`); elsewhere each
    stream's basis is generated in chunks and multiplied chunk by chunk (memory: one chunk).
    """
    num_basis, streams = rows.shape[1], streams.split("\n")
    with _no_autocast(rows):
        if kernels.available(rows.device):
            return kernels.combine(rows, _device_keys(seed, tuple(streams), rows.device), numel, basis_scale(num_basis))
        outs = []
        for coef, stream in zip(rows, streams):
            out = None
            for start, basis in basis_chunks(seed, stream, num_basis, numel, rows.device, rows.dtype):
                part = coef[start : start + basis.shape[0]] @ basis
                out = part if out is None else out + part
            outs.append(out)
        return torch.stack(outs)


@combine_on_the_fly.register_fake
def _(rows, seed, streams, numel):
    return rows.new_empty(rows.shape[0], numel)


@torch.library.custom_op("peft_nola::combine_on_the_fly_grad", mutates_args=())
def combine_on_the_fly_grad(grad_out: torch.Tensor, seed: int, streams: str, num_basis: int) -> torch.Tensor:
    """The gradient of :func:`combine_on_the_fly` for its ``rows``: ``grad_out[s] @ basis_sᵀ (M, num_basis)``."""
    streams = streams.split("\n")
    with _no_autocast(grad_out):
        if kernels.available(grad_out.device):
            keys = _device_keys(seed, tuple(streams), grad_out.device)
            return kernels.combine_grad(grad_out, keys, num_basis, basis_scale(num_basis))
        numel = grad_out.shape[1]
        return torch.stack([
            torch.cat([basis @ g for _, basis in basis_chunks(seed, stream, num_basis, numel, g.device, g.dtype)])
            for g, stream in zip(grad_out, streams)
        ])


@combine_on_the_fly_grad.register_fake
def _(grad_out, seed, streams, num_basis):
    return grad_out.new_empty(grad_out.shape[0], num_basis)


def _combine_on_the_fly_setup(ctx, inputs, output):
    rows, seed, streams, _ = inputs
    ctx.basis_args = (seed, streams, rows.shape[1])
    ctx.dtype = rows.dtype


def _combine_on_the_fly_backward(ctx, grad_out):
    seed, streams, num_basis = ctx.basis_args
    return combine_on_the_fly_grad(grad_out.to(ctx.dtype).contiguous(), seed, streams, num_basis), None, None, None


combine_on_the_fly.register_autograd(_combine_on_the_fly_backward, setup_context=_combine_on_the_fly_setup)


@functools.lru_cache(maxsize=1024)
def _device_keys(seed: int, streams: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """The streams' keys on ``device`` for the fused kernels, made once (a host-to-device copy per step would
    synchronise the stream)."""
    return kernels.keys_tensor([stream_keys(seed, stream) for stream in streams], device)


def _no_autocast(like: torch.Tensor):
    """The basis combination runs in the coefficients' dtype: under autocast (AMP) only the adapter's products with
    the activations drop to bf16/fp16, not the sum over the k basis matrices."""
    return torch.autocast(like.device.type, enabled=False)


def basis_chunks(seed: int, stream: str, num_basis: int, numel: int, device, dtype):
    """``(start, basis[start:end])`` for consecutive rows of the ``(num_basis, numel)`` basis of ``stream``, a few MB
    at a time, generated on ``device`` and cast to ``dtype``."""
    step = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    for start in range(0, num_basis, step):
        end = min(num_basis, start + step)
        yield start, basis_rows(seed, stream, num_basis, numel, start, end, device=device).to(dtype)
