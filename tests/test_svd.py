"""NoRA's SVD helper: exactness against numpy, the sign convention, dtype independence, the randomized variant."""

import numpy as np
import pytest
import torch

from peft_nola.svd import top_singular_triplets, weight_fingerprint


def random_matrix(m, n, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    return (U[:, :k] * decay ** torch.arange(k, dtype=torch.float64)) @ V[:, :k].T


def test_full_svd_matches_numpy_best_rank_r_approximation():
    W = torch.randn(40, 25, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, S, V = top_singular_triplets(W, 6)
    u, s, vh = np.linalg.svd(W.numpy())
    np.testing.assert_allclose(S.numpy(), s[:6], rtol=1e-12)
    np.testing.assert_allclose((U * S @ V.T).numpy(), (u[:, :6] * s[:6]) @ vh[:6], atol=1e-12)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_sign_convention_and_dtype_independence():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    U, S, V = top_singular_triplets(W, 5)
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()
    # The computation is float64 whatever the input dtype: the same values give the same factors, bit for bit.
    U2, S2, V2 = top_singular_triplets(W.double(), 5)
    assert torch.equal(U2, U) and torch.equal(S2, S) and torch.equal(V2, V)
    # -W has the same singular values; the convention keeps U's signs, so V flips.
    U3, S3, V3 = top_singular_triplets(-W, 5)
    assert torch.allclose(U3, U, atol=1e-12) and torch.allclose(V3, -V, atol=1e-12)


def test_randomized_svd_is_seeded_and_accurate_on_decaying_spectra():
    W = random_matrix(300, 200, decay=0.7)
    U, S, V = top_singular_triplets(W, 8)
    Ur, Sr, Vr = top_singular_triplets(W, 8, method="randomized")
    torch.testing.assert_close(Sr, S, rtol=1e-10, atol=0)
    torch.testing.assert_close(Ur @ Ur.T, U @ U.T, atol=1e-9, rtol=0)
    again = top_singular_triplets(W, 8, method="randomized")
    assert torch.equal(again[0], Ur)


def test_rank_and_method_errors():
    with pytest.raises(ValueError, match="rank must be in 1..4 for a 4x9 matrix, got 5"):
        top_singular_triplets(torch.ones(4, 9), 5)
    with pytest.raises(ValueError, match="svd method must be one of"):
        top_singular_triplets(torch.ones(4, 9), 2, method="lanczos")


def test_weight_fingerprint_tells_models_apart():
    a = {"x": random_matrix(20, 10, 0.9, seed=0), "y": random_matrix(10, 10, 0.9, seed=1)}
    b = {"x": a["x"] + 1e-4, "y": a["y"]}
    fa, fb = weight_fingerprint(a), weight_fingerprint(b)
    assert fa == weight_fingerprint({k: v.clone() for k, v in reversed(list(a.items()))})
    assert abs(fa[0] - sum(float(w.pow(2).sum()) for w in a.values())) < 1e-12
    assert abs(fa[1] - fb[1]) > 1e-6 * abs(fa[1])
