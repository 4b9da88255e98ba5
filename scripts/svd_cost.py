"""SVD time per layer on this machine and the error of the randomized variant on the kept directions.

    OMP_WAIT_POLICY=PASSIVE python scripts/svd_cost.py [--sizes 1024 4096] [--rank 16]

The test matrices have the slowly decaying spectrum of pretrained weights (σ_i ∝ i^-0.5, the hard case for
randomized methods). Errors, against float64 ``torch.linalg.svd``: the largest relative error of the kept singular
values, and the spectral norm of the difference of the projectors onto the kept left singular subspaces.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft_nola.svd import top_singular_triplets  # noqa: E402
from recipes.config import parse_script_args  # noqa: E402


def test_matrix(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return (U * torch.arange(1, n + 1, dtype=torch.float32) ** -0.5) @ V.T


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@dataclass
class Options:
    """python scripts/svd_cost.py options."""

    sizes: list[int] = field(default_factory=lambda: [1024, 4096], metadata={"help": (
        "Matrix sizes n (each test matrix is n x n).")})
    rank: int = field(default=16, metadata={"help": "Singular triplets kept (the SVD rank of NoRA's frozen factors)."})


def main(argv: list[str] | None = None) -> None:
    args = parse_script_args(Options, argv, "python scripts/svd_cost.py [--sizes N [N ...]] [--rank R]", __doc__)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| n x n | method | seconds | max rel. error of kept σ | projector error |\n|---|---|---|---|---|")
    for n in args.sizes:
        W = test_matrix(n)
        t_ref, (U, S, _) = timed(lambda: top_singular_triplets(W, args.rank, method="full"))
        reference = U @ U.T
        rows = [("torch.linalg.svd float64 (ours, 'full')", t_ref, S, U)]
        t, (Us, Ss, _) = timed(lambda: torch.linalg.svd(W, full_matrices=False))
        rows.append(("torch.linalg.svd float32", t, Ss[: args.rank].double(), Us[:, : args.rank].double()))
        for iters in (2, 4):
            t, (Ur, Sr, _) = timed(lambda: top_singular_triplets(W, args.rank, "randomized", power_iters=iters))
            rows.append((f"randomized float64 (ours), {iters} power iters", t, Sr, Ur))
        t, (Ul, Sl, _) = timed(lambda: torch.svd_lowrank(W, q=args.rank + 16, niter=4))
        rows.append(("torch.svd_lowrank float32, niter=4", t, Sl[: args.rank].double(), Ul[:, : args.rank].double()))
        for name, seconds, sigma, basis in rows:
            sigma_error = ((sigma - S).abs() / S).max().item()
            projector_error = torch.linalg.matrix_norm(basis @ basis.T - reference, ord=2).item()
            print(f"| {n} | {name} | {seconds:.2f} | {sigma_error:.1e} | {projector_error:.1e} |")


if __name__ == "__main__":
    main()
