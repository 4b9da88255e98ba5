"""What only NOLA has, each compared against an independent reference (the seeded generator, the stored file, the
paper's parameter counts); the properties every tuner shares are in test_tuner_battery.py."""

import json
import math
import re

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, uniform_stream

from .conftest import tiny_gpt2, tiny_llama

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


# ---------------------------------------------------------------------------------------------- initialisation
def test_alpha_starts_kaiming_uniform_from_the_seeded_stream():
    """α started at U(±sqrt(3/n)) from the seeded generator: A's entries have LoRA's Kaiming-uniform variance."""
    model0 = get_peft_model(tiny_gpt2(), gpt2_qv_config(basis_seed=3))
    alpha0 = model0.base_model.model.transformer.h[1].attn.c_attn.nola_coef_A["default"].detach()
    scale = torch.tensor(math.sqrt(3 / 32), dtype=torch.float32)  # n_embd = 32
    assert torch.equal(alpha0[1], uniform_stream(3, "alpha/transformer.h.1.attn.c_attn/2", 0, K) * scale)


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


# ------------------------------------------------------------------------------------- fingerprints on load
def test_basis_fingerprint_mismatch_is_an_error(tmp_path):
    get_peft_model(tiny_gpt2(), gpt2_qv_config()).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["basis_fingerprint"] = "0123456789abcdef"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="basis cannot be reproduced"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


# ---------------------------------------------------------------------------------------- several adapters
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


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [  # NOLA's own settings; the shared ones: test_tuner_battery.py
    (dict(num_basis_A=0), "num_basis_A must be an integer >= 1"),
    (dict(num_basis_B=-3), "num_basis_B must be an integer >= 1"),
    (dict(basis_seed=-1), "basis_seed must be an integer >= 0"),
    (dict(basis_mode="global"), "basis_mode must be one of"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NolaConfig(**{"target_modules": ["q_proj"], **kwargs})


SUGGESTED_MODE = re.compile(r"basis_mode='(\w+)' \(")
ADVICE = re.compile(r"budget \([^)]*\)\. (.*); or raise the budget")  # what the refusal suggests
SUGGESTED_SIZE = re.compile(r"num_basis_A=num_basis_B=(\d+) \(the largest that fit in basis_mode='(\w+)'")


@pytest.mark.parametrize("mode, num_basis, budget_of", [
    ("per_layer_cached", 1000, lambda need: need["per_layer_cached"] - 1),  # 'shared' and 'per_layer' fit
    ("shared", 1000, lambda need: need["shared"] - 1),                      # 'per_layer' fits, not 'per_layer_cached'
    ("per_layer_cached", 1000, lambda need: need["per_layer"] - 1),         # no mode fits: only a smaller size
    ("per_layer", 10**12, lambda need: 10**6),                              # 4 TB of coefficients
])
def test_the_memory_refusal_suggests_settings_that_fit(monkeypatch, mode, num_basis, budget_of):
    """Issue 24: the refusal suggested the basis mode already chosen. Every mode it suggests now differs from the
    config's and is accepted by get_peft_model under the same budget, and so is the size it suggests, which is the
    largest: one more is refused."""
    from peft_nola.tuners.nola.memory import needed_bytes

    def config(**kwargs):
        return gpt2_qv_config(**{"r": 8, "num_basis_A": num_basis, "num_basis_B": num_basis, "basis_mode": mode,
                                 **kwargs})

    targets = [(key, module) for key, module in tiny_gpt2().named_modules() if key.endswith("c_attn")]
    need = {m: needed_bytes(config(), targets, m) for m in ("shared", "per_layer", "per_layer_cached")}
    budget = budget_of(need)
    monkeypatch.setenv("PEFT_NOLA_BASIS_MEMORY_BUDGET", str(budget))
    with pytest.raises(MemoryError) as refusal:
        get_peft_model(tiny_gpt2(), config())
    advice = ADVICE.search(str(refusal.value))[1]
    modes = SUGGESTED_MODE.findall(advice.split("num_basis_A=")[0])
    assert modes == [m for m in ("shared", "per_layer", "per_layer_cached") if m != mode and need[m] <= budget]
    for suggested in modes:
        get_peft_model(tiny_gpt2(), config(basis_mode=suggested))
    ((size, kept),) = SUGGESTED_SIZE.findall(advice)
    size = int(size)
    assert kept == mode and needed_bytes(config(), targets, num_basis=size) <= budget
    get_peft_model(tiny_gpt2(), config(num_basis_A=size, num_basis_B=size))
    with pytest.raises(MemoryError):
        get_peft_model(tiny_gpt2(), config(num_basis_A=size + 1, num_basis_B=size + 1))


def test_the_memory_refusal_on_load_suggests_only_the_same_basis(monkeypatch, tmp_path):
    """A trained adapter's sizes and basis are fixed: per_layer_cached may load as per_layer (the same basis,
    regenerated), and that suggestion loads under the same budget; a 'shared' adapter gets no mode or size to use."""
    from peft_nola.tuners.nola.memory import needed_bytes

    targets = [(key, module) for key, module in tiny_gpt2().named_modules() if key.endswith("c_attn")]
    for mode in ("per_layer_cached", "shared"):
        get_peft_model(tiny_gpt2(), gpt2_qv_config(r=8, num_basis_A=1000, num_basis_B=1000, basis_mode=mode,
                                                   init_weights=False)).save_pretrained(tmp_path / mode)
    cached = gpt2_qv_config(r=8, num_basis_A=1000, num_basis_B=1000, basis_mode="per_layer_cached")
    monkeypatch.setenv("PEFT_NOLA_BASIS_MEMORY_BUDGET", str(needed_bytes(cached, targets, "per_layer")))
    with pytest.raises(MemoryError, match=r"Use basis_mode='per_layer' \(the same basis"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "per_layer_cached")
    PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "per_layer_cached", basis_mode="per_layer")
    with pytest.raises(MemoryError) as refusal:
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "shared")
    advice = ADVICE.search(str(refusal.value))[1]
    assert "fixed by its training" in advice and "basis_mode=" not in advice and "num_basis" not in advice


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
                                          r"Use basis_mode='shared' \(2,084,096 bytes \(2.0 MiB\) here\)"):
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
