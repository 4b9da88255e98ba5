"""Top singular triplets of a weight matrix, computed the same way every time (NoRA's frozen outer factors).

* Always in float64, whatever the weight's dtype: the factors are recomputed from the base weights when an adapter is
  loaded, so they must not depend on the precision the model happens to be loaded in.
* Sign convention: each pair ``(u_i, v_i)`` is flipped so that the entry of ``u_i`` with the largest magnitude is
  positive (the first such entry on ties). An SVD is unique only up to these signs; the convention makes it unique
  for distinct singular values.
* ``method="auto"`` (the default) is exact where that is cheap and randomized where it is not: exact when the
  smaller side is at most ``AUTO_EXACT_MAX`` (2048), else randomized (the cost and accuracy measured by
  ``scripts/svd_cost.py`` are in the README's NoRA section).
* ``method="randomized"`` is a range-finder SVD (Halko, Martinsson & Tropp 2011) whose random test matrix comes from
  :mod:`peft_nola.basis`, not from torch's global RNG, so it is a deterministic function of the matrix and the seed.
"""

from __future__ import annotations

import math

import torch

from .basis import uniform_stream

SVD_METHODS = ("auto", "full", "randomized")
AUTO_EXACT_MAX = 2048


def top_singular_triplets(
    matrix: torch.Tensor, rank: int, method: str = "auto", oversample: int = 16, power_iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular values of ``matrix (m, n)`` and their vectors.

    Returns:
        ``U (m, rank)``, ``S (rank,)`` descending, ``V (n, rank)``, all float64, with ``matrix ≈ U diag(S) Vᵀ`` on the
        kept directions and the sign convention of the module docstring.
    """
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in 1..{min(m, n)} for a {m}x{n} matrix, got {rank}")
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    matrix = matrix.detach().to(torch.float64)
    if method == "auto":
        method = "full" if min(m, n) <= AUTO_EXACT_MAX else "randomized"
    if method == "full" or rank + oversample >= min(m, n):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:
        U, S, V = _randomized_svd(matrix, rank, oversample, power_iters, seed)
    return _fix_signs(U, S, V)


def _randomized_svd(matrix, rank, oversample, power_iters, seed):
    m, n = matrix.shape
    width = rank + oversample
    test = uniform_stream(seed, f"svd-test/{m}x{n}x{width}", 0, n * width, device=matrix.device)
    sketch = matrix @ (test.to(torch.float64).view(n, width) * math.sqrt(3))
    basis, _ = torch.linalg.qr(sketch)
    for _ in range(power_iters):  # subspace iteration, re-orthonormalised each half step for stability
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    small_U, S, Vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ small_U)[:, :rank], S[:rank], Vh[:rank].T


def _fix_signs(U, S, V):
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, S, V * signs


def _probes(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = uniform_stream(0, f"fingerprint/{name}/rows", 0, weight.shape[0], device=weight.device).to(torch.float64)
    q = uniform_stream(0, f"fingerprint/{name}/cols", 0, weight.shape[1], device=weight.device).to(torch.float64)
    return p, q


def weight_fingerprint(weights: dict[str, torch.Tensor]) -> list[float]:
    """Two numbers that identify a set of named weight matrices: ``Σ ‖W‖²_F`` and ``Σ pᵀ W q`` with probe vectors
    ``p, q`` seeded by the name. Computed in float64; compare with a relative tolerance (BLAS summation order differs
    between machines), which still tells a different base model apart by many orders of magnitude."""
    total_norm, total_probe = 0.0, 0.0
    for name, weight in sorted(weights.items()):
        w = weight.detach().to(torch.float64)
        p, q = _probes(name, w)
        total_norm += float(w.pow(2).sum())
        total_probe += float(p @ w @ q)
    return [total_norm, total_probe]


def rounding_tolerance(weights: dict[str, torch.Tensor], unit_roundoff: float) -> list[float]:
    """How far :func:`weight_fingerprint` of ``weights`` can be from the fingerprint of the weights they were rounded
    from, when each entry carries a relative rounding error of at most ``unit_roundoff`` (a cast to bfloat16 or
    float16): ``|Δ‖W‖²| <= (2u + u²)/(1 - u)² · ‖W‖²`` and ``|Δ pᵀWq| <= u/(1 - u) · |p|ᵀ|W||q|``, bounds that hold
    for every entry's rounding at once."""
    u = unit_roundoff
    norm, probe = 0.0, 0.0
    for name, weight in sorted(weights.items()):
        w = weight.detach().to(torch.float64)
        p, q = _probes(name, w)
        norm += float(w.pow(2).sum())
        probe += float(p.abs() @ w.abs() @ q.abs())
    return [(2 * u + u * u) / (1 - u) ** 2 * norm, u / (1 - u) * probe]
