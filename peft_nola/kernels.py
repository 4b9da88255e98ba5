"""Triton kernels for the seeded basis on CUDA: generating it, and combining it with coefficients without storing it.

The on-the-fly per-layer basis (``basis_mode="per_layer"``) needs ``coef @ basis`` in forward and ``grad @ basis.T``
in backward, with a ``(num_basis, numel)`` basis per stream that is a pure function of each element's index
(:mod:`peft_nola.basis`). With torch ops that means writing the basis to memory chunk by chunk, ~40 elementwise kernels
per chunk, and reading it back. :func:`combine` and :func:`combine_grad` instead generate each tile of the basis in
registers and multiply it into the coefficients (or gradients) at once: the basis never touches memory, and all the
streams of one step go through one launch. :func:`uniform` generates a stream into memory in one kernel (building a
stored basis).

Every generated value is bit-identical to :func:`peft_nola.basis.basis_rows`; the sums over the basis are accumulated
in float32 in another order than a BLAS product, so they agree with it to rounding. ``tests/test_kernels.py`` checks
both; without a GPU the tests run these kernels in Triton's interpreter (``TRITON_INTERPRET=1``).

Callers use the kernels only for CUDA tensors and when Triton is installed (:func:`available`); everything else takes
the torch path, which gives the same values. ``PEFT_NOLA_DISABLE_TRITON=1`` turns the kernels off (to compare, or
to work around a Triton build that fails to compile them).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with CUDA builds of torch on Linux; CPU-only installs go without it
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernels serve ``device``: CUDA, with Triton installed, unless ``PEFT_NOLA_DISABLE_TRITON=1``."""
    return triton is not None and device.type == "cuda" and os.environ.get("PEFT_NOLA_DISABLE_TRITON") != "1"


if triton is not None:

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32: multiplication wraps mod 2**32 and shifts are logical, as in peft_nola.basis.
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B  # a literal in [2**31, 2**32) is uint32 in Triton
        x ^= x >> 16
        return x

    @triton.jit
    def _uniform_values(index, key0, key1, key2):
        """The stream's values at int64 ``index`` (any shape): float32, uniform on (-1, 1), before the basis scale."""
        h = (index & 0xFFFFFFFF).to(tl.uint32) ^ key0
        h = _mix32(h)
        h ^= (((index >> 32) + key1.to(tl.int64)) & 0xFFFFFFFF).to(tl.uint32)
        h = _mix32(h)
        h = _mix32(h ^ key2)
        # (2u + 1 - 2**24) * 2**-24 for the top 24 bits u, as u * 2**-23 + (2**-24 - 1): both steps exact in float32.
        return (h >> 8).to(tl.float32) * 1.1920928955078125e-07 - 0.999999940395355224609375

    @triton.jit
    def _keys(keys_ptr, stream):
        base = keys_ptr + stream * 3
        return tl.load(base).to(tl.uint32), tl.load(base + 1).to(tl.uint32), tl.load(base + 2).to(tl.uint32)

    @triton.jit
    def _uniform_kernel(out_ptr, start, count, key0, key1, key2, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        values = _uniform_values(start + offsets, key0.to(tl.uint32), key1.to(tl.uint32), key2.to(tl.uint32))
        tl.store(out_ptr + offsets, values, mask=offsets < count)

    @triton.jit
    def _combine_kernel(coef_ptr, keys_ptr, out_ptr, numel, scale,
                        NUM_BASIS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # out[s, j] = Σ_i coef[s, i] · basis_s[i, j]: one program per (stream s, block of columns j).
        stream = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        key0, key1, key2 = _keys(keys_ptr, stream)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, NUM_BASIS, BLOCK_K):
            rows = start + tl.arange(0, BLOCK_K).to(tl.int64)
            coef = tl.load(coef_ptr + stream * NUM_BASIS + rows, mask=rows < NUM_BASIS, other=0.0).to(tl.float32)
            basis = _uniform_values(rows[:, None] * numel + cols[None, :], key0, key1, key2) * scale
            basis = basis.to(coef_ptr.dtype.element_ty).to(tl.float32)  # the basis in the coefficients' dtype
            acc += tl.sum(coef[:, None] * basis, axis=0)
        tl.store(out_ptr + stream * numel + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < numel)

    @triton.jit
    def _combine_grad_kernel(grad_ptr, keys_ptr, partial_ptr, numel, scale, NUM_BASIS: tl.constexpr,
                             COLS_PER_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # partial[s, split, i] = Σ_{j in split} basis_s[i, j] · grad[s, j]: one program per (stream, block of rows,
        # split of the columns); the splits are summed afterwards (deterministic, unlike atomics).
        stream = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        split = tl.program_id(2).to(tl.int64)
        key0, key1, key2 = _keys(keys_ptr, stream)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, COLS_PER_SPLIT, BLOCK_N):
            cols = split * COLS_PER_SPLIT + start + tl.arange(0, BLOCK_N).to(tl.int64)
            grad = tl.load(grad_ptr + stream * numel + cols, mask=cols < numel, other=0.0).to(tl.float32)
            basis = _uniform_values(rows[:, None] * numel + cols[None, :], key0, key1, key2) * scale
            basis = basis.to(grad_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.sum(basis * grad[None, :], axis=1)
        tl.store(partial_ptr + (stream * tl.num_programs(2) + split) * NUM_BASIS + rows, acc, mask=rows < NUM_BASIS)


# Loop bounds (the basis size, the columns per split) are compile-time constants: one compilation per basis shape,
# and Triton's interpreter needs them so.
_BLOCK = 1024
_BLOCK_K = 32
_BLOCK_N = 128
_TARGET_PROGRAMS = 2048  # enough to fill a GPU's multiprocessors several times over


def keys_tensor(keys: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """The streams' 32-bit keys as the ``(num_streams, 3)`` int64 tensor the combine kernels read."""
    return torch.tensor(keys, dtype=torch.int64, device=device)


def uniform(keys: tuple[int, int, int], start: int, count: int, device: torch.device) -> torch.Tensor:
    """:func:`peft_nola.basis.uniform_stream` in one kernel: elements ``start .. start + count - 1``, float32."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        _uniform_kernel[(triton.cdiv(count, _BLOCK),)](out, start, count, *keys, BLOCK=_BLOCK)
    return out


def combine(coef: torch.Tensor, keys: torch.Tensor, numel: int, scale: float) -> torch.Tensor:
    """``out[s] = coef[s] @ basis_s`` for ``coef (S, num_basis)`` and the streams' keys ``(S, 3)``: ``(S, numel)``."""
    coef = coef.contiguous()
    streams, num_basis = coef.shape
    out = torch.empty(streams, numel, dtype=coef.dtype, device=coef.device)
    grid = (streams, triton.cdiv(numel, _BLOCK_N))
    _combine_kernel[grid](coef, keys, out, numel, scale, NUM_BASIS=num_basis, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N)
    return out


def combine_grad(grad: torch.Tensor, keys: torch.Tensor, num_basis: int, scale: float) -> torch.Tensor:
    """``out[s] = basis_s @ grad[s]`` for ``grad (S, numel)``: the coefficients' gradient, ``(S, num_basis)``."""
    grad = grad.contiguous()
    streams, numel = grad.shape
    row_blocks, col_blocks = triton.cdiv(num_basis, _BLOCK_K), triton.cdiv(numel, _BLOCK_N)
    splits = max(1, min(col_blocks, triton.cdiv(_TARGET_PROGRAMS, streams * row_blocks)))
    cols_per_split = triton.cdiv(col_blocks, splits) * _BLOCK_N
    splits = triton.cdiv(numel, cols_per_split)
    partial = torch.empty(streams, splits, num_basis, dtype=torch.float32, device=grad.device)
    _combine_grad_kernel[(streams, row_blocks, splits)](
        grad, keys, partial, numel, scale,
        NUM_BASIS=num_basis, COLS_PER_SPLIT=cols_per_split, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N,
    )
    return partial.sum(1).to(grad.dtype)
