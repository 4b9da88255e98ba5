"""The fast path (all layers that share a basis combined in one product per forward) against the plain definition.

The fast path and the per-layer path form the same sums, but whether BLAS adds them in the same order for one row as
for several depends on the CPU's GEMM kernel. So nothing here asks the two paths to agree bit for bit: each is held
to the float64 definition, within the rounding bound any float32 summation order satisfies (the README's
"Exactness").
"""

import pytest
import torch
from peft import get_peft_model

from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, basis_rows
from peft_nola.tuners.nola.layer import SharedBasisCombiner, _BasisCombination, nola_factors

from .conftest import tiny_gpt2, tiny_llama

CONFIGS = {
    "gpt2-qv": (tiny_gpt2, dict(target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True)),
    "llama-all": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])),
}
UNIT_ROUNDOFF = 2.0**-24  # float32


def assert_within_dot_bound(computed, left, right):
    """``computed`` is ``left @ right`` (float64 operands, float32-representable) up to float32 rounding:
    ``|computed - exact| <= γ_k · (|left| @ |right|)`` with ``γ_k = k·u / (1 - k·u)``, the bound every order of
    summation (and FMA) satisfies for a length-``k`` dot product."""
    k = left.shape[-1]
    gamma = k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)
    exact = left @ right
    error = (computed.double() - exact).abs()
    bound = gamma * (left.abs() @ right.abs()) + 1e-30
    assert bool((error <= bound).all()), f"max error/bound {(error / bound).max().item():.3g} > 1"


def make(name, basis_mode="shared"):
    build, targets = CONFIGS[name]
    model = get_peft_model(build(), NolaConfig(r=4, num_basis_A=48, num_basis_B=40, init_weights=False,
                                                basis_mode=basis_mode, **targets))
    return model, [m for m in model.modules() if isinstance(m, NolaLayer)]


def per_layer_only(model):
    """Run the model with every layer combined on its own (the combiner never sees a forward begin)."""
    for handle in model.base_model._combiner_hooks:
        handle.remove()


def test_the_bound_catches_an_error_of_a_few_ulps():
    # The check can fail: a product off by 8 ulps in one entry is outside the bound for k = 4.
    left, right = torch.rand(2, 4, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    computed = (left @ right).float().double()
    assert_within_dot_bound(computed, left, right)
    computed[1, 2] *= 1 + 8 * 2 * UNIT_ROUNDOFF
    with pytest.raises(AssertionError, match="error/bound"):
        assert_within_dot_bound(computed, left, right)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16])
def test_combination_and_its_gradient_are_the_definition_for_any_number_of_stacked_rows(rows):
    basis = basis_rows(0, "A/8x256", 200, 2048)
    coef = torch.randn(rows, 200, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grads = torch.randn(rows, 2048, generator=torch.Generator().manual_seed(1))
    combined = _BasisCombination.apply(coef, basis)
    combined.backward(grads)
    assert_within_dot_bound(combined, coef.detach().double(), basis.double())  # Σ_i coef_i · basis_i
    assert_within_dot_bound(coef.grad, grads.double(), basis.double().T)  # d/dcoef_i = <grad, basis_i>


def test_the_reference_function_is_the_papers_sum_of_basis_matrices():
    # A = Σ_i α_i A_i with each A_i an (r, cols) matrix, B = Σ_j β_j B_j with each B_j (rows, r), written as loops.
    k, l, r, rows, cols = 5, 4, 3, 7, 6
    alpha, beta = torch.randn(k, dtype=torch.float64), torch.randn(l, dtype=torch.float64)
    mats_A, mats_B = torch.randn(k, r, cols, dtype=torch.float64), torch.randn(l, rows, r, dtype=torch.float64)
    A = sum(alpha[i] * mats_A[i] for i in range(k))
    B = sum(beta[j] * mats_B[j] for j in range(l))
    down, up = nola_factors(alpha, beta, mats_A.reshape(k, -1), mats_B.reshape(l, -1), r)
    torch.testing.assert_close(down, A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(up, B, rtol=1e-12, atol=1e-12)


def definition_factors(layer):
    """Every block's ``A = Σ α_i A_i`` and ``B = Σ β_j B_j`` from the float64 basis, with the operands."""
    spec = layer.basis_spec["default"]
    for coefs, streams, num_basis, numel in ((layer.nola_coef_A["default"], spec.streams_A, spec.num_basis_A,
                                               spec.numel_A),
                                              (layer.nola_coef_B["default"], spec.streams_B, spec.num_basis_B,
                                               spec.numel_B)):
        for coef, stream in zip(coefs.detach().double(), streams):
            yield coef, basis_rows(spec.seed, stream, num_basis, numel).double()


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grouped_and_per_layer_factors_are_the_definition(name, basis_mode):
    # shared: one product per basis for all layers; per_layer (on the fly): one combination for every stream
    model, layers = make(name, basis_mode)
    grouped = {}

    def record(layer, args):  # runs inside the model's forward, where the grouped path is active
        grouped.setdefault(id(layer), layer._factors("default"))

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    with torch.no_grad():
        model(torch.randint(1, 90, (2, 5)))
    for hook in hooks:
        hook.remove()
    assert len(grouped) == len(layers)
    for layer in layers:
        alone = layer._factors("default")  # outside a forward: this layer alone
        for factors in (grouped[id(layer)], alone):
            blocks = [block.flatten() for factor in factors for block in factor]
            operands = list(definition_factors(layer))
            assert len(blocks) == len(operands)
            for block, (coef, basis) in zip(blocks, operands):
                assert_within_dot_bound(block, coef, basis)


def coefficient_grads(layers):
    return torch.cat([torch.cat([layer.nola_coef_A["default"].grad.flatten(), layer.nola_coef_B["default"].grad.flatten()])
                      for layer in layers])


def assert_close_to_float64(result, reference):
    """float32 results of a whole forward/backward against the float64 run of the same model."""
    torch.testing.assert_close(result.double(), reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grouped_and_per_layer_outputs_and_gradients_are_the_float64_models(name, basis_mode):
    ids = torch.randint(1, 90, (3, 7), generator=torch.Generator().manual_seed(2))
    results = {}
    for path in ("grouped", "per layer", "float64"):
        model, layers = make(name, basis_mode)
        if path == "per layer":
            per_layer_only(model)
        if path == "float64":
            model.double()
        out = model(ids, labels=ids)
        out.loss.backward()
        results[path] = (out.logits.detach(), coefficient_grads(layers))
    logits64, grads64 = results["float64"]
    assert grads64.abs().max() > 0
    for path in ("grouped", "per layer"):
        assert_close_to_float64(results[path][0], logits64)
        assert_close_to_float64(results[path][1], grads64)


def test_one_product_per_basis_per_forward(monkeypatch):
    model, layers = make("llama-all")
    calls = []
    original = SharedBasisCombiner._combine
    monkeypatch.setattr(SharedBasisCombiner, "_combine",
                        lambda self, pairs: calls.append(len(pairs)) or original(self, pairs))
    with torch.no_grad():
        model(torch.randint(1, 90, (1, 4)))
    assert calls == [len(layers)]  # every layer of the adapter in one call
    bases = {key for key in model.base_model.nola_basis}
    # q/o (32x32), k/v (32->16), gate/up (32->64), down (64->32): 2 A-bases (cols 32, 64) + 3 B-bases (rows 32, 16, 64)
    assert len(bases) == 5


def test_gradient_checkpointing_recomputes_the_same_gradients(tmp_path):
    # With checkpointing, each layer's factors are recomputed alone during backward (outside the grouped forward).
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    grads = {}
    for run in ("float64", "plain", "checkpointing"):
        model, layers = make("llama-all")
        model.train()
        if run == "float64":
            model.double()
        if run == "checkpointing":
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model(ids, labels=ids).loss.backward()
        grads[run] = coefficient_grads(layers)
    assert grads["float64"].abs().max() > 0
    assert_close_to_float64(grads["plain"], grads["float64"])
    assert_close_to_float64(grads["checkpointing"], grads["float64"])


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer_cached", "per_layer"])
def test_merging_all_layers_at_once_gives_each_layers_definition(basis_mode):
    """merge_adapter builds every ΔW in one product per basis; each must be the layer's ΔW = scale · B A."""
    model, layers = make("llama-all", basis_mode)
    before = {id(layer): layer.get_base_layer().weight.detach().double() for layer in layers}
    model.merge_adapter()
    for layer in layers:
        (coef_A, basis_A), (coef_B, basis_B) = definition_factors(layer)  # one block per layer here
        down, up = nola_factors(coef_A, coef_B, basis_A, basis_B, layer.basis_spec["default"].r)
        delta = layer.scaling["default"] * up @ down
        merged = layer.get_base_layer().weight.detach().double()
        # float32 rounding of the factors (bound above), their product and the sum with the weight
        torch.testing.assert_close(merged, before[id(layer)] + delta, rtol=1e-5, atol=1e-6)
