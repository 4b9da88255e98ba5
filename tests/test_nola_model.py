"""NOLA as a peft tuner: each test compares against an independent reference (the base model's output, the
method's formula, the stored file, the paper's parameter counts)."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_nola
from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, basis_rows, uniform_stream

from .conftest import assert_mixed_batch_matches_single_adapters, TinyCNN, TinyMLP, seeded, tiny_gpt2, tiny_llama, tiny_vit, train_with_trainer

K, L, R = 40, 30, 4


def gpt2_qv_config(**kwargs):
    defaults = dict(r=R, num_basis_A=K, num_basis_B=L, target_modules=["c_attn"], output_slices=GPT2_QV_SLICES,
                    fan_in_fan_out=True, task_type="CAUSAL_LM")
    return NolaConfig(**{**defaults, **kwargs})


def llama_config(**kwargs):
    defaults = dict(r=R, num_basis_A=K, num_basis_B=L, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return NolaConfig(**{**defaults, **kwargs})


def nola_layers(model):
    return [m for m in model.modules() if isinstance(m, NolaLayer)]


# ------------------------------------------------------------------------------------------------ registration
def test_registered_with_stock_peft():
    assert PeftType("NOLA") is PeftType.NOLA
    config = NolaConfig(target_modules=["q_proj"])
    assert config.peft_type == PeftType.NOLA
    assert config.to_dict()["peft_type"] == "NOLA"


# ------------------------------------------------------------------------------------------ identity at init
@pytest.mark.parametrize("basis_mode", ["shared", "per_layer", "per_layer_cached"])
def test_identity_at_init_gpt2_qv(token_ids, basis_mode):
    base = tiny_gpt2()
    with torch.no_grad():
        expected = base(token_ids).logits
    model = get_peft_model(base, gpt2_qv_config(basis_mode=basis_mode))
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, expected)


@pytest.mark.parametrize(
    "make_base, config, make_input",
    [
        (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
         lambda: {"input_ids": torch.randint(1, 96, (2, 7))}),
        (tiny_vit, dict(target_modules=["fc1", "fc2"], modules_to_save=["classifier"]),
         lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
        (lambda: seeded(TinyMLP), dict(target_modules=["lin0", "lin1"]), lambda: {"x": torch.randn(4, 12)}),
        (lambda: seeded(TinyCNN), dict(target_modules=["conv0", "conv1"]), lambda: {"x": torch.randn(2, 3, 8, 8)}),
    ],
    ids=["llama-all-linear", "vit-mlp", "mlp", "cnn"],
)
def test_identity_at_init_then_a_real_update(make_base, config, make_input):
    base, inputs = make_base(), make_input()
    with torch.no_grad():
        expected = base(**inputs)
    expected = getattr(expected, "logits", expected)
    model = get_peft_model(base, NolaConfig(r=R, num_basis_A=K, num_basis_B=L, **config))
    out = model(**inputs)
    out = getattr(out, "logits", out)
    assert torch.equal(out.detach(), expected)
    # β = 0 but gradients reach β (and only the coefficients train besides modules_to_save).
    out.float().pow(2).mean().backward()
    for layer in nola_layers(model):
        assert layer.nola_coef_B["default"].grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("nola_coef_" in n or "modules_to_save" in n for n in trainable)


# ----------------------------------------------------------------------------------------------- the formula
def test_delta_weight_matches_the_definition_with_slices():
    """ΔW = (c / r) · B · A with A = Σ α_i A_i, B = Σ β_j B_j, placed in the q and v thirds of c_attn only."""
    model = get_peft_model(tiny_gpt2(), gpt2_qv_config(init_weights=False, nola_alpha=2.0, basis_seed=3))
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    n_embd = 32
    alpha, beta = layer.nola_coef_A["default"].detach(), layer.nola_coef_B["default"].detach()
    basis_A = basis_rows(3, f"A/{R}x{n_embd}", K, R * n_embd).view(K, R, n_embd)
    basis_B = basis_rows(3, f"B/{n_embd}x{R}", L, n_embd * R).view(L, n_embd, R)
    expected = torch.zeros(3 * n_embd, n_embd)  # (out, in)
    for block, part in enumerate([0, 2]):
        A = sum(alpha[block, i] * basis_A[i] for i in range(K))
        B = sum(beta[block, j] * basis_B[j] for j in range(L))
        expected[part * n_embd : (part + 1) * n_embd] = (2.0 / R) * B @ A
    delta = layer.get_delta_weight("default")  # Conv1D layout: (in, out)
    torch.testing.assert_close(delta, expected.T, atol=1e-6, rtol=1e-5)
    assert delta[:, n_embd : 2 * n_embd].abs().max() == 0  # the key third is untouched
    # α started at U(±sqrt(3/n)) from the seeded generator: A's entries have LoRA's Kaiming-uniform variance.
    model0 = get_peft_model(tiny_gpt2(), gpt2_qv_config(basis_seed=3))
    alpha0 = model0.base_model.model.transformer.h[1].attn.c_attn.nola_coef_A["default"].detach()
    scale = torch.tensor(math.sqrt(3 / n_embd), dtype=torch.float32)
    assert torch.equal(alpha0[1], uniform_stream(3, "alpha/transformer.h.1.attn.c_attn/2", 0, K) * scale)


def test_forward_matches_merged_weight_and_unmerge_restores(token_ids):
    base = tiny_gpt2()
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, gpt2_qv_config(init_weights=False)).eval()
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


@pytest.mark.parametrize("make_base, targets, make_input", [
    (lambda: seeded(TinyCNN), ["conv0", "conv1"], lambda: torch.randn(2, 3, 8, 8)),
    (lambda: seeded(TinyMLP), ["lin0", "lin1"], lambda: torch.randn(4, 12)),
], ids=["conv2d", "linear"])
def test_merge_and_unload_equals_adapted_model(make_base, targets, make_input):
    x = make_input()
    model = get_peft_model(make_base(), NolaConfig(r=R, num_basis_A=K, num_basis_B=L, target_modules=targets,
                                                   init_weights=False, basis_mode="per_layer"))
    with torch.no_grad():
        adapted = model(x)
        base_out = make_base()(x)
        assert (adapted - base_out).abs().max() > 1e-3  # the update is really there
        merged = model.merge_and_unload()
        assert not nola_layers(merged)
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)


def test_unload_and_disable_give_the_base_model(token_ids):
    with torch.no_grad():
        expected = tiny_llama()(token_ids).logits
    model = get_peft_model(tiny_llama(), llama_config(init_weights=False))
    with torch.no_grad():
        assert (model(token_ids).logits - expected).abs().max() > 1e-4
        with model.disable_adapter():
            assert torch.equal(model(token_ids).logits, expected)
        assert torch.equal(model.unload()(token_ids).logits, expected)


# ------------------------------------------------------------------------------------------ parameter counts
def _meta_count(model_config, auto_cls, nola_config):
    with torch.device("meta"):
        base = auto_cls.from_config(model_config)
    trainable, _ = get_peft_model(base, nola_config).get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize("size, n_embd, n_layer, k, expected", [
    ("gpt2-medium", 1024, 24, 1000, 96_000), ("gpt2-medium", 1024, 24, 500, 48_000),
    ("gpt2-large", 1280, 36, 1000, 144_000), ("gpt2-large", 1280, 36, 500, 72_000),
    ("gpt2-large", 1280, 36, 250, 36_000),
])
def test_paper_parameter_counts_gpt2_qv(size, n_embd, n_layer, k, expected):
    from transformers import AutoModelForCausalLM, GPT2Config
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=16 if n_embd == 1024 else 20)
    nola = NolaConfig(r=8, num_basis_A=k, num_basis_B=k, target_modules=["c_attn"], output_slices=GPT2_QV_SLICES,
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    assert _meta_count(config, AutoModelForCausalLM, nola) == expected


@pytest.mark.parametrize("hidden, inter, layers, heads, kv_heads, k, expected", [
    (4096, 11008, 32, 32, 32, 128, 57_344), (5120, 13824, 40, 40, 40, 256, 143_360),
    (8192, 28672, 80, 64, 8, 512, 573_440),
], ids=["llama2-7b", "llama2-13b", "llama2-70b"])
def test_paper_parameter_counts_llama2(hidden, inter, layers, heads, kv_heads, k, expected):
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000)
    nola = NolaConfig(r=16, num_basis_A=k, num_basis_B=k, nola_alpha=4,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert _meta_count(config, AutoModelForCausalLM, nola) == expected


def test_paper_parameter_count_vit_b_mlp():
    from transformers import AutoModelForImageClassification, ViTConfig
    nola = NolaConfig(r=4, num_basis_A=1000, num_basis_B=1000,
                      target_modules=["fc1", "fc2"])
    assert _meta_count(ViTConfig(), AutoModelForImageClassification, nola) == 48_000


# ------------------------------------------------------------------------------------------- save and load
LOAD_AND_PRINT = """
import sys, torch, peft_nola
from peft import PeftModel
sys.path.insert(0, sys.argv[3])
from tests.conftest import tiny_gpt2
model = PeftModel.from_pretrained(tiny_gpt2(), sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    sys.stdout.buffer.write(model(ids).logits.numpy().tobytes())
"""


def test_save_then_load_in_a_new_process_is_bit_identical(tmp_path, token_ids):
    from .conftest import REPO_ROOT
    model = get_peft_model(tiny_gpt2(), gpt2_qv_config())
    with torch.no_grad():
        for layer in nola_layers(model):  # a trained-looking adapter
            layer.nola_coef_B["default"].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(token_ids, tmp_path / "ids.pt")
    out = subprocess.run([sys.executable, "-c", LOAD_AND_PRINT, str(tmp_path / "adapter"), str(tmp_path / "ids.pt"),
                          str(REPO_ROOT)], capture_output=True, check=True).stdout
    assert out == expected.numpy().tobytes()


def test_adapter_file_holds_only_coefficients(tmp_path):
    model = get_peft_model(tiny_gpt2(), gpt2_qv_config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    n_coefficients = 2 * 2 * (K + L)  # 2 layers x (q, v) x (k + l)
    assert sorted(tensors) == sorted(
        f"base_model.model.transformer.h.{i}.attn.c_attn.nola_coef_{f}" for i in range(2) for f in "AB"
    )
    assert sum(t.numel() for t in tensors.values()) == n_coefficients
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 4 * n_coefficients <= size <= 4 * n_coefficients + 1024  # fp32 payload + the safetensors JSON header
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "NOLA" and saved["basis_fingerprint"] == "7c43078084d4e59c"
    assert isinstance(PeftConfig.from_pretrained(tmp_path), NolaConfig)


def test_is_trainable_loading_and_auto_peft_model(tmp_path, token_ids):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(tiny_llama(), llama_config(init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(token_ids).logits
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    with torch.no_grad():
        assert torch.equal(auto(token_ids).logits, expected)
    trainable = PeftModel.from_pretrained(tiny_llama(), adapter_dir, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 2 * (K + L)


# ------------------------------------------------------------------------------------- fingerprints on load
def test_loading_onto_a_different_model_is_an_error_and_leaves_it_untouched(tmp_path):
    get_peft_model(tiny_gpt2(), gpt2_qv_config()).save_pretrained(tmp_path)
    other = tiny_gpt2(n_embd=48)
    with pytest.raises(ValueError, match="made for a different model.*transformer.h.0.attn.c_attn.*144x48"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not nola_layers(other)


def test_basis_fingerprint_mismatch_is_an_error(tmp_path):
    get_peft_model(tiny_gpt2(), gpt2_qv_config()).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["basis_fingerprint"] = "0123456789abcdef"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="basis cannot be reproduced"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


# ---------------------------------------------------------------------------------------- several adapters
def test_mixed_batch_equals_per_sample_outputs(token_ids):
    model = get_peft_model(tiny_gpt2(), gpt2_qv_config(init_weights=False), adapter_name="task1")
    model.add_adapter("task2", gpt2_qv_config(init_weights=False, basis_seed=9, r=2, basis_mode="per_layer"))
    model.eval()
    assert_mixed_batch_matches_single_adapters(model, token_ids, ["task1", "__base__", "task2"])
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): task3"):
        model(token_ids, adapter_names=["task1", "task3", "task2"])


def test_generate_with_mixed_adapters(token_ids):
    model = get_peft_model(tiny_gpt2(), gpt2_qv_config(init_weights=False), adapter_name="task1")
    model.add_adapter("task2", gpt2_qv_config(init_weights=False, basis_seed=4))
    model.eval()
    out = model.generate(input_ids=token_ids[:2], adapter_names=["task1", "task2"], max_new_tokens=3, do_sample=False)
    model.set_adapter("task2")
    alone = model.generate(input_ids=token_ids[1:2], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[1:2], alone)


def test_adapters_with_the_same_seed_and_other_basis_sizes_do_not_share_a_basis(token_ids):
    small = dict(num_basis_A=12, num_basis_B=9, init_weights=False)
    alone = get_peft_model(tiny_llama(), llama_config(**small))
    with torch.no_grad():
        expected = alone(token_ids).logits
    model = get_peft_model(tiny_llama(), llama_config(init_weights=False), adapter_name="task1")
    model.add_adapter("task2", llama_config(**small))
    model.set_adapter("task2")
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, expected, atol=1e-6, rtol=0)


def test_add_set_delete_adapter(token_ids):
    model = get_peft_model(tiny_llama(), llama_config(init_weights=False), adapter_name="task1")
    model.add_adapter("task2", llama_config(init_weights=False, basis_seed=1))
    model.set_adapter("task2")
    with torch.no_grad():
        out_b = model(token_ids).logits
    model.delete_adapter("task2")
    assert all(set(layer.nola_coef_A) == {"task1"} for layer in nola_layers(model))
    model.set_adapter("task1")
    with torch.no_grad():
        assert (model(token_ids).logits - out_b).abs().max() > 1e-4


# -------------------------------------------------------------------------------------------------- training
def test_loss_goes_down_with_the_trainer_and_gradient_checkpointing(tmp_path):
    model = get_peft_model(tiny_llama(), llama_config(num_basis_A=64, num_basis_B=64))
    before, after = train_with_trainer(model, tmp_path, learning_rate=1e-1)
    assert after < before - 0.05


def test_modules_to_save_is_trained_and_saved(tmp_path):
    model = get_peft_model(tiny_vit(), NolaConfig(r=R, num_basis_A=K, num_basis_B=L, modules_to_save=["classifier"],
                                                  target_modules=["fc1", "fc2"]))
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("classifier" in k for k in keys)
    assert all("classifier" in k or "nola_coef_" in k for k in keys)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be an integer >= 1, got 0"),
    (dict(num_basis_A=0), "num_basis_A must be an integer >= 1"),
    (dict(num_basis_B=-3), "num_basis_B must be an integer >= 1"),
    (dict(basis_seed=-1), "basis_seed must be an integer >= 0"),
    (dict(nola_dropout=1.5), "nola_dropout must be a number in"),
    (dict(basis_mode="global"), "basis_mode must be one of"),
    (dict(bias="lora_only"), "bias must be one of"),
    (dict(output_slices={"c_attn": {"splits": 3, "adapt": [3]}}), r"adapt'\] must be a non-empty list"),
    (dict(output_slices={"c_attn": [0, 2]}), "exactly the keys 'splits' and 'adapt'"),
    (dict(target_modules=2.5), "target_modules must be a module name, a regex, or a list of names, got 2.5"),
    (dict(layers_to_transform=["0"]), "layers_to_transform must be a layer index or a list of indices"),
    (dict(fan_in_fan_out="yes"), "fan_in_fan_out must be true or false"),
    (dict(modules_to_save="lm_head"), "modules_to_save must be a list of names"),
    # peft ignores layers_to_transform for a regex (0.22 refuses it, 0.21 did not): refused on every release.
    (dict(target_modules=r".*q_proj", layers_to_transform=[1]), "layers_to_transform cannot be used when"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NolaConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_unsupported_layer_and_no_match_are_clear_errors():
    base = tiny_llama()
    with pytest.raises(TypeError, match="cannot adapt module 'model.embed_tokens' of type Embedding"):
        get_peft_model(base, NolaConfig(target_modules=["embed_tokens"]))
    assert not nola_layers(base)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), NolaConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="not divisible by 5"):
        get_peft_model(tiny_gpt2(), gpt2_qv_config(output_slices={"c_attn": {"splits": 5, "adapt": [0]}}))


def test_basis_over_the_memory_budget_is_refused_before_injection(monkeypatch, token_ids):
    """Tiny GPT-2 (n_embd 32, 2 layers) QV: 4 adapted blocks, each with A_i of 8x32 and B_j of 32x8."""
    k = l = 1000
    per_layer_bytes = 4 * 4 * (k * 8 * 32 + l * 32 * 8)  # 4 blocks, float32: 8,192,000
    shared_bytes = 4 * (k * 8 * 32 + l * 32 * 8)  # one A and one B basis: 2,048,000
    # Every mode also holds the coefficients (4 blocks x (k + l)) and forms one layer's factors (2 blocks of c_attn,
    # A 8x32 and B 32x8 each) in the forward.
    working_bytes = 4 * (4 * (k + l) + 2 * (8 * 32 + 32 * 8))
    monkeypatch.setenv("PEFT_NOLA_BASIS_MEMORY_BUDGET", str(per_layer_bytes + working_bytes - 1))
    base = tiny_gpt2()
    config = gpt2_qv_config(r=8, num_basis_A=k, num_basis_B=l, basis_mode="per_layer_cached")
    with pytest.raises(MemoryError, match=r"would need 8,228,096 bytes \(7.8 MiB\) of basis, coefficients and "
                                          r"factors for 2 adapted modules .* more than the 8,228,095 bytes .* "
                                          r"\(one basis per layer shape: 2,048,000 bytes \(2.0 MiB\) here\)"):
        get_peft_model(base, config)
    assert not nola_layers(base)
    # The on-the-fly basis stores none, but its coefficients are checked too (k = 10**12 would be 4 TB of them).
    with pytest.raises(MemoryError, match=r"basis_mode='per_layer' would need 16,000,000,020,096 bytes"):
        get_peft_model(base, gpt2_qv_config(r=8, num_basis_A=10**12, num_basis_B=l, basis_mode="per_layer"))
    assert not nola_layers(base)
    monkeypatch.setenv("PEFT_NOLA_BASIS_MEMORY_BUDGET", str(per_layer_bytes + working_bytes))
    for mode, expected in [("per_layer_cached", per_layer_bytes), ("shared", shared_bytes)]:
        model = get_peft_model(tiny_gpt2(), gpt2_qv_config(r=8, num_basis_A=k, num_basis_B=l, basis_mode=mode))
        model(token_ids)
        assert sum(b.numel() * b.element_size() for b in model.base_model.nola_basis.values()) == expected


# --------------------------------------------------------------------------------------- 8-bit and 4-bit base
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_base(tmp_path, token_ids, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes' 4-bit CPU matmul (0.50.2) fails on inputs narrower than its 64-element quantization block
    tiny_llama(hidden_size=64).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    load_base = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)  # noqa: E731
    base = load_base()
    with torch.no_grad():
        expected = base(token_ids).logits
    model = get_peft_model(base, llama_config(num_basis_A=64, num_basis_B=64))
    assert type(nola_layers(model)[0].get_base_layer()).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, expected)
    # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight at its first forward in eval mode without
    # grad; afterwards nothing upstream of it gets a gradient and dequantizing it (merging) reads the packed layout.
    # That is bitsandbytes' state, not the adapter's: the rest of the test keeps the models in train mode (no dropout).
    model = get_peft_model(load_base(), llama_config(num_basis_A=64, num_basis_B=64)).train()
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
