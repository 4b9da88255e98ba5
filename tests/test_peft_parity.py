"""Behaviour peft's LoRA defines, checked against peft's LoRA itself (the reference) on the same tiny models."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_nola import GPT2_QV_SLICES, NolaConfig, NoraConfig

from .conftest import tiny_gpt2

QV = dict(target_modules=["c_attn"], fan_in_fan_out=True)
CONFIGS = {
    "lora": lambda: LoraConfig(r=2, init_lora_weights=False, **QV),
    "nola": lambda: NolaConfig(r=2, num_basis_A=8, num_basis_B=8, init_weights=False, output_slices=GPT2_QV_SLICES,
                               **QV),
    "nora": lambda: NoraConfig(r=4, inner_r=2, init_weights=False, **QV),
}


def two_adapters(method):
    model = get_peft_model(tiny_gpt2(), CONFIGS[method](), adapter_name="one")
    model.add_adapter("two", CONFIGS[method]())
    return model.eval()


def raised(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("method", ["nola", "nora"])
@pytest.mark.parametrize("names", [["one", "two"], ["one", "two", "__base__", "one"]], ids=["shorter", "longer"])
def test_adapter_names_of_another_length_than_the_batch_raise_as_lora_does(method, names, token_ids):
    # Before: a shorter list silently gave the rows past it the base model's output; a longer one an IndexError.
    expected = raised(lambda: two_adapters("lora")(token_ids, adapter_names=names))
    assert expected.startswith("Length of `adapter_names` should be the same as the number of inputs")
    assert raised(lambda: two_adapters(method)(token_ids, adapter_names=names)) == expected
    with torch.no_grad():
        assert raised(lambda: two_adapters(method).generate(input_ids=token_ids, adapter_names=names,
                                                            max_new_tokens=2, do_sample=False)) == expected


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_mixed_batch_error_texts_are_loras(method, token_ids):
    names = ["one", "three", "two"]
    lora, model = two_adapters("lora"), two_adapters(method)
    assert raised(lambda: model(token_ids, adapter_names=names)).startswith(
        raised(lambda: lora(token_ids, adapter_names=names)))
    names = ["one", "two", "one"]
    for m in (lora, model):
        m.merge_adapter(["one"])
    assert raised(lambda: model(token_ids, adapter_names=names)) == raised(lambda: lora(token_ids, adapter_names=names))


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_layers_expose_in_and_out_features_as_lora_layers_do(method):
    # Before: NOLA and NoRA layers had neither attribute.
    from .conftest import TinyCNN, seeded, tiny_llama

    cases = [
        (tiny_gpt2, ["c_attn", "c_proj"], {}),  # Conv1D (fan_in_fan_out)
        (tiny_llama, ["q_proj", "down_proj"], {}),  # nn.Linear
        (lambda: seeded(TinyCNN), ["conv0"], {}),  # nn.Conv2d
    ]
    for build, targets, _ in cases:
        extra = dict(fan_in_fan_out=True) if build is tiny_gpt2 else {}
        lora = get_peft_model(build(), LoraConfig(r=2, target_modules=targets, **extra))
        config = (NolaConfig(r=2, num_basis_A=8, num_basis_B=8, target_modules=targets, **extra) if method == "nola"
                  else NoraConfig(r=2, inner_r=1, target_modules=targets, **extra))
        ours = get_peft_model(build(), config)
        expected = {name: (m.in_features, m.out_features) for name, m in lora.named_modules() if hasattr(m, "lora_A")}
        got = {name: (m.in_features, m.out_features) for name, m in ours.named_modules()
               if hasattr(m, "scaling") and hasattr(m, "base_layer")}
        assert got == expected and expected


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_a_string_default_target_modules_is_one_regex_as_for_lora(method, monkeypatch):
    # A string is a regex matched against the full module name (peft's rule). Before: split into its characters.
    from peft.tuners.lora import LoraModel

    from peft_nola import NolaModel, NoraModel

    for tuner in (LoraModel, NolaModel, NoraModel):
        monkeypatch.setitem(tuner.target_module_mapping, "gpt2", r".*\.c_attn")
    kwargs = dict(fan_in_fan_out=True, init_weights=True)
    config = (NolaConfig(r=2, num_basis_A=8, num_basis_B=8, **kwargs) if method == "nola"
              else NoraConfig(r=2, inner_r=1, **kwargs))
    adapted = lambda model: sorted(n for n, m in model.named_modules() if hasattr(m, "base_layer"))  # noqa: E731
    lora = get_peft_model(tiny_gpt2(), LoraConfig(r=2, fan_in_fan_out=True))
    assert adapted(get_peft_model(tiny_gpt2(), config)) == adapted(lora) != []


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_missing_target_modules_for_an_unknown_model_type_is_peft_s_error(method):
    # peft's wording for tuners that adapt modules only (LoRA's adds "or `target_parameters`", which LoRA alone has)
    from peft import VeraConfig

    from .conftest import TinyMLP, seeded

    expected = raised(lambda: get_peft_model(seeded(TinyMLP), VeraConfig(r=2)))
    assert expected == "Please specify `target_modules` in `peft_config`"
    config = NolaConfig(r=2, num_basis_A=8, num_basis_B=8) if method == "nola" else NoraConfig(r=2, inner_r=1)
    assert raised(lambda: get_peft_model(seeded(TinyMLP), config)) == expected


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_pickle_saves_are_refused_before_any_weights_file_is_written(method, tmp_path):
    # Before: save_pretrained(safe_serialization=False) wrote adapter_model.bin, which loading then refused.
    model = two_adapters(method)
    with pytest.raises(ValueError, match="safetensors only.*safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not list(tmp_path.rglob("adapter_model.*")) and not list(tmp_path.rglob("adapter_config.json"))
    model.save_pretrained(tmp_path)  # the default still saves
    assert (tmp_path / "one" / "adapter_model.safetensors").is_file() or (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_add_weighted_adapter_says_what_to_do_instead(method):
    lora = two_adapters("lora")
    lora.add_weighted_adapter(["one", "two"], [1.0, 1.0], "sum", combination_type="cat")  # peft's LoRA has it
    with pytest.raises(NotImplementedError, match="export each adapter with peft_nola.export_lora"):
        two_adapters(method).add_weighted_adapter(["one", "two"], [1.0, 1.0], "sum", combination_type="cat")


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_inject_adapter_in_model_and_transformers_loading(method, tmp_path, token_ids):
    # Before: NOLA was refused ("uses shared state stored on the tuner"). The reference is get_peft_model's model.
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    tiny_gpt2().save_pretrained(tmp_path / "base")
    reference = get_peft_model(tiny_gpt2(), CONFIGS[method]())
    with torch.no_grad():  # coefficients no fresh adapter has: the loads below must really read the file
        for param in (p for p in reference.parameters() if p.requires_grad):
            param.mul_(1.5).add_(0.01)
    reference.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    reference.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = reference(token_ids).logits
        assert not torch.allclose(expected, tiny_gpt2()(token_ids).logits)  # a real update

    injected = inject_adapter_in_model(CONFIGS[method](), tiny_gpt2())  # peft's low-level API
    set_peft_model_state_dict(injected, load_peft_weights(str(tmp_path / "adapter")))
    base = tiny_gpt2()
    base.load_adapter(str(tmp_path / "adapter"))  # transformers' PEFT integration
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # ... through the adapter folder
    for model in (injected, base, auto):
        with torch.no_grad():
            torch.testing.assert_close(model(token_ids).logits, expected, rtol=1e-5, atol=1e-6)
