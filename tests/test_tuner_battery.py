"""The battery every tuner runs, as peft's ``tests/testing_common.py``: NOLA in each basis mode and NoRA (the cases
in ``tuner_cases.py``) on the tiny models of ``conftest.py``. Each property is checked against an independent
reference: the base model's output, the method's update computed from its definition, each adapter run alone, another
process. What only one method has is tested in ``test_nola_model.py`` and ``test_nora.py``."""

import subprocess
import sys
import tempfile

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file

from .conftest import REPO_ROOT, assert_mixed_batch_matches_single_adapters, tiny_gpt2, tiny_llama, train_with_trainer
from .tuner_cases import EVERY_METHOD, N_EMBD, NORA_STORED, ONE_PER_METHOD, SETTINGS, cases


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("method", ONE_PER_METHOD)
def test_the_method_is_registered_with_stock_peft(method):
    peft_type = method.name.upper()
    assert PeftType(peft_type) is getattr(PeftType, peft_type)
    config = method.config_cls(target_modules=["q_proj"])
    assert config.peft_type == getattr(PeftType, peft_type)
    assert config.to_dict()["peft_type"] == peft_type


# ------------------------------------------------------------------------------------------ identity at init
@pytest.mark.parametrize("setting", ["gpt2-qv", "llama-all-linear", "vit-mlp", "mlp", "cnn"])
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_identity_at_init_and_gradients_reach_the_trainable_tensors(method, setting):
    chosen = SETTINGS[setting]
    base, inputs = chosen.make_base(), chosen.make_inputs()
    with torch.no_grad():
        expected = base(**inputs)
    expected = getattr(expected, "logits", expected)
    model = get_peft_model(base, method.config(setting))
    out = model(**inputs)
    out = getattr(out, "logits", out)
    assert torch.equal(out.detach(), expected)
    # The update is 0 but gradients reach the tensors that move it (and only the adapter trains, besides
    # modules_to_save).
    out.float().pow(2).mean().backward()
    layers = method.layers(model)
    assert layers
    for layer in layers:
        for name in method.gradient_at_init:
            assert getattr(layer, name)["default"].grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{t}." in n for t in method.trainable) or "modules_to_save" in n for n in trainable)


# ----------------------------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_the_update_is_its_definition_in_the_adapted_blocks_only(method):
    """ΔW computed here from the adapter's tensors and the method's definition (``tuner_cases.py``), in the q and v
    thirds of c_attn; the key third is exactly 0."""
    model = get_peft_model(tiny_gpt2(), method.config("gpt2-qv", **method.definition_kwargs))
    for index in range(2):
        delta = model.base_model.model.transformer.h[index].attn.c_attn.get_delta_weight("default")  # (in, out)
        torch.testing.assert_close(delta, method.expected_delta(model, index).T, **method.definition_tolerance)
        assert delta[:, N_EMBD : 2 * N_EMBD].abs().max() == 0  # the key third is untouched
        assert delta.abs().max() > 1e-3  # the update is really there


# ----------------------------------------------------------------------------------------- merge and unload
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_forward_matches_merged_weight_and_unmerge_restores(method, token_ids):
    base = tiny_gpt2()
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, method.config("gpt2-qv", init_weights=False)).eval()
    with torch.no_grad():
        unmerged = model(token_ids).logits
        model.merge_adapter(safe_merge=True)
        merged = model(token_ids).logits
        model.unmerge_adapter()
        again = model(token_ids).logits
    assert (unmerged - merged).abs().max() < 1e-5
    with torch.no_grad(), model.disable_adapter():
        assert (model(token_ids).logits - unmerged).abs().max() > 1e-3  # the update is really there
    for name, param in model.get_base_model().named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in originals:
            torch.testing.assert_close(param, originals[clean], atol=1e-6, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("setting", ["cnn", "mlp"], ids=["conv2d", "linear"])
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_merge_and_unload_equals_adapted_model(method, setting):
    chosen = SETTINGS[setting]
    x = chosen.make_inputs()["x"]
    model = get_peft_model(chosen.make_base(), method.config(setting, init_weights=False))
    with torch.no_grad():
        adapted = model(x)
        base_out = chosen.make_base()(x)
        assert (adapted - base_out).abs().max() > 1e-3  # the update is really there
        merged = model.merge_and_unload()
        assert not method.layers(merged)
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_unload_and_disable_give_the_base_model(method, token_ids):
    with torch.no_grad():
        expected = tiny_llama()(token_ids).logits
    model = get_peft_model(tiny_llama(), method.config("llama-qv", init_weights=False))
    with torch.no_grad():
        assert (model(token_ids).logits - expected).abs().max() > 1e-4
        with model.disable_adapter():
            assert torch.equal(model(token_ids).logits, expected)
        assert torch.equal(model.unload()(token_ids).logits, expected)


# ------------------------------------------------------------------------------------------- save and load
# One fresh Python process loads every adapter these tests save: each line on its stdin names an adapter folder and a
# file of token ids; it answers with the logits' bytes. The process never saw the models the adapters came from.
LOADER = r"""
import sys, traceback, torch, peft_nola
from peft import PeftModel
sys.path.insert(0, sys.argv[1])
from tests.conftest import tiny_gpt2
out = sys.stdout.buffer
for line in sys.stdin:
    adapter_dir, ids_file = line.rstrip("\n").split("\t")
    try:
        model = PeftModel.from_pretrained(tiny_gpt2(), adapter_dir).eval()
        with torch.no_grad():
            answer = b"+" + model(torch.load(ids_file)).logits.numpy().tobytes()
    except Exception:
        answer = b"!" + traceback.format_exc().encode()
    out.write(len(answer).to_bytes(8, "little") + answer)
    out.flush()
"""


@pytest.fixture(scope="module")
def new_process():
    """``load(adapter_dir, ids_file) -> bytes``: the logits of tiny_gpt2 with the adapter, computed in another Python
    process (started once for this module)."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: warnings never fill a buffer nobody reads
        child = subprocess.Popen([sys.executable, "-c", LOADER, str(REPO_ROOT)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr)

        def load(adapter_dir, ids_file) -> bytes:
            child.stdin.write(f"{adapter_dir}\t{ids_file}\n".encode())
            child.stdin.flush()
            header = child.stdout.read(8)
            if len(header) < 8:
                stderr.seek(0)
                raise AssertionError(f"the loading process ended: {stderr.read().decode()[-3000:]}")
            answer = child.stdout.read(int.from_bytes(header, "little"))
            assert answer[:1] == b"+", answer[1:].decode()
            return answer[1:]

        yield load
        child.stdin.close()
        child.wait(timeout=60)


@pytest.mark.parametrize("method", EVERY_METHOD + cases(NORA_STORED))
def test_save_then_load_in_a_new_process_is_bit_identical(method, new_process, tmp_path, token_ids):
    model = get_peft_model(tiny_gpt2(), method.config("gpt2-qv", **method.trained_kwargs))
    method.make_trained(model)
    with torch.no_grad():
        expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[-1] for key in tensors} == method.saved_kinds()
    if method.saved_numel() is not None:
        assert sum(t.numel() for t in tensors.values()) == method.saved_numel()
    torch.save(token_ids, tmp_path / "ids.pt")
    assert new_process(tmp_path / "adapter", tmp_path / "ids.pt") == expected.numpy().tobytes()


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_is_trainable_loading_and_auto_peft_model(method, tmp_path, token_ids):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(tiny_llama(), method.config("llama-qv", init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(token_ids).logits
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    with torch.no_grad():
        assert torch.equal(auto(token_ids).logits, expected)
    trainable = PeftModel.from_pretrained(tiny_llama(), adapter_dir, is_trainable=True)
    per_block = method.trainable_per_block(model.peft_config["default"])
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 2 * per_block  # 2 layers x (q, v)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_loading_onto_a_different_model_is_an_error_and_leaves_it_untouched(method, tmp_path):
    get_peft_model(tiny_gpt2(), method.config("gpt2-qv")).save_pretrained(tmp_path)
    other = tiny_gpt2(n_embd=48)
    with pytest.raises(ValueError, match="made for a different model.*transformer.h.0.attn.c_attn.*144x48"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not method.layers(other)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_modules_to_save_is_trained_and_saved(method, tmp_path):
    model = get_peft_model(SETTINGS["vit-mlp"].make_base(), method.config("vit-mlp"))
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("classifier" in k for k in keys)
    assert all("classifier" in k or any(f".{t}" in k for t in method.trainable) for k in keys)


# ---------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_mixed_batch_equals_per_sample_outputs(method, token_ids):
    """Two adapters of other shapes (NOLA: another rank, seed and basis mode; NoRA: another outer and inner rank)."""
    model = get_peft_model(tiny_gpt2(), method.config("gpt2-qv", init_weights=False), adapter_name="task1")
    model.add_adapter("task2", method.config("gpt2-qv", init_weights=False, **method.second_adapter_kwargs()))
    model.eval()
    assert_mixed_batch_matches_single_adapters(model, token_ids, ["task1", "__base__", "task2"])
    assert_mixed_batch_matches_single_adapters(model, token_ids, ["task2", "task1", "__base__"])
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): task3"):
        model(token_ids, adapter_names=["task1", "task3", "task2"])


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_generate_with_mixed_adapters(method, token_ids):
    model = get_peft_model(tiny_gpt2(), method.config("gpt2-qv", init_weights=False), adapter_name="task1")
    model.add_adapter("task2", method.config("gpt2-qv", init_weights=False, **method.second_adapter_kwargs()))
    model.eval()
    out = model.generate(input_ids=token_ids[:2], adapter_names=["task1", "task2"], max_new_tokens=3, do_sample=False)
    model.set_adapter("task2")
    alone = model.generate(input_ids=token_ids[1:2], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[1:2], alone)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_add_set_delete_adapter(method, token_ids):
    model = get_peft_model(tiny_llama(), method.config("llama-qv", init_weights=False), adapter_name="task1")
    model.add_adapter("task2", method.config("llama-qv", init_weights=False, **method.second_adapter_kwargs()))
    model.set_adapter("task2")
    with torch.no_grad():
        out_b = model(token_ids).logits
    model.delete_adapter("task2")
    assert all(set(method.first_trainable(layer)) == {"task1"} for layer in method.layers(model))
    model.set_adapter("task1")
    with torch.no_grad():
        assert (model(token_ids).logits - out_b).abs().max() > 1e-4


# -------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ONE_PER_METHOD)
def test_loss_goes_down_with_the_trainer_and_gradient_checkpointing_and_the_result_merges(method, tmp_path, token_ids):
    model = get_peft_model(tiny_llama(), method.trainer_config())
    before, after = train_with_trainer(model, tmp_path, learning_rate=1e-1)
    assert after < before - 0.05
    originals = [layer.get_base_layer().weight.detach().clone() for layer in method.layers(model)]
    with torch.no_grad():
        unmerged = model(token_ids).logits
        model.merge_adapter()
        merged = model(token_ids).logits
        model.unmerge_adapter()
    assert (merged - unmerged).abs().max() < 1e-5
    for layer, original in zip(method.layers(model), originals):
        torch.testing.assert_close(layer.get_base_layer().weight, original, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- bad input
SHARED_SETTINGS_REFUSED = [
    (dict(r=0), "r must be an integer >= 1, got 0"),
    (dict(dropout=1.5), "_dropout must be a number in"),
    (dict(bias="lora_only"), "bias must be one of"),
    (dict(output_slices={"c_attn": {"splits": 3, "adapt": [3]}}), r"adapt'\] must be a non-empty list"),
    (dict(output_slices={"c_attn": [0, 2]}), "exactly the keys 'splits' and 'adapt'"),
    (dict(target_modules=2.5), "target_modules must be a module name, a regex, or a list of names, got 2.5"),
    (dict(layers_to_transform=["0"]), "layers_to_transform must be a layer index or a list of indices"),
    (dict(fan_in_fan_out="yes"), "fan_in_fan_out must be true or false"),
    (dict(modules_to_save="lm_head"), "modules_to_save must be a list of names"),
    # peft ignores layers_to_transform for a regex (0.22 refuses it, 0.21 did not): refused on every release.
    (dict(target_modules=r".*q_proj", layers_to_transform=[1]), "layers_to_transform cannot be used when"),
]


@pytest.mark.parametrize("kwargs, message", SHARED_SETTINGS_REFUSED)
@pytest.mark.parametrize("method", ONE_PER_METHOD)
def test_config_validation_of_the_shared_settings(method, kwargs, message):
    if "dropout" in kwargs:
        kwargs = {method.dropout_field: kwargs["dropout"]}
    with pytest.raises(ValueError, match=message):
        method.config_cls(**{"target_modules": ["q_proj"], **kwargs})


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_unsupported_layer_and_no_match_are_clear_errors(method):
    base = tiny_llama()
    with pytest.raises(TypeError, match="cannot adapt module 'model.embed_tokens' of type Embedding"):
        get_peft_model(base, method.config_cls(target_modules=["embed_tokens"]))
    assert not method.layers(base)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), method.config_cls(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="not divisible by 5"):
        get_peft_model(tiny_gpt2(), method.config("gpt2-qv", output_slices={"c_attn": {"splits": 5, "adapt": [0]}}))


# --------------------------------------------------------------------------------------- 8-bit and 4-bit base
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", ONE_PER_METHOD)
def test_bitsandbytes_base(method, tmp_path, token_ids, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes' 4-bit CPU matmul (0.50.2) fails on inputs narrower than its 64-element quantization block
    tiny_llama(hidden_size=64).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    load_base = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)  # noqa: E731
    base = load_base()
    with torch.no_grad():
        expected = base(token_ids).logits
    model = get_peft_model(base, method.bitsandbytes_config())
    assert type(method.layers(model)[0].get_base_layer()).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, expected)
    # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight at its first forward in eval mode without
    # grad; afterwards nothing upstream of it gets a gradient and dequantizing it (merging) reads the packed layout.
    # That is bitsandbytes' state, not the adapter's: the rest of the test keeps the models in train mode (no dropout).
    model = get_peft_model(load_base(), method.bitsandbytes_config()).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(token_ids, labels=token_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        adapted = model(token_ids).logits
        model.merge_adapter()
        merged = model(token_ids).logits
    # Merging re-quantizes the weight, so the merged model is off by a quantization error, but it is much closer to
    # the adapted model than the base model is.
    assert (merged - adapted).abs().mean() < 0.5 * (expected - adapted).abs().mean()
    loaded = PeftModel.from_pretrained(load_base(), tmp_path / "adapter").train()
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, adapted)
