"""What only NoRA has (SVD outer factors, the σ-informed start, the weight fingerprint), each property checked against
an independent reference; the properties every tuner shares are in test_tuner_battery.py."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_nola import GPT2_QV_SLICES, NoraConfig, NoraLayer

from .conftest import tiny_gpt2, tiny_llama
from .tuner_cases import c_attn_block

R, INNER = 8, 2


def qv_config(**kwargs):
    defaults = dict(r=R, inner_r=INNER, target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True,
                    task_type="CAUSAL_LM")
    return NoraConfig(**{**defaults, **kwargs})


def nora_layers(model):
    return [m for m in model.modules() if isinstance(m, NoraLayer)]


def test_outer_factors_and_sigma_informed_start():
    model = get_peft_model(tiny_gpt2(), qv_config())
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    for slot, block in enumerate([0, 2]):
        weight = c_attn_block(model, 1, block)
        U, S, Vh = torch.linalg.svd(weight)  # reference: LAPACK's float64 SVD of the block, independent of ours
        U_r, V_r = layer.nora_U["default"][slot].double(), layer.nora_Vt["default"][slot].double().T
        # The kept directions are the top-r singular subspaces (projectors agree; signs are a convention).
        torch.testing.assert_close(U_r @ U_r.T, U[:, :R] @ U[:, :R].T, atol=1e-5, rtol=0)
        torch.testing.assert_close(V_r @ V_r.T, Vh[:R].T @ Vh[:R], atol=1e-5, rtol=0)
        # Sign convention: the largest-magnitude entry of every u_i is positive.
        assert (U_r.gather(0, U_r.abs().argmax(0, keepdim=True)) > 0).all()
        # The initial inner product is Σ_r restricted to its top inner_r directions, and equals C₀.
        inner = layer.nora_inner_A["default"][slot] @ layer.nora_inner_B["default"][slot]
        expected = torch.diag(torch.cat([S[:INNER], torch.zeros(R - INNER, dtype=torch.float64)])).float()
        torch.testing.assert_close(inner, expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(inner, layer.nora_core0["default"][slot])


def test_parameter_count_is_2_r_inner_r_per_block():
    model = get_peft_model(tiny_gpt2(), qv_config(r=6, inner_r=3))
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * (2 * 6 * 3)  # 2 layers x (q, v)
    model = get_peft_model(tiny_llama(), NoraConfig(r=5, inner_r=4, target_modules=["q_proj", "k_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * (2 * 5 * 4)


def test_recomputed_factors_refuse_other_base_weights_stored_ones_do_not(tmp_path, token_ids):
    get_peft_model(tiny_gpt2(seed=0), qv_config()).save_pretrained(tmp_path / "recompute")
    other = tiny_gpt2(seed=1)  # same shapes, different weights
    with pytest.raises(ValueError, match="not the weights it was trained on"):
        PeftModel.from_pretrained(other, tmp_path / "recompute")
    assert not nora_layers(other)
    stored = get_peft_model(tiny_gpt2(seed=0), qv_config(store_outer_factors=True, init_weights=False))
    with torch.no_grad():
        delta = stored.base_model.model.transformer.h[0].attn.c_attn.get_delta_weight("default")
    stored.save_pretrained(tmp_path / "store")
    loaded = PeftModel.from_pretrained(tiny_gpt2(seed=1), tmp_path / "store")
    assert torch.equal(loaded.base_model.model.transformer.h[0].attn.c_attn.get_delta_weight("default"), delta)


def test_bitsandbytes_8bit_base_uses_the_dequantized_weight(tmp_path, token_ids):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with torch.no_grad():
        expected = base(token_ids).logits
    model = get_peft_model(base, NoraConfig(r=4, inner_r=2, target_modules=["q_proj", "v_proj"]))
    layer = nora_layers(model)[0]
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, expected)
        dequantized = layer.get_base_weight().double()
    sigma = torch.linalg.svdvals(dequantized)[:2].float()
    torch.testing.assert_close(torch.diagonal(layer.nora_core0["default"][0])[:2], sigma, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [  # NoRA's own settings; the shared ones: test_tuner_battery.py
    (dict(inner_r=0), "inner_r must be an integer >= 1"),
    (dict(r=4, inner_r=5), "inner_r must be <= r"),
    (dict(svd_method="qr"), "svd_method must be one of"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoraConfig(target_modules=["q_proj"], **kwargs)


def test_rank_larger_than_a_layer_is_an_error_naming_it():
    base = tiny_llama()  # k_proj is 32 -> 16 (2 kv heads of 8)
    with pytest.raises(ValueError, match=r"r=20 exceeds the rank of layer 'model.layers.0.self_attn.k_proj'.*16x32"):
        get_peft_model(base, NoraConfig(r=20, inner_r=2, target_modules=["q_proj", "k_proj"]))
    assert not nora_layers(base)


def test_adapter_config_round_trip(tmp_path):
    get_peft_model(tiny_gpt2(), qv_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "NORA" and len(saved["weight_fingerprint"]) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lower_precision_copy_of_the_base_is_accepted_with_a_warning_another_base_is_not(tmp_path, dtype):
    trained = get_peft_model(tiny_gpt2(seed=0), qv_config(init_weights=False))
    with torch.no_grad():
        delta = trained.base_model.model.transformer.h[0].attn.c_attn.get_delta_weight("default")
    trained.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=f"base weights are {dtype}, a rounded copy"):
        loaded = PeftModel.from_pretrained(tiny_gpt2(seed=0).to(dtype), tmp_path)
    with torch.no_grad():
        recomputed = loaded.base_model.model.transformer.h[0].attn.c_attn.get_delta_weight("default")
    # The SVD of the rounded weights: the update agrees with the trained one to about the dtype's precision.
    torch.testing.assert_close(recomputed.float(), delta, rtol=0, atol=0.05 * delta.abs().max().item())
    other = tiny_gpt2(seed=1).to(dtype)
    with pytest.raises(ValueError, match=f"not the weights it was trained on.*allowing for {dtype} rounding"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not nora_layers(other)
