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
