"""The fast path (all layers that share a basis combined in one product per forward) against the plain definition."""

import pytest
import torch
from peft import get_peft_model

from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, basis_rows
from peft_nola.tuners.nola.layer import SharedBasisCombiner, grads_times_basis, rows_times_basis

from .conftest import tiny_gpt2, tiny_llama

CONFIGS = {
    "gpt2-qv": (tiny_gpt2, dict(target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True)),
    "llama-all": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])),
}


def make(name, basis_mode="shared"):
    build, targets = CONFIGS[name]
    model = get_peft_model(build(), NolaConfig(r=4, num_basis_A=48, num_basis_B=40, init_weights=False,
                                                basis_mode=basis_mode, **targets))
    return model, [m for m in model.modules() if isinstance(m, NolaLayer)]


def per_layer_only(model):
    """Run the model with every layer combined on its own (the combiner never sees a forward begin)."""
    for handle in model.base_model._combiner_hooks:
        handle.remove()


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_products_do_not_depend_on_how_many_rows_are_stacked(rows):
    basis = basis_rows(0, "A/8x256", 200, 2048)
    coef = torch.randn(16, 200, generator=torch.Generator().manual_seed(0))
    grads = torch.randn(16, 2048, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rows_times_basis(coef, basis)[:rows], rows_times_basis(coef[:rows], basis))
    assert torch.equal(grads_times_basis(grads, basis)[3 : 3 + rows], grads_times_basis(grads[3 : 3 + rows], basis))
    reference = coef.double() @ basis.double()  # the definition, Σ_i coef_i · basis_i, in float64
    torch.testing.assert_close(rows_times_basis(coef, basis).double(), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grouped_factors_equal_per_layer_factors_exactly(name, basis_mode):
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
        down, up = layer._factors("default")  # outside a forward: this layer alone
        assert torch.equal(grouped[id(layer)][0], down) and torch.equal(grouped[id(layer)][1], up)
        # ... and both are the definition A = Σ α_i A_i for every block
        spec = layer.basis_spec["default"]
        for block, (alpha, stream) in enumerate(zip(layer.nola_coef_A["default"].detach().double(), spec.streams_A)):
            basis = basis_rows(spec.seed, stream, spec.num_basis_A, spec.numel_A).double()
            torch.testing.assert_close(down[block].double().flatten(), alpha @ basis, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_and_gradients_are_bit_identical_to_the_per_layer_path(name, basis_mode):
    ids = torch.randint(1, 90, (3, 7), generator=torch.Generator().manual_seed(2))
    results = []
    for grouped in (True, False):
        model, layers = make(name, basis_mode)
        if not grouped:
            per_layer_only(model)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = [torch.cat([layer.nola_coef_A["default"].grad.flatten(), layer.nola_coef_B["default"].grad.flatten()])
                 for layer in layers]
        results.append((out.logits.detach(), torch.cat(grads)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_one_product_per_basis_per_forward(monkeypatch):
    model, layers = make("llama-all")
    calls = []
    original = SharedBasisCombiner._combine
    monkeypatch.setattr(SharedBasisCombiner, "_combine",
                        lambda self, group, adapter: calls.append(len(group)) or original(self, group, adapter))
    with torch.no_grad():
        model(torch.randint(1, 90, (1, 4)))
    assert calls == [len(layers)]  # every layer of the adapter in one call
    bases = {key for key in model.base_model.nola_basis}
    # q/o (32x32), k/v (32->16), gate/up (32->64), down (64->32): 2 A-bases (cols 32, 64) + 3 B-bases (rows 32, 16, 64)
    assert len(bases) == 5


def test_gradient_checkpointing_recomputes_identically(tmp_path):
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model, layers = make("llama-all")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([layer.nola_coef_B["default"].grad.flatten() for layer in layers]))
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer_cached", "per_layer"])
def test_merging_all_layers_at_once_equals_each_layer_alone(basis_mode):
    """merge_adapter builds every ΔW in one product per basis; each must equal the layer's ΔW computed alone."""
    model, layers = make("llama-all", basis_mode)
    expected = {id(layer): layer.get_base_layer().weight.detach() + layer.get_delta_weight("default") for layer in layers}
    model.merge_adapter()
    for layer in layers:
        assert torch.equal(layer.get_base_layer().weight.detach(), expected[id(layer)])
