"""NoRA as a peft tuner, each property checked against an independent reference."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_nola import GPT2_QV_SLICES, NoraConfig, NoraLayer

from .conftest import assert_mixed_batch_matches_single_adapters, REPO_ROOT, TinyCNN, seeded, tiny_gpt2, tiny_llama, train_with_trainer

R, INNER = 8, 2


def qv_config(**kwargs):
    defaults = dict(r=R, inner_r=INNER, target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True,
                    task_type="CAUSAL_LM")
    return NoraConfig(**{**defaults, **kwargs})


def nora_layers(model):
    return [m for m in model.modules() if isinstance(m, NoraLayer)]


def c_attn_block(model_or_base, layer: int, block: int) -> torch.Tensor:
    """Block ``block`` (0 = q, 2 = v) of c_attn's weight as a (out, in) float64 matrix, read from the base model."""
    base = model_or_base.get_base_model() if hasattr(model_or_base, "get_base_model") else model_or_base
    conv = base.transformer.h[layer].attn.c_attn
    weight = getattr(conv, "base_layer", conv).weight.detach().double().T  # Conv1D stores (in, out)
    n = weight.shape[1]
    return weight[block * n : (block + 1) * n]


@pytest.mark.parametrize("make, make_config, make_input", [
    (tiny_gpt2, qv_config, lambda: {"input_ids": torch.randint(1, 96, (2, 7))}),
    (tiny_llama, lambda: NoraConfig(r=R, inner_r=INNER, target_modules=["q_proj", "v_proj", "down_proj"]),
     lambda: {"input_ids": torch.randint(1, 96, (2, 7))}),
    (lambda: seeded(TinyCNN), lambda: NoraConfig(r=4, inner_r=2, target_modules=["conv0", "conv1"]),
     lambda: {"x": torch.randn(2, 3, 8, 8)}),
], ids=["gpt2-qv", "llama", "cnn"])
def test_identity_at_init_and_gradients_reach_the_inner_lora(make, make_config, make_input):
    base, config, inputs = make(), make_config(), make_input()
    with torch.no_grad():
        expected = base(**inputs)
    expected = getattr(expected, "logits", expected)
    model = get_peft_model(base, config)
    out = model(**inputs)
    out = getattr(out, "logits", out)
    assert torch.equal(out.detach(), expected)
    out.pow(2).mean().backward()
    for layer in nora_layers(model):
        assert layer.nora_inner_A["default"].grad.abs().sum() > 0
        assert layer.nora_inner_B["default"].grad.abs().sum() > 0


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


def test_delta_weight_matches_the_definition():
    """ΔW = (nora_alpha / inner_r) · U_r (A B − C₀) V_rᵀ in the q and v blocks, zero in the k block."""
    model = get_peft_model(tiny_gpt2(), qv_config(init_weights=False, nora_alpha=3.0))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    n = 32
    expected = torch.zeros(3 * n, n)
    for slot, block in enumerate([0, 2]):
        U, Vt = layer.nora_U["default"][slot], layer.nora_Vt["default"][slot]
        A, B = layer.nora_inner_A["default"][slot].detach(), layer.nora_inner_B["default"][slot].detach()
        C0 = torch.diag(torch.linalg.svdvals(c_attn_block(model, 0, block))[:R].float() * (torch.arange(R) < INNER))
        expected[block * n : (block + 1) * n] = (3.0 / INNER) * U @ (A @ B - C0) @ Vt
    torch.testing.assert_close(layer.get_delta_weight("default"), expected.T, atol=1e-5, rtol=1e-4)


def test_parameter_count_is_2_r_inner_r_per_block():
    model = get_peft_model(tiny_gpt2(), qv_config(r=6, inner_r=3))
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * (2 * 6 * 3)  # 2 layers x (q, v)
    model = get_peft_model(tiny_llama(), NoraConfig(r=5, inner_r=4, target_modules=["q_proj", "k_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * (2 * 5 * 4)


def test_merge_unmerge_and_loss_decreases(tmp_path, token_ids):
    model = get_peft_model(tiny_llama(), NoraConfig(r=8, inner_r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    before, after = train_with_trainer(model, tmp_path, learning_rate=1e-1)
    assert after < before - 0.05
    originals = [layer.get_base_layer().weight.detach().clone() for layer in nora_layers(model)]
    with torch.no_grad():
        unmerged = model(token_ids).logits
        model.merge_adapter()
        merged = model(token_ids).logits
        model.unmerge_adapter()
    assert (merged - unmerged).abs().max() < 1e-5
    for layer, original in zip(nora_layers(model), originals):
        torch.testing.assert_close(layer.get_base_layer().weight, original, atol=1e-6, rtol=0)


LOAD = """
import sys, torch, peft_nola
from peft import PeftModel
sys.path.insert(0, sys.argv[3])
from tests.conftest import tiny_gpt2
model = PeftModel.from_pretrained(tiny_gpt2(), sys.argv[1]).eval()
with torch.no_grad():
    sys.stdout.buffer.write(model(torch.load(sys.argv[2])).logits.numpy().tobytes())
"""


@pytest.mark.parametrize("store", [False, True], ids=["recompute", "store"])
def test_save_load_in_a_new_process_both_storage_modes(tmp_path, token_ids, store):
    model = get_peft_model(tiny_gpt2(), qv_config(init_weights=False, store_outer_factors=store))
    with torch.no_grad():
        expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    kinds = {key.rsplit(".", 1)[-1] for key in tensors}
    if store:
        assert kinds == {"nora_inner_A", "nora_inner_B", "nora_U", "nora_Vt", "nora_core0"}
    else:
        assert kinds == {"nora_inner_A", "nora_inner_B"}
        assert sum(t.numel() for t in tensors.values()) == 2 * 2 * 2 * R * INNER
    torch.save(token_ids, tmp_path / "ids.pt")
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "adapter"), str(tmp_path / "ids.pt"),
                          str(REPO_ROOT)], capture_output=True, check=True).stdout
    assert out == expected.numpy().tobytes()


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


def test_mixed_batch_equals_per_sample_outputs(token_ids):
    model = get_peft_model(tiny_gpt2(), qv_config(init_weights=False), adapter_name="task1")
    model.add_adapter("task2", qv_config(init_weights=False, r=4, inner_r=4, nora_alpha=1.0))
    model.eval()
    assert_mixed_batch_matches_single_adapters(model, token_ids, ["task2", "task1", "__base__"])


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


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be an integer >= 1"),
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
