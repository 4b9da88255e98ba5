"""Trainable biases (issue 23): a GPT-2 NOLA adapter trained with ``bias="all"`` or ``"nola_only"`` saves its biases;
every loader must load the file it saved with the trained biases (the reference: the outputs of the model that
saved it), and ``hotswap_adapter`` must refuse exactly what loading refuses."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_nola import GPT2_QV_SLICES, NolaConfig, hotswap_adapter
from tests.conftest import tiny_gpt2



def config(bias):
    return NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False, target_modules=["c_attn"],
                      output_slices=GPT2_QV_SLICES, bias=bias)


@pytest.fixture
def ids():
    return torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(4))


def trained(bias, tmp_path, seed=0):
    """A model whose biases and coefficients moved away from the base's (as training would), saved."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_gpt2(), config(bias)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    folder = tmp_path / f"{bias}-{seed}"
    model.save_pretrained(folder)
    return model, folder


def load(path, folder):
    if path == "pretrained":
        return PeftModel.from_pretrained(tiny_gpt2(), folder)
    if path == "load_adapter":
        model = get_peft_model(tiny_gpt2(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10,
                                                       target_modules=["c_attn"], output_slices=GPT2_QV_SLICES))
        model.load_adapter(folder, adapter_name="trained")
        model.set_adapter("trained")
        return model
    model = tiny_gpt2()
    model.load_adapter(str(folder))
    return model


@pytest.mark.parametrize("bias", ["all", "nola_only"])
@pytest.mark.parametrize("path", ["pretrained", "load_adapter", "transformers"])
def test_an_adapter_with_trained_biases_loads_back_through_every_loader(bias, path, ids, tmp_path):
    model, folder = trained(bias, tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
        got = load(path, folder).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "nola_only"])
def test_hotswap_refuses_exactly_what_loading_refuses(bias, ids, tmp_path):
    """Same directory, same outcome: loaded by both with the same outputs, or refused by both."""
    target, _ = trained(bias, tmp_path, seed=0)
    _, folder = trained(bias, tmp_path, seed=5)

    def outcome(action):
        try:
            model = action()
        except ValueError:
            return "refused", None
        with torch.no_grad():
            return "loaded", model.eval()(ids).logits

    def hotswapped():
        hotswap_adapter(target, str(folder))
        return target

    loaded, swapped = outcome(lambda: PeftModel.from_pretrained(tiny_gpt2(), folder)), outcome(hotswapped)
    assert loaded[0] == swapped[0], f"from_pretrained: {loaded[0]}, hotswap_adapter: {swapped[0]}"
    if loaded[0] == "loaded":
        torch.testing.assert_close(swapped[1], loaded[1], rtol=1e-5, atol=1e-5)
