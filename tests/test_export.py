"""Exporting NOLA/NoRA adapters as LoRA adapters (peft_nola.export).

The main property: stock peft, in a process that never imports peft_nola, loads each exported adapter onto the base
model and gives the NOLA/NoRA model's logits (float32, within 1e-5). All cases are exported here and loaded by one
subprocess (its start-up is the expensive part).
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_nola
from peft_nola import GPT2_QV_SLICES, NolaConfig, NoraConfig, export_lora
from peft_nola.export import ExportError, main

from .conftest import REPO_ROOT, TinyCNN, seeded, tiny_gpt2, tiny_llama

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5

# Run with the worktree on sys.path only for tests.conftest (TinyCNN); nothing imports peft_nola, which is checked.
LOADER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
cases = json.load(open(sys.argv[2]))
outputs = {}
for case in cases:
    if case["base_kind"] == "tinycnn":
        from tests.conftest import TinyCNN
        base = TinyCNN()
        base.load_state_dict(load_file(case["base"]))
    else:
        import transformers
        base = getattr(transformers, case["base_kind"]).from_pretrained(case["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base.eval(), case["lora"]).eval()
    assert type(model.base_model).__name__ == "LoraModel", type(model.base_model)
    inputs = load_file(case["inputs"])["x"]
    with torch.no_grad():
        out = model(inputs)
    outputs[case["name"]] = (out.logits if hasattr(out, "logits") else out).contiguous()
assert not any(name == "peft_nola" or name.startswith("peft_nola.") for name in sys.modules)
save_file(outputs, sys.argv[3])
"""


def nola_llama(**overrides):
    kwargs = dict(r=4, num_basis_A=40, num_basis_B=40, init_weights=False, target_modules=LLAMA_ALL)
    kwargs.update(overrides)
    return NolaConfig(**kwargs)


def logits(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def token_ids_mod():
    return torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, token_ids_mod):
    """Every case exported: name -> {reference logits, base logits, report, loaded logits (from the subprocess)}."""
    root = tmp_path_factory.mktemp("export")
    ids = token_ids_mod
    cases, results = [], {}

    def add(name, base_kind, base, lora_dir, inputs, reference, base_logits, report):
        save_file({"x": inputs.contiguous()}, root / f"{name}_inputs.safetensors")
        cases.append({"name": name, "base_kind": base_kind, "base": str(base), "lora": str(lora_dir),
                      "inputs": str(root / f"{name}_inputs.safetensors")})
        results[name] = {"reference": reference, "base": base_logits, "report": report, "dir": lora_dir}

    # LLaMA, all 7 projections, exported from its directory by the command line with only the base's config.json:
    # NOLA's basis comes from the seed, no base weights are read.
    tiny_llama().save_pretrained(root / "llama")
    (root / "llama_config_only").mkdir()
    (root / "llama_config_only" / "config.json").write_text((root / "llama" / "config.json").read_text())
    model = get_peft_model(tiny_llama(), nola_llama())
    model.save_pretrained(root / "llama_nola")
    assert main([str(root / "llama_nola"), str(root / "llama_lora"), "--base", str(root / "llama_config_only")]) == 0
    report = json.loads((root / "llama_lora" / "export_report.json").read_text())
    add("llama_all7", "LlamaForCausalLM", root / "llama", root / "llama_lora", ids, logits(model, ids),
        logits(tiny_llama(), ids), report)

    # Only layer 1 of LLaMA (layers_to_transform): target_modules becomes the full module names, since the short
    # names would also match layer 0.
    model = get_peft_model(tiny_llama(), nola_llama(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                    layers_pattern="layers"))
    report = export_lora(model, root / "layer1_lora")
    add("llama_layer1", "LlamaForCausalLM", root / "llama", root / "layer1_lora", ids, logits(model, ids),
        logits(tiny_llama(), ids), report)

    # GPT-2's fused c_attn with the q and v thirds adapted, two adapters in the model: the second one is exported.
    tiny_gpt2().save_pretrained(root / "gpt2")
    qv = dict(r=4, num_basis_A=40, num_basis_B=40, init_weights=False, target_modules=["c_attn"],
              output_slices=GPT2_QV_SLICES, fan_in_fan_out=True)
    model = get_peft_model(tiny_gpt2(), NolaConfig(**qv))
    model.add_adapter("second", NolaConfig(**qv, basis_seed=7))
    model.set_adapter("second")
    report = export_lora(model, root / "gpt2_lora", adapter_name="second")
    add("gpt2_qv", "GPT2LMHeadModel", root / "gpt2", root / "gpt2_lora", ids, logits(model, ids),
        logits(tiny_gpt2(), ids), report)

    # Post-training 3-bit coefficients and a trained lm_head (modules_to_save), exported from the directory: the
    # reference is what peft loads from that directory (the dequantized coefficients).
    model = get_peft_model(tiny_llama(), nola_llama(coefficient_bits=3, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    float_logits = logits(model, ids)
    model.save_pretrained(root / "quant_nola")
    reloaded = PeftModel.from_pretrained(tiny_llama(), root / "quant_nola")
    assert (logits(reloaded, ids) - float_logits).abs().max() > 1e-3  # the quantization matters
    with pytest.warns(UserWarning, match="vllm: vLLM rejects modules_to_save"):
        report = export_lora(root / "quant_nola", root / "quant_lora", base_model=root / "llama")
    add("quantized", "LlamaForCausalLM", root / "llama", root / "quant_lora", ids, logits(reloaded, ids),
        logits(tiny_llama(), ids), report)

    # NoRA in both storage modes, exported from their directories.
    for name, store in (("nora_stored", True), ("nora_recomputed", False)):
        config = NoraConfig(r=6, inner_r=2, nora_alpha=3.0, init_weights=False, store_outer_factors=store,
                            target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(tiny_llama(), config)
        model.save_pretrained(root / f"{name}_adapter")
        base = root / ("llama_config_only" if store else "llama")  # stored factors: no weights needed
        report = export_lora(root / f"{name}_adapter", root / f"{name}_lora", base_model=base)
        add(name, "LlamaForCausalLM", root / "llama", root / f"{name}_lora", ids, logits(model, ids),
            logits(tiny_llama(), ids), report)

    # Conv2d (3 -> 8 channels, 3x3): r=2 exports at kh·r = 6, r=4 at out = 8 (kh·r = 12 would be larger).
    save_file(seeded(TinyCNN).state_dict(), root / "cnn.safetensors")
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for r in (2, 4):
        model = get_peft_model(seeded(TinyCNN), NolaConfig(r=r, num_basis_A=20, num_basis_B=20, init_weights=False,
                                                           target_modules=["conv0"]))
        report = export_lora(model, root / f"conv_r{r}_lora")
        add(f"conv_r{r}", "tinycnn", root / "cnn.safetensors", root / f"conv_r{r}_lora", images, logits(model, images),
            logits(seeded(TinyCNN), images), report)

    (root / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, "-c", LOADER, str(REPO_ROOT), str(root / "cases.json"), str(root / "out.safetensors")]
    subprocess.run(command, check=True, cwd=root, timeout=600)
    loaded = load_file(root / "out.safetensors")
    for name in results:
        results[name]["loaded"] = loaded[name]
    return results


CASES = ["llama_all7", "llama_layer1", "gpt2_qv", "quantized", "nora_stored", "nora_recomputed", "conv_r2", "conv_r4"]


@pytest.mark.parametrize("name", CASES)
def test_stock_peft_reproduces_logits(exported, name):
    case = exported[name]
    assert (case["reference"] - case["base"]).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(case["loaded"], case["reference"], atol=ATOL, rtol=0)
    config = json.loads((case["dir"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == case["report"]["rank"]


def test_exported_shapes_and_ranks(exported):
    """Rank r for plain layers, S·r for the fused GPT-2 slices, the exact conv ranks; tensors named as peft names
    them; the fused lora_B zero outside the adapted q and v thirds."""
    assert exported["llama_all7"]["report"]["rank"] == 4
    assert exported["nora_stored"]["report"]["rank"] == 6
    assert exported["gpt2_qv"]["report"]["rank"] == 8
    assert [exported[f"conv_r{r}"]["report"]["rank"] for r in (2, 4)] == [6, 8]
    tensors = load_file(exported["gpt2_qv"]["dir"] / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{f}.weight" for i in (0, 1)
                            for f in "AB"}
    lora_B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert lora_B.shape == (96, 8)
    assert not lora_B[32:64].any() and not lora_B[:32, 4:].any() and not lora_B[64:, :4].any()
    config = json.loads((exported["gpt2_qv"]["dir"] / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]
    config = json.loads((exported["llama_all7"]["dir"] / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(LLAMA_ALL)
    config = json.loads((exported["llama_layer1"]["dir"] / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [f"model.layers.1.self_attn.{p}_proj" for p in "qv"]
    config = json.loads((exported["quantized"]["dir"] / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    with safe_open(str(exported["quantized"]["dir"] / "adapter_model.safetensors"), "pt") as handle:
        assert "base_model.model.lm_head.weight" in handle.keys()


# ------------------------------------------------------------------------------------------------- vLLM's rules
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


def vllm_load_errors(adapter_dir, expected_modules, max_lora_rank):
    """What vLLM's loader checks before touching a GPU, transcribed from its source: PEFTHelper.from_dict (required
    r, lora_alpha, target_modules; r > 0), PEFTHelper.validate_legal (modules_to_save None, no DoRA, bias 'none',
    r <= max_lora_rank), parse_fine_tuned_lora_name and LoRAModel.from_local_checkpoint's unexpected-module check."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    errors = []
    missing = {"r", "lora_alpha", "target_modules"} - set(config)
    if missing:
        return [f"Missing required configuration fields: {missing}"]
    if config["r"] <= 0:
        errors.append("LoRA rank `r` must be a positive integer")
    if config.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS or config["r"] > max_lora_rank:
        errors.append(f"LoRA rank {config['r']} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    for name in names:
        if re.search(r"\.(embed_tokens|lm_head)\.", name + "."):  # is_base_embedding_weights: skipped by vLLM
            continue
        parts = name.split(".")
        if not (name.startswith("base_model.model.") and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B")):
            errors.append(f"{name} is unsupported LoRA weight")
        elif parts[-3] not in expected_modules:
            errors.append(f"expected target modules in {expected_modules} but received {'.'.join(parts[2:-2])}")
    return errors


def test_vllm_rules(exported):
    llama_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    report = exported["llama_all7"]["report"]
    assert report["consumers"]["vllm"]["accepts"] is True
    max_rank = report["consumers"]["vllm"]["max_lora_rank"]
    assert vllm_load_errors(exported["llama_all7"]["dir"], llama_modules, max_rank) == []
    assert report["consumers"]["vllm"]["max_lora_rank"] == 8  # the smallest allowed value >= r = 4
    assert vllm_load_errors(exported["llama_all7"]["dir"], llama_modules, 1)  # rank 4 > 1: vLLM's error
    report = exported["quantized"]["report"]
    assert report["consumers"]["vllm"]["accepts"] is False
    errors = vllm_load_errors(exported["quantized"]["dir"], llama_modules, 16)
    assert "vLLM only supports modules_to_save being None." in errors
    for name in ("gpt2_qv", "conv_r2"):  # GPT-2 has no LoRA in vLLM; convolutions have none anywhere but peft
        assert exported[name]["report"]["consumers"]["vllm"]["accepts"] is False
        assert exported[name]["report"]["consumers"]["peft"]["accepts"] is True
    assert exported["conv_r2"]["report"]["consumers"]["tgi"]["accepts"] is False
    assert exported["quantized"]["report"]["consumers"]["llama.cpp"]["accepts"] is False


# ------------------------------------------------------------------------------------------------------- GGUF
# llama.cpp's names for a LLaMA block's weights (src/llama-arch.cpp, LLM_TENSOR_NAMES for LLM_ARCH_LLAMA).
LLAMA_CPP_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def unpermute(rows, n_head):
    """Inverse of llama.cpp's converter's per-head q/k row order (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_gguf_matches_llama_cpp_loader(tmp_path, token_ids):
    """The checks of llama.cpp's src/llama-adapter.cpp (general.type, architecture, adapter.type, alpha; every
    lora_a/lora_b pair names a base tensor, ne[0] of lora_a = the base's ne[0], ne[1] of lora_b = the base's ne[1],
    lora_a ne[1] = lora_b ne[0]) and the values: alpha/rank · lora_b @ lora_a, q/k rows restored, is NOLA's ΔW."""
    gguf = pytest.importorskip("gguf")
    base = tiny_llama()
    config = base.config
    model = get_peft_model(base, nola_llama())
    report = export_lora(model, tmp_path, format="gguf")
    assert report["consumers"]["llama.cpp"]["accepts"] is True
    reader = gguf.GGUFReader(tmp_path / "adapter_model.gguf")

    def field(key):
        value = reader.fields[key]
        return bytes(value.parts[-1]).decode() if value.types[0] == gguf.GGUFValueType.STRING else value.parts[-1][0]

    assert field("general.type") == "adapter" and field("general.architecture") == "llama"
    assert field("adapter.type") == "lora"
    assert reader.fields["adapter.lora.alpha"].types[0] == gguf.GGUFValueType.FLOAT32
    alpha = float(field("adapter.lora.alpha"))
    tensors = {t.name: t for t in reader.tensors}
    layers = {layer.module_key: layer for layer in model.modules() if isinstance(layer, peft_nola.NolaLayer)}
    expected = {f"blk.{i}.{LLAMA_CPP_NAMES[p]}.weight.lora_{ab}" for i in range(2) for p in LLAMA_ALL for ab in "ab"}
    assert set(tensors) == expected
    for key, layer in layers.items():
        i, proj = int(key.split(".")[2]), key.rsplit(".", 1)[-1]
        name = f"blk.{i}.{LLAMA_CPP_NAMES[proj]}.weight"
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        base_ne = list(layer.get_base_layer().weight.shape[::-1])  # ggml's ne of the base weight: [in, out]
        assert a.shape[0] == base_ne[0] and b.shape[1] == base_ne[1] and a.shape[1] == b.shape[0]
        assert a.tensor_type == gguf.GGMLQuantizationType.F32
        lora_a = torch.from_numpy(a.data.copy()).reshape(int(a.shape[1]), int(a.shape[0]))
        lora_b = torch.from_numpy(b.data.copy()).reshape(int(b.shape[1]), int(b.shape[0]))
        delta = alpha / lora_b.shape[1] * lora_b @ lora_a
        if proj in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if proj == "q_proj" else config.num_key_value_heads
            delta = unpermute(delta, heads)
        torch.testing.assert_close(delta, layer.get_delta_weight("default"), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- refusals
def test_refusals_say_why(tmp_path):
    out = tmp_path / "out"
    model = get_peft_model(tiny_llama(), nola_llama())
    with pytest.raises(ExportError, match=r"no adapter named 'other'; its adapters are \['default'\]"):
        export_lora(model, out, adapter_name="other")
    with pytest.raises(ExportError, match="format must be one of"):
        export_lora(model, out, format="onnx")
    with pytest.raises(ExportError, match="trains biases"):
        export_lora(get_peft_model(tiny_llama(), nola_llama(bias="all")), out)
    model.merge_adapter()
    with pytest.raises(ExportError, match="merged into the base weights.*unmerge_adapter"):
        export_lora(model, out)
    model.unmerge_adapter()
    cnn = get_peft_model(seeded(TinyCNN), NolaConfig(r=2, num_basis_A=8, num_basis_B=8, target_modules=["conv1"]))
    with pytest.raises(ExportError, match="padding_mode='reflect'"):
        export_lora(cnn, out)
    with pytest.raises(ExportError, match="LORA adapter, not NOLA or NoRA"):
        export_lora(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])), out)
    gpt2 = get_peft_model(tiny_gpt2(), NolaConfig(r=2, num_basis_A=8, num_basis_B=8, target_modules=["c_attn"],
                                                  fan_in_fan_out=True))
    with pytest.raises(ExportError, match="base model's type is 'gpt2'.*Conv1D"):
        export_lora(gpt2, out, format="gguf")
    with pytest.raises(ExportError, match="modules_to_save=\\['lm_head'\\].*llama.cpp's converter"):
        export_lora(get_peft_model(tiny_llama(), nola_llama(modules_to_save=["lm_head"])), out, format="gguf")
    assert not out.exists()  # every refusal came before anything was written


def test_nora_recomputed_needs_its_base_weights(tmp_path):
    model = get_peft_model(tiny_llama(), NoraConfig(r=4, inner_r=2, init_weights=False, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")  # base_model_name_or_path of a model built from a config: none
    with pytest.raises(ExportError, match="needs the base weights it was trained on.*--base"):
        export_lora(tmp_path / "adapter", tmp_path / "out")
    tiny_llama(seed=1).save_pretrained(tmp_path / "other_base")
    with pytest.raises(ValueError, match="not the weights it was trained on"):
        export_lora(tmp_path / "adapter", tmp_path / "out", base_model=tmp_path / "other_base")
    with pytest.raises(SystemExit):  # the command line reports the refusal and exits non-zero
        main([str(tmp_path / "adapter"), str(tmp_path / "out")])


def test_quantization_aware_exports_the_quantized_coefficients(tmp_path, token_ids):
    """A QAT adapter's forward uses quantized coefficients; the exported LoRA computes that, not the float
    shadows (in-process stock peft LoRA on a fresh base)."""
    model = get_peft_model(tiny_llama(), nola_llama(coefficient_bits=2, quantization_aware=True))
    expected = logits(model, token_ids)
    float_shadows = get_peft_model(tiny_llama(), nola_llama())  # the same seed: the same coefficients, unquantized
    assert (logits(float_shadows, token_ids) - expected).abs().max() > 1e-3
    export_lora(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, token_ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_base(tmp_path, token_ids, bits):
    """An adapter on an 8-bit or 4-bit base exports the same factors; stock peft LoRA on that base reproduces the
    NOLA model's logits (train mode without dropout, as in test_nola_model: bitsandbytes' CPU repacking in eval)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes' 4-bit CPU matmul fails on inputs narrower than its 64-element block: a 64-wide model
    tiny_llama(hidden_size=64).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tmp_path / "base", quantization_config=quant).train()
    model = get_peft_model(load(), nola_llama(target_modules=["q_proj", "v_proj"])).train()
    with torch.no_grad():
        expected = model(token_ids).logits
    report = export_lora(model, tmp_path / "lora")
    assert report["layer_types"] == ["Linear8bitLt" if bits == 8 else "Linear4bit"]
    loaded = PeftModel.from_pretrained(load(), tmp_path / "lora").train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_gguf_row_order_matches_a_real_llama_cpp_file():
    """The q/k row permutation applied to lora_b is the one llama.cpp's converter applied to the base's weights: on
    the SmolLM2 GGUF (written by llama.cpp's converter), permuting transformers' un-permuted q/k weights gives back
    the file's tensors."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from peft_nola.export import _llama_permute
    from recipes.models import SMOLLM2_GGUF_FILE, smollm2_package_dir

    path = smollm2_package_dir() / SMOLLM2_GGUF_FILE
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    config = model.config
    for proj, name, heads in (("q_proj", "attn_q", config.num_attention_heads),
                              ("k_proj", "attn_k", config.num_key_value_heads)):
        raw = tensors[f"blk.0.{name}.weight"]
        from_file = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type).copy()).float()
        hf = getattr(model.model.layers[0].self_attn, proj).weight.detach()
        torch.testing.assert_close(_llama_permute(hf, heads), from_file.reshape(hf.shape), atol=1e-6, rtol=0)
        assert not torch.allclose(hf, from_file.reshape(hf.shape), atol=1e-3)  # the order does differ


LLAMA_CPP_SCRIPT = """
import sys
import numpy as np
import llama_cpp

model_path, lora_path, ids_path, out_path = sys.argv[1:5]
ids = np.load(ids_path).tolist()
kwargs = {"lora_path": lora_path} if lora_path != "-" else {}
llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, logits_all=True, verbose=False, n_threads=1, **kwargs)
llm.eval(ids)
np.save(out_path, np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""


def llama_cpp_python():
    """A Python with llama-cpp-python: $PEFT_NOLA_LLAMA_CPP_PYTHON, or this one if it has it."""
    import importlib.util
    import os

    if os.environ.get("PEFT_NOLA_LLAMA_CPP_PYTHON"):
        return os.environ["PEFT_NOLA_LLAMA_CPP_PYTHON"]
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    pytest.skip("llama-cpp-python is not installed: pip install llama-cpp-python (it compiles llama.cpp, ~13 min on "
                "2 cores) here or in another virtualenv and set PEFT_NOLA_LLAMA_CPP_PYTHON to its python")


@pytest.mark.slow
def test_llama_cpp_serves_the_exported_gguf_adapter_like_peft_nola(tmp_path):
    """SmolLM2 (its Q4_1 GGUF) with the exported adapter in llama.cpp against transformers + the NOLA adapter.

    llama.cpp computes the Q4_1 weights with quantized activations, transformers with the dequantized weights in
    float32, so the base logits already differ (the tolerance the quantization allows): the adapted logits must not
    differ more than 1.5x that, and the adapter's effect (adapted minus base logits) must be reproduced to within
    55% relative error (measured 42%; with a shorter prompt, exports without llama.cpp's q/k row order gave 74% and
    with a doubled lora alpha 107%, so the bound tells them apart)."""
    python = llama_cpp_python()
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.models import SMOLLM2_GGUF_FILE, smollm2_package_dir

    gguf_path = smollm2_package_dir() / SMOLLM2_GGUF_FILE
    base = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ids = tokenizer("name[The Eagle], eatType[coffee shop], food[French], area[riverside] ||",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hf_base = base(ids).logits[0].numpy()
    model = get_peft_model(base, NolaConfig(r=8, num_basis_A=1000, num_basis_B=1000, nola_alpha=4,
                                            target_modules=["q_proj", "v_proj"], init_weights=False)).eval()
    with torch.no_grad():
        hf_adapted = model(ids).logits[0].numpy()
    export_lora(model, tmp_path / "lora", format="gguf")
    np.save(tmp_path / "ids.npy", ids[0].numpy())
    cpp = {}
    for name, lora in (("base", "-"), ("adapted", str(tmp_path / "lora" / "adapter_model.gguf"))):
        subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, str(gguf_path), lora, str(tmp_path / "ids.npy"),
                        str(tmp_path / f"{name}.npy")], check=True, timeout=600)
        cpp[name] = np.load(tmp_path / f"{name}.npy")
    base_gap = np.abs(cpp["base"] - hf_base).mean()
    adapted_gap = np.abs(cpp["adapted"] - hf_adapted).mean()
    effect_hf, effect_cpp = hf_adapted - hf_base, cpp["adapted"] - cpp["base"]
    relative = np.linalg.norm(effect_cpp - effect_hf) / np.linalg.norm(effect_hf)
    print(f"base gap {base_gap:.3f}, adapted gap {adapted_gap:.3f}, effect {np.abs(effect_hf).mean():.3f} "
          f"(llama.cpp {np.abs(effect_cpp).mean():.3f}), relative effect error {relative:.3f}")
    assert np.abs(effect_hf).mean() > 2 * base_gap  # the adapter changes more than the quantization does
    assert adapted_gap <= 1.5 * base_gap
    assert relative < 0.55
