"""The Alpaca instruction recipe (recipes/instruct.py, recipes/alpaca_data.py): data checks, masking, configs, and a
CPU smoke run of a tiny 8-bit LLaMA on real Alpaca and MMLU data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from recipes.alpaca_data import (
    IGNORE_INDEX,
    DataFormatError,
    InstructionCollator,
    load_alpaca,
    split_train_validation,
    tokenize_example,
)
from recipes.cli import RecipeError

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("PEFT_NOLA_DATA_DIR") or REPO.parent / "shared" / "data")
ALPACA = DATA_ROOT / "alpaca" / "alpaca_5000.json"
GPT2_TOKENIZER = DATA_ROOT / "gpt2_tokenizer" / "tokenizer.json"
MMLU_VAL = DATA_ROOT / "mmlu" / "five_shot_mmlu_val.untruncated.json"
CONFIGS = REPO / "configs" / "alpaca"

needs_real_data = pytest.mark.skipif(
    not (ALPACA.is_file() and GPT2_TOKENIZER.is_file() and MMLU_VAL.is_file()),
    reason=f"shared Alpaca / MMLU / GPT-2 tokenizer data not found under {DATA_ROOT}",
)


def gpt2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def test_malformed_alpaca_records_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(
        "[\n"
        '  {"instruction": "Say hi", "input": "", "output": "hi"},\n'  # line 2: fine
        '  {"instruction": "No output here", "input": ""},\n'  # line 3
        '  {"instruction": 7, "output": "x"},\n'  # line 4
        '  {"instruction": "Two lines",\n   "input": "ok", "output": "fine"},\n'  # lines 5-6: fine
        '  "just a string"\n'  # line 7
        "]\n"
    )
    with pytest.raises(DataFormatError) as info:
        load_alpaca(path)
    message = str(info.value)
    assert "3 malformed" in message
    assert f"{path}:3: missing field 'output'" in message
    assert f"{path}:4: field 'instruction' must be a string" in message
    assert f"{path}:7:" in message
    assert f"{path}:2:" not in message and f"{path}:5:" not in message


def test_broken_json_names_the_line(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataFormatError, match=r"alpaca\.jsonl:2: invalid JSON"):
        load_alpaca(path)


def test_validation_split_is_disjoint_and_seeded():
    records = [{"instruction": f"task {i}", "input": "", "output": str(i)} for i in range(50)]
    train, val = split_train_validation(records, 10, seed=42)
    assert len(train) == 40 and len(val) == 10
    assert {r["output"] for r in train}.isdisjoint({r["output"] for r in val})
    assert split_train_validation(records, 10, seed=42) == (train, val)
    assert split_train_validation(records, 10, seed=1)[1] != val


@pytest.mark.skipif(not GPT2_TOKENIZER.is_file(), reason=f"GPT-2 tokenizer not found at {GPT2_TOKENIZER}")
def test_loss_is_on_the_response_only():
    tokenizer = gpt2_tokenizer()
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    example = tokenize_example(tokenizer, record, source_max_len=512, target_max_len=64)
    expected_prompt = (
        "<|endoftext|>Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a colour.\n\n### Response: "
    )
    prompt_ids = tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer("Blue.<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + target_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    with_input = tokenize_example(tokenizer, {**record, "input": "sky"}, 512, 64)
    assert "### Input:\nsky\n\n### Response: " in tokenizer.decode(with_input["input_ids"])
    on_source = tokenize_example(tokenizer, record, 512, 64, train_on_source=True)
    assert on_source["labels"] == on_source["input_ids"]


def test_collator_masks_padding_but_not_eos_when_pad_is_eos():
    eos = 9
    batch = InstructionCollator(pad_token_id=eos)(
        [{"input_ids": [1, 2, eos], "labels": [IGNORE_INDEX, 2, eos]}, {"input_ids": [3], "labels": [3]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, eos], [3, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, eos], [3, IGNORE_INDEX, IGNORE_INDEX]]


def test_unknown_config_key_and_bad_settings_fail_before_loading(tmp_path):
    from recipes.instruct import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("learnig_rate: 0.1\n")
    with pytest.raises(RecipeError, match="unknown config key 'learnig_rate'.*learning_rate"):
        main(["--config", str(bad)])
    with pytest.raises(RecipeError, match="quantization must be one of"):
        main(["--config", str(CONFIGS / "smoke.yaml"), "--quantization", "3bit"])
    with pytest.raises(RecipeError, match="data_path: 'missing/alpaca.json' not found"):
        main(["--config", str(CONFIGS / "smoke.yaml"), "--data_path", "missing/alpaca.json"])


def test_full_precision_is_selectable_from_the_command_line():
    from recipes.config import load_config
    from recipes.instruct import InstructConfig, validate_config

    config = load_config(InstructConfig, ["--config", str(CONFIGS / "smoke.yaml"), "--quantization", "none"])
    validate_config(config)  # the parser reads "none" as null; it must mean full precision, not an error
    assert config.quantization == "none"


PAPER_CELLS = {  # Table 5: NOLA r=16 with k=l=128/256/512, lr 1e-3, c=4; LoRA r=1, c=16, lr 2e-4
    "llama2_7b_nola.yaml": dict(method="nola", r=16, num_basis_A=128, num_basis_B=128, nola_alpha=4.0,
                                learning_rate=1e-3),
    "llama2_13b_nola.yaml": dict(method="nola", r=16, num_basis_A=256, num_basis_B=256, nola_alpha=4.0,
                                 learning_rate=1e-3),
    "llama2_70b_nola.yaml": dict(method="nola", r=16, num_basis_A=512, num_basis_B=512, nola_alpha=4.0,
                                 learning_rate=1e-3),
    "llama2_7b_lora.yaml": dict(method="lora", r=1, lora_alpha=16.0, learning_rate=2e-4),
    "llama2_13b_lora.yaml": dict(method="lora", r=1, lora_alpha=16.0, learning_rate=2e-4),
    "llama2_70b_lora.yaml": dict(method="lora", r=1, lora_alpha=16.0, learning_rate=2e-4),
}


@pytest.mark.parametrize("name", sorted(PAPER_CELLS))
def test_table5_configs_hold_the_paper_settings(name):
    from recipes.config import load_config
    from recipes.instruct import InstructConfig

    config = load_config(InstructConfig, ["--config", str(CONFIGS / name)])
    for key, value in PAPER_CELLS[name].items():
        assert getattr(config, key) == value, key
    assert config.quantization == "8bit"
    assert sorted(config.target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    assert config.effective_batch_size == 256
    assert config.num_train_epochs == 1 and config.lr_scheduler_type == "constant_with_warmup"
    assert config.mmlu_split == "test"


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_kbit_loading_quantizes_every_adapted_linear_layer(bits):
    if not GPT2_TOKENIZER.is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_TOKENIZER}")
    import bitsandbytes as bnb

    from recipes.config import load_config
    from recipes.models import load_base_model
    from recipes.instruct import InstructConfig

    config = load_config(InstructConfig, ["--config", str(CONFIGS / "smoke.yaml"),
                                          "--tokenizer_name_or_path", str(GPT2_TOKENIZER)])
    model, _ = load_base_model(config, bits)
    expected = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}[bits]
    linear = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if n.startswith("model.layers.0.")}
    assert all(linear[t] is expected for t in config.target_modules)
    assert model.get_input_embeddings().weight.dtype.is_floating_point  # embeddings stay unquantized


def _lora_count(n_layers, hidden, kv, inter, r):
    per_layer = (hidden + hidden) + (hidden + kv) * 2 + (hidden + hidden) + (hidden + inter) * 2 + (inter + hidden)
    return r * per_layer * n_layers


@needs_real_data
# NOLA is the CI smoke test; the LoRA baseline runs the same path and is marked slow to keep CI short.
@pytest.mark.parametrize("method", ["nola", pytest.param("lora", marks=pytest.mark.slow)])
def test_smoke_run_tiny_llama_8bit_on_real_alpaca_and_mmlu(tmp_path, method):
    """configs/alpaca/smoke.yaml end to end: results.json, results.md and an adapter holding the trained numbers."""
    from safetensors.torch import load_file

    from recipes.instruct import main

    overrides = ["--method", method] + (["--r", "1", "--learning_rate", "2e-4"] if method == "lora" else [])
    results = main(["--config", str(CONFIGS / "smoke.yaml"), "--output_dir", str(tmp_path),
                    "--tokenizer_name_or_path", str(GPT2_TOKENIZER), *overrides])
    smoke_config = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    smoke = smoke_config["model_config"]
    kv = smoke["hidden_size"] // smoke["num_attention_heads"] * smoke["num_key_value_heads"]
    if method == "nola":  # (k + l) coefficients per adapted matrix, 7 matrices per block
        expected = (32 + 32) * 7 * smoke["num_hidden_layers"]
    else:
        expected = _lora_count(smoke["num_hidden_layers"], smoke["hidden_size"], kv, smoke["intermediate_size"], 1)
    assert results["trainable_params"] == expected

    written = json.loads((tmp_path / "results.json").read_text())
    for key in ("recipe", "config", "method", "trainable_params", "adapter_bytes", "metrics", "base_metrics",
                "wall_time_s", "peak_memory_bytes"):
        assert key in written
    assert written["method"] == method and written["config"]["quantization"] == "8bit"
    # The saved adapter holds exactly the trained numbers.
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == expected
    assert written["adapter_bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    # A randomly initialised LM is close to uniform over the 50,257 GPT-2 tokens: loss ~ ln(50257) = 10.82.
    assert written["base_metrics"]["val_loss"] == pytest.approx(math.log(50257), abs=0.15)
    assert math.isfinite(written["metrics"]["train_loss"]) and math.isfinite(written["metrics"]["val_loss"])
    mmlu = written["mmlu"]["after"]
    assert mmlu["num_questions"] == 8 == sum(mmlu["per_subject_count"].values())
    assert 0.0 <= written["metrics"]["MMLU"] <= 100.0
    assert written["optimizer_steps"] == smoke_config["max_steps"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| Model | Method") and f"| {dict(nola='NOLA', lora='LoRA')[method]} |" in table[2]
