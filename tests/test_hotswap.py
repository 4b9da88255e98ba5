"""peft_nola.hotswap_adapter and torch.compile: a hotswapped adapter equals a fresh load of the saved one, a mismatch
is an error that leaves the loaded adapter untouched, and compiled models equal eager ones and are not recompiled by
a hotswap (counted with dynamo's own recompilation check)."""

import json

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, PeftModel, get_peft_model

from peft_nola import NolaConfig, NoraConfig, hotswap_adapter

from .conftest import tiny_llama
from .test_serving import randomize

TARGETS = ["q_proj", "v_proj"]


def config(method, **kwargs):
    if method == "nora":
        return NoraConfig(**{**dict(r=8, inner_r=2, target_modules=TARGETS, init_weights=False), **kwargs})
    return NolaConfig(**{**dict(r=4, num_basis_A=24, num_basis_B=20, target_modules=TARGETS, init_weights=False,
                                basis_mode=method), **kwargs})


def saved(tmp_path, name, method, seed, **kwargs):
    model = get_peft_model(tiny_llama(), config(method, **kwargs))
    randomize(model, "default", seed)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def loaded(path):
    return PeftModel.from_pretrained(tiny_llama(), path).eval()


def ids():
    return torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


METHODS = ["shared", "per_layer", "per_layer_cached", "nora"]


@pytest.mark.parametrize("method", METHODS)
def test_hotswap_equals_a_fresh_load_of_the_second_adapter(tmp_path, method):
    first = saved(tmp_path, "first", method, seed=1)
    alpha = {"nora_alpha": 3.0} if method == "nora" else {"nola_alpha": 3.0}
    second = saved(tmp_path, "second", method, seed=2, **alpha)
    model, x = loaded(first), ids()
    before = logits(model, x)  # fills the factor cache with the first adapter's factors
    hotswap_adapter(model, second)
    expected = logits(loaded(second), x)
    assert not torch.equal(before, expected)
    assert torch.equal(logits(model, x), expected)
    assert model.peft_config["default"].weights_checksum == json.loads(
        (second / "adapter_config.json").read_text())["weights_checksum"]


@pytest.mark.parametrize("method, other, message", [
    ("shared", dict(basis_seed=5), "basis_seed is 5"),
    ("shared", dict(basis_mode="per_layer"), "basis_mode is 'per_layer'"),
    ("shared", dict(num_basis_A=12), "num_basis_A is 12"),
    ("shared", dict(r=2), "layout_fingerprint"),
    ("shared", dict(target_modules=["q_proj"]), "layout_fingerprint"),
    ("nora", dict(inner_r=1), "layout_fingerprint"),
])
def test_a_mismatched_adapter_is_refused_and_the_loaded_one_stays(tmp_path, method, other, message):
    model, x = loaded(saved(tmp_path, "first", method, seed=1)), ids()
    before = logits(model, x)
    with pytest.raises(ValueError, match=message):
        hotswap_adapter(model, saved(tmp_path, "other", method, seed=2, **other))
    assert torch.equal(logits(model, x), before)


def test_a_lora_adapter_folder_is_named_as_lora_with_what_to_use_instead(tmp_path):
    """Issue 24: hotswapping a LoRA adapter's folder into a NOLA model says it is a LoRA adapter and names peft's own
    hotswap and loader (it said "the config was edited")."""
    model, x = loaded(saved(tmp_path, "first", "shared", seed=1)), ids()
    before = logits(model, x)
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=TARGETS)).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError) as refusal:
        hotswap_adapter(model, tmp_path / "lora")
    message = str(refusal.value)
    assert "describes a LORA adapter" in message and "was edited" not in message
    assert "peft.utils.hotswap.hotswap_adapter" in message and "PeftModel.from_pretrained" in message
    assert torch.equal(logits(model, x), before)


def test_other_method_altered_file_other_base_and_merged_adapters_are_refused(tmp_path):
    first = saved(tmp_path, "first", "shared", seed=1)
    model, x = loaded(first), ids()
    before = logits(model, x)
    with pytest.raises(ValueError, match="belongs to another method"):
        hotswap_adapter(model, saved(tmp_path, "nora", "nora", seed=2))
    altered = saved(tmp_path, "altered", "shared", seed=2)
    config_file = altered / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "weights_checksum": "0" * 16}))
    with pytest.raises(ValueError, match="weights_checksum"):
        hotswap_adapter(model, altered)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        hotswap_adapter(model, tmp_path / "missing")
    assert torch.equal(logits(model, x), before)
    nora = loaded(saved(tmp_path, "nora-a", "nora", seed=1))
    other_base = get_peft_model(tiny_llama(seed=3), config("nora"))
    other_base.save_pretrained(tmp_path / "nora-other-base")
    with pytest.raises(ValueError, match="not the weights it was trained on"):
        hotswap_adapter(nora, tmp_path / "nora-other-base")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        hotswap_adapter(model, saved(tmp_path, "second", "shared", seed=2))


def compiled_hotswap(tmp_path, method, backend):
    first, second = saved(tmp_path, "first", method, seed=1), saved(tmp_path, "second", method, seed=2)
    model, x = loaded(first), ids()
    eager_first = logits(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(logits(compiled, x), eager_first, rtol=1e-5, atol=1e-6)
    hotswap_adapter(model, second)
    with torch._dynamo.config.patch(error_on_recompile=True):
        swapped = logits(compiled, x)
    torch.testing.assert_close(swapped, logits(loaded(second), x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(swapped, eager_first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [m if m == "per_layer" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHODS])
def test_every_basis_mode_compiles_in_one_graph_and_a_hotswap_does_not_recompile(tmp_path, method):
    # aot_eager traces with fake tensors and functionalizes as inductor does, without its C++ compilation (slow on
    # CPU); the inductor runs are the slow test below. per_layer (the basis generated inside the forward, through
    # the custom operator) is the fast case; the others take ~5-8 s each.
    compiled_hotswap(tmp_path, method, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_inductor_compiles_every_basis_mode_and_a_hotswap_does_not_recompile(tmp_path, method):
    compiled_hotswap(tmp_path, method, "inductor")
