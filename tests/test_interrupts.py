"""An interrupted forward (issue 23): a ``KeyboardInterrupt`` (Ctrl-C during ``generate`` in a notebook) raised inside
a forward must leave no per-forward state behind. Afterwards every forward computes with the adapter's current
tensors: compared with a reference model rebuilt from the saved coefficients (``PeftModel.from_pretrained`` onto a
fresh base), after a hotswap, an in-place edit and training steps."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_nola import NolaConfig, NoraConfig, hotswap_adapter
from tests.conftest import tiny_llama

CONFIGS = {
    "nola-shared": lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                      target_modules=["q_proj", "v_proj"]),
    "nola-per-layer": lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                         target_modules=["q_proj", "v_proj"], basis_mode="per_layer"),
    "nora": lambda: NoraConfig(r=4, inner_r=2, init_weights=False, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture
def ids():
    return torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(5))


def interrupt_one_forward(model, ids, grad: bool = True):
    """Run a forward that is interrupted inside the second decoder layer, as Ctrl-C would, then (``grad`` False) one
    that completes, as the user's next cell would."""
    layer = model.base_model.model.model.layers[1].self_attn.v_proj

    def ctrl_c(*_):
        raise KeyboardInterrupt

    handle = layer.register_forward_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt), torch.set_grad_enabled(grad):
            model(ids)
    finally:
        handle.remove()
    if not grad:
        with torch.no_grad():
            model(ids)


def reference_logits(model, folder, ids):
    """Outputs of a fresh base with the adapter's current tensors, saved and loaded back."""
    model.save_pretrained(folder)
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), folder)(ids).logits


def edit_trainables(model, factor: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.mul_(factor)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_after_an_interrupt_an_in_place_edit_is_used(kind, ids, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[kind]())
    model.eval()
    interrupt_one_forward(model, ids, grad=False)
    edit_trainables(model, 3.0)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, reference_logits(model, tmp_path / "ref", ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_after_an_interrupt_a_hotswapped_adapter_is_used(kind, ids, tmp_path):
    torch.manual_seed(1)
    other = get_peft_model(tiny_llama(), CONFIGS[kind]())
    edit_trainables(other, -2.0)
    other.save_pretrained(tmp_path / "other")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), tmp_path / "other")(ids).logits
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[kind]())
    model.eval()
    interrupt_one_forward(model, ids, grad=False)
    hotswap_adapter(model, str(tmp_path / "other"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_after_an_interrupt_training_still_learns(kind, ids, tmp_path):
    """Each optimizer step must change the loss as the reference (the same coefficients, reloaded) computes it."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[kind]())
    model.train()
    interrupt_one_forward(model, ids)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_now = model(ids, labels=ids).loss.item()
    model.save_pretrained(tmp_path / "ref")
    reference = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ref")
    with torch.no_grad():
        reference_loss = reference(ids, labels=ids).loss.item()
    assert loss_now == pytest.approx(reference_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["nola-shared", "nola-per-layer"])
def test_after_an_interrupt_a_model_without_peft_model_uses_edits(kind, ids):
    """``inject_adapter_in_model`` (as transformers' ``load_adapter``) leaves no PeftModel around the forward: the
    state of the interrupted forward must not reach ``get_delta_weight`` (no forward between) nor the next forward.
    Reference: the same adapter, edited the same way, in a PeftModel that was never interrupted."""
    from peft import inject_adapter_in_model

    from peft_nola.tuners.lowrank import LowRankLayer

    torch.manual_seed(0)
    bare = inject_adapter_in_model(CONFIGS[kind](), tiny_llama()).eval()
    torch.manual_seed(0)
    clean = get_peft_model(tiny_llama(), CONFIGS[kind]()).eval()
    layer = bare.model.layers[1].self_attn.v_proj

    def ctrl_c(*_):
        raise KeyboardInterrupt

    handle = layer.register_forward_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            bare(ids)
    finally:
        handle.remove()
    for model in (bare, clean):
        _edit_coefficients(model, 3.0)
    layers = [(m.module_key, m) for m in bare.modules() if isinstance(m, LowRankLayer)]
    clean_layers = {m.module_key: m for m in clean.modules() if isinstance(m, LowRankLayer)}
    for key, bare_layer in layers:
        torch.testing.assert_close(bare_layer.get_delta_weight("default"),
                                   clean_layers[key].get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(bare(ids).logits, clean(ids).logits, rtol=1e-5, atol=1e-5)


def _edit_coefficients(model, factor: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "nola_coef" in name:
                p.mul_(factor)
