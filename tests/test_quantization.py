"""Quantized NOLA coefficients (and LoRA factors): the pure quantizer and bit packing checked against hand-computed
values and an independent bit-packing reference; QAT gradients against the gradient of an unquantized model holding
the quantized values; storage against the size formula and the in-memory model's outputs."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

import peft_nola  # noqa: F401  (registers NOLA)
from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, lora_quantization_aware, quantize_coefficients, quantize_lora
from peft_nola.quantization import (
    HEADER_SUFFIX,
    SCHEMES,
    dequantize,
    fake_quantize,
    pack_codes,
    pack_tensor,
    quantize,
    unpack_codes,
    unpack_tensor,
)

from .conftest import tiny_gpt2

ALL_BITS = range(2, 9)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """LSB-first packing with Python integers: code i occupies bits [i*bits, (i+1)*bits) of a little-endian stream."""
    stream = 0
    for i, code in enumerate(codes):
        stream |= code << (i * bits)
    return list(stream.to_bytes(math.ceil(len(codes) * bits / 8), "little"))


def nola_gpt2(num_basis=40, r=4, **kwargs):
    config = NolaConfig(r=r, num_basis_A=num_basis, num_basis_B=num_basis, target_modules=["c_attn"],
                        output_slices=GPT2_QV_SLICES, fan_in_fan_out=True, task_type="CAUSAL_LM",
                        init_weights=False, **kwargs)
    return get_peft_model(tiny_gpt2(), config)


def coefficient_tensors(model, adapter_name="default"):
    for layer in model.modules():
        if isinstance(layer, NolaLayer):
            yield layer.nola_coef_A[adapter_name]
            yield layer.nola_coef_B[adapter_name]


# --------------------------------------------------------------------------------------------------- pure math
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("length", [1, 3, 7, 13, 1001])
def test_pack_matches_reference_and_unpacks(bits, length):
    codes = torch.randint(0, 2**bits, (length,), generator=torch.Generator().manual_seed(bits * 1000 + length))
    packed = pack_codes(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert len(packed) == math.ceil(length * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, length), codes.to(torch.uint8))


def test_pack_rejects_codes_out_of_range_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="4 bytes"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 3, 10)  # 10 codes * 3 bits = 30 bits = 4 bytes


def test_hand_computed_two_bit_example():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    # affine: range [-1, 2] in 3 steps of 1; 0.5 sits halfway between codes 1 and 2 (round half to even -> 2)
    q = quantize(x, 2, "affine")
    assert (float(q.scale), float(q.offset), q.codes.tolist()) == (1.0, -1.0, [0, 1, 2, 3])
    assert dequantize(q).tolist() == [-1.0, 0.0, 1.0, 2.0]
    # symmetric: 3 levels {-2, 0, 2}; -1 and 0.5 are at half a step or less from 0... -1 is exactly halfway -> 0 (even)
    q = quantize(x, 2, "symmetric")
    assert (float(q.scale), float(q.offset)) == (2.0, -2.0)
    assert dequantize(q).tolist() == [-2.0, 0.0, 0.0, 2.0]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_error_is_at_most_half_a_step_and_levels_are_few(bits, scheme):
    generator = torch.Generator().manual_seed(bits)
    for x in (torch.randn(257, generator=generator) * 0.03, torch.rand(64, generator=generator) - 0.2,
              torch.randn(3, 5, generator=generator)):
        q = quantize(x, bits, scheme)
        values = dequantize(q)
        step = float(q.scale)
        assert step > 0
        assert float((values - x).abs().max()) <= 0.5 * step * (1 + 1e-4)
        # the range [min(x,0), max(x,0)] (affine) or [-max|x|, max|x|] (symmetric) takes all levels, and no more
        levels = 2**bits - (1 if scheme == "symmetric" else 0)
        span = float(x.max().clamp(min=0) - x.min().clamp(max=0)) if scheme == "affine" else 2 * float(x.abs().max())
        assert span / (levels - 1) <= step <= span / (levels - 1) * (1 + 2**-15)
        assert len(torch.unique(values)) <= levels
        assert torch.equal(values, q.offset + q.codes.float() * q.scale)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_requantizing_quantized_values_changes_nothing(bits, scheme):
    # What makes a saved (re-quantized) adapter reproduce the in-memory one exactly.
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(int(torch.randint(1, 200, (1,), generator=generator)), generator=generator)
        x = x * 10.0 ** float(torch.randint(-5, 2, (1,), generator=generator))
        values = dequantize(quantize(x, bits, scheme))
        again = quantize(values, bits, scheme)
        assert torch.equal(dequantize(again), values)


def test_all_zero_tensor_stays_zero():
    for scheme in SCHEMES:
        payload, header = pack_tensor(torch.zeros(2, 5), 3, scheme)
        assert torch.equal(unpack_tensor(payload, header), torch.zeros(2, 5))


@pytest.mark.parametrize("bad", [1, 9, 0, -3, 3.0, "4", True, None, 2.5])
def test_bad_bit_widths_are_clear_errors(bad):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        quantize(torch.ones(3), bad)
    with pytest.raises(ValueError, match="integer from 2 to 8"):
        quantize_coefficients(nola_gpt2(), bad)
    if bad is not None:  # coefficient_bits=None is valid: not quantized
        with pytest.raises(ValueError, match="coefficient_bits must be an integer from 2 to 8"):
            NolaConfig(target_modules=["c_attn"], coefficient_bits=bad)


def test_config_validation():
    with pytest.raises(ValueError, match="quantization_aware=True needs coefficient_bits"):
        NolaConfig(target_modules=["c_attn"], quantization_aware=True)
    with pytest.raises(ValueError, match="quantization_scheme must be one of"):
        NolaConfig(target_modules=["c_attn"], coefficient_bits=4, quantization_scheme="log")


def test_straight_through_gradient_is_the_identity():
    x = torch.randn(50, requires_grad=True)
    weights = torch.randn(50)
    y = fake_quantize(x, 3)
    assert torch.equal(y.detach(), dequantize(quantize(x, 3)))
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)


# ------------------------------------------------------------------------------------------------ NOLA adapters
def test_qat_gradients_reach_the_shadow_coefficients(token_ids):
    qat = nola_gpt2(coefficient_bits=3, quantization_aware=True)
    # Reference: an unquantized adapter whose coefficients are the QAT adapter's quantized ones.
    plain = nola_gpt2()
    with torch.no_grad():
        for shadow, coef in zip(coefficient_tensors(qat), coefficient_tensors(plain)):
            coef.copy_(dequantize(quantize(shadow, 3)))
            assert not torch.equal(coef, shadow)  # the shadows really are full precision
    out_qat, out_plain = qat(token_ids).logits, plain(token_ids).logits
    assert torch.equal(out_qat, out_plain)
    out_qat.pow(2).mean().backward()
    out_plain.pow(2).mean().backward()
    shadows = list(coefficient_tensors(qat))
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in shadows)
    for shadow, coef in zip(shadows, coefficient_tensors(plain)):
        torch.testing.assert_close(shadow.grad, coef.grad, rtol=1e-5, atol=1e-8)


def test_qat_with_the_trainer_updates_shadows_and_saves_quantized(tmp_path, token_ids):
    model = nola_gpt2(coefficient_bits=2, quantization_aware=True)
    before = [p.detach().clone() for p in coefficient_tensors(model)]
    data = [{"input_ids": token_ids[i], "labels": token_ids[i]} for i in range(3)] * 4
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = list(coefficient_tensors(model))
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(len(torch.unique(a.detach())) > 4 for a in after)  # shadows are not on the 2-bit grid
    model.eval()
    with torch.no_grad():
        expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    coefficient_keys = [k for k in stored if k.endswith(("nola_coef_A", "nola_coef_B"))]
    assert coefficient_keys and all(stored[k].dtype == torch.uint8 for k in coefficient_keys)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, expected)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ptq_save_and_load_reproduce_the_quantized_model_exactly(tmp_path, token_ids, bits, scheme):
    model = nola_gpt2()
    with torch.no_grad():
        full_precision = model(token_ids).logits
    summary = quantize_coefficients(model, bits, scheme=scheme)
    assert summary["tensors"] == 4 and summary["coefficients"] == 2 * 2 * (40 + 40)
    for coef in coefficient_tensors(model):
        assert len(torch.unique(coef.detach())) <= 2**bits
    with torch.no_grad():
        expected = model(token_ids).logits
    assert not torch.equal(expected, full_precision)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["coefficient_bits"], config["quantization_scheme"]) == (bits, scheme)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, expected)


def test_config_with_bits_saves_the_ptq_quantized_coefficients(tmp_path, token_ids):
    model = nola_gpt2(coefficient_bits=4)  # trains in full precision, saves quantized
    reference = nola_gpt2()
    quantize_coefficients(reference, 4)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, reference(token_ids).logits)
        assert not torch.equal(model(token_ids).logits, reference(token_ids).logits)  # in memory: full precision


def test_four_bit_file_size_is_half_a_byte_per_coefficient(tmp_path):
    k = l = 4096
    model = nola_gpt2(num_basis=k)
    num_coefficients = 2 * 2 * (k + l)  # 2 layers x (q, v) blocks x (k + l)
    model.save_pretrained(tmp_path / "fp32")
    quantize_coefficients(model, 4)
    model.save_pretrained(tmp_path / "q4")
    stored = load_file(tmp_path / "q4" / "adapter_model.safetensors")
    headers = [v for key, v in stored.items() if key.endswith(HEADER_SUFFIX)]
    assert len(headers) == 4
    expected = num_coefficients * 0.5 + sum(h.numel() * h.element_size() for h in headers)
    size = (tmp_path / "q4" / "adapter_model.safetensors").stat().st_size
    assert expected <= size <= 1.10 * expected
    fp32_size = (tmp_path / "fp32" / "adapter_model.safetensors").stat().st_size
    assert fp32_size >= num_coefficients * 4 and size < fp32_size / 7


def test_unquantized_files_are_unchanged(tmp_path):
    model = nola_gpt2()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not {"coefficient_bits", "quantization_aware", "quantization_scheme"} & set(config)
    # The adapter file is exactly what safetensors writes for the float32 coefficients alone.
    expected = {
        f"base_model.model.transformer.h.{i}.attn.c_attn.nola_coef_{f}": getattr(
            model.base_model.model.transformer.h[i].attn.c_attn, f"nola_coef_{f}")["default"].detach()
        for i in range(2) for f in "AB"
    }
    save_file(expected, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_corrupt_or_mismatched_packed_files_are_clear_errors(tmp_path):
    model = nola_gpt2(coefficient_bits=4)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    # copies: safetensors 0.4 may map the tensors onto the file, which is overwritten below
    stored = {key: value.clone() for key, value in load_file(path).items()}
    key = "base_model.model.transformer.h.0.attn.c_attn.nola_coef_A"
    truncated = {**stored, key: stored[key][:-1]}
    save_file(truncated, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not match the weights_checksum"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    # Without a recorded checksum (a file written by hand or by an older version) the packed header still catches it.
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "weights_checksum": None}))
    with pytest.raises(ValueError, match=r"does not match its header.*takes 40 bytes.*shape \(39,\)"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    save_file(stored, path, metadata={"format": "pt"})
    config_path.write_text(json.dumps({**config, "coefficient_bits": 3}))
    with pytest.raises(ValueError, match="stored at 4 bits but the adapter config says coefficient_bits=3"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    del config["coefficient_bits"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no coefficient_bits"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_quantize_coefficients_needs_a_nola_adapter():
    lora = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="needs a model with a NOLA adapter named 'default'"):
        quantize_coefficients(lora, 4)


# ---------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_lora_puts_each_factor_on_a_grid(bits, token_ids):
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(), config)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        before = model(token_ids).logits
    summary = quantize_lora(model, bits)
    assert summary["tensors"] == 4 and summary["parameters"] == sum(p.numel() for p in originals.values())
    for name, param in model.named_parameters():
        if name in originals:
            x = originals[name]
            step = float(x.max().clamp(min=0) - x.min().clamp(max=0)) / (2**bits - 1)
            assert len(torch.unique(param.detach())) <= 2**bits
            assert float((param.detach() - x).abs().max()) <= 0.5 * step * (1 + 1e-4)
    with torch.no_grad():
        assert not torch.equal(model(token_ids).logits, before)
    with pytest.raises(ValueError, match="found no lora_A/lora_B weights of an adapter named 'other'"):
        quantize_lora(model, bits, adapter_name="other")


def test_lora_quantization_aware_training_then_bake(token_ids):
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(), config)
    # Reference: a plain LoRA model holding the quantized weights.
    plain = get_peft_model(tiny_gpt2(), config)
    plain.load_state_dict(model.state_dict())
    quantize_lora(plain, 3)
    assert lora_quantization_aware(model, 3) == 4
    shadows = {n: p for n, p in model.named_parameters() if n.endswith("parametrizations.weight.original")}
    assert len(shadows) == 4 and all(p.requires_grad for p in shadows.values())
    out, expected = model(token_ids).logits, plain(token_ids).logits
    assert torch.equal(out, expected)
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    plain_grads = [p.grad for n, p in plain.named_parameters() if "lora_" in n]
    for grad, reference in zip([p.grad for p in shadows.values()], plain_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-8)
    quantize_lora(model, 3)  # bake: plain weights again, holding what the forward pass used
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, expected)
