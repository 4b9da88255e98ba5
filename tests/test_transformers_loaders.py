"""transformers' own adapter loaders (issue 23): ``model.load_adapter(dir)`` (``PeftAdapterMixin``) and
``AutoModelForCausalLM.from_pretrained(adapter_dir)`` must give the outcome ``PeftModel.from_pretrained`` gives for
the same directory (the reference): a refusal that leaves the model as it was, or the same outputs."""

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_nola import NolaConfig, quantize_coefficients
from tests.conftest import tiny_llama
from tests.hostile import UNCHECKED, add_tensor, coef, scale_coefficients, tensors_edit, then


def nan_coefficient(tensors):
    key = coef(tensors)
    tensors[key][0, 0] = math.nan


MUTATIONS = {
    "coefficients-x10-stale-checksum": tensors_edit(scale_coefficients),
    "added-lm-head-checks-removed": then(tensors_edit(add_tensor("base_model.model.lm_head.weight", (96, 32))),
                                         UNCHECKED),
    "nan-coefficient-checks-removed": then(tensors_edit(nan_coefficient), UNCHECKED),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved tiny LLaMA base, a NOLA adapter of it and a 4-bit quantized one (both name the base's folder)."""
    root = tmp_path_factory.mktemp("loaders")
    tiny_llama().save_pretrained(root / "base")
    made = {"base": root / "base"}
    for name, bits in (("nola", None), ("quant", 4)):
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        torch.manual_seed(0)
        model = get_peft_model(base, NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
        if bits:
            quantize_coefficients(model, bits=bits)
        model.save_pretrained(root / name)
        made[name] = root / name
    return made


@pytest.fixture
def ids():
    return torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(3))


def mutated_copy(source, tmp_path, mutation):
    import shutil

    target = tmp_path / "mutated"
    shutil.copytree(source, target)
    mutation(target)
    return target


def load_through(loader: str, folder, base_dir):
    """The model transformers' loader gives for ``folder`` (for ``load_adapter``: the base it was called on)."""
    if loader == "load_adapter":
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model.load_adapter(str(folder))
        return model
    return AutoModelForCausalLM.from_pretrained(folder)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("loader", ["load_adapter", "auto"])
def test_a_valid_adapter_gives_peft_outputs(dirs, ids, loader):
    reference = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"]), dirs["nola"]), ids)
    torch.testing.assert_close(logits(load_through(loader, dirs["nola"], dirs["base"]), ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["load_adapter", "auto"])
def test_a_quantized_adapter_loads_with_peft_outputs(dirs, ids, loader):
    base = AutoModelForCausalLM.from_pretrained(dirs["base"])
    reference = logits(PeftModel.from_pretrained(base, dirs["quant"]), ids)
    got = logits(load_through(loader, dirs["quant"], dirs["base"]), ids)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["load_adapter", "auto"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_what_peft_refuses_transformers_refuses_and_the_model_is_unchanged(dirs, ids, tmp_path, loader, mutation):
    folder = mutated_copy(dirs["nola"], tmp_path, MUTATIONS[mutation])
    with pytest.raises(ValueError):  # the reference: peft-nola's refusal on peft's loader
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"]), folder)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(dirs["base"]), ids)
    if loader == "load_adapter":
        model = AutoModelForCausalLM.from_pretrained(dirs["base"])
        with pytest.raises(ValueError):
            model.load_adapter(str(folder))
        # Refused before the model changed: no adapter layer, the base's own outputs (its head untouched).
        assert not getattr(model, "_hf_peft_config_loaded", False)
        torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError):
            AutoModelForCausalLM.from_pretrained(folder)
