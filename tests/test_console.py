"""recipes/console.py and the report_to key: compact Trainer log lines under one labelled bar, each warning once,
no model-loading bars, and report_to in every recipe's config."""

import dataclasses
import logging
import uuid
import warnings

import pytest
import torch

from recipes.cli import RecipeError
from recipes.console import OnceFilter, each_warning_once, log_line, no_loading_bars, use_console
from recipes.training import report_metrics, report_targets


def test_log_line_is_one_compact_line_per_logging_step():
    logs = {"loss": 2.31142, "grad_norm": 0.2310004, "learning_rate": 0.0042, "epoch": 0.1, "total_flos": 1e9}
    assert log_line(logs, 10, 24) == "step 10/24 · loss 2.311 · lr 4.2e-03 · grad_norm 0.231"
    assert log_line({"eval_loss": 1.5, "eval_runtime": 3.2, "epoch": 1.0}, 24, 24) == "step 24/24 · eval loss 1.5"
    closing = {"train_runtime": 83.4, "train_samples_per_second": 1.2, "train_loss": 2.1046, "epoch": 0.24}
    assert log_line(closing, 24, 24) == "trained 24 steps in 83 s · mean loss 2.105"
    assert log_line({"loss": 1.0}, 3, -1) == "step 3 · loss 1"  # max_steps unknown


class TinyData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.tensor([(7 * i + j) % 50 for j in range(8)])
        return {"input_ids": ids, "labels": ids}


def test_trainer_prints_compact_lines_under_a_labelled_bar_and_no_dicts(tmp_path, capsys):
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from recipes.training import training_arguments
    from tests.conftest import tiny_gpt2

    args = training_arguments(tmp_path, max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                              save_strategy="no", learning_rate=1e-3, report_to="none")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TinyData())
    console = use_console(trainer, "training LoRA (r=1)")
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert ProgressCallback not in kinds and PrinterCallback not in kinds
    trainer.train()
    out, err = capsys.readouterr()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert console.lines[:2] == [f"step {e['step']}/4 · loss {e['loss']:.4g} · lr {e['learning_rate']:.1e} · "
                                 f"grad_norm {e['grad_norm']:.4g}" for e in logged]
    assert console.lines[2].startswith("trained 4 steps in ")
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err
    assert "training LoRA (r=1)" in err  # the bar's label (tqdm writes to stderr)
    assert all(line in out + err for line in console.lines)
    trainer.predict(TinyData())
    assert "evaluating LoRA (r=1)" in capsys.readouterr().err and console.eval_bar is None  # labelled, then closed


def test_each_warning_once_survives_catch_warnings_and_keeps_earlier_filters():
    """Python's default shows a warning again after any catch_warnings block (the registry resets); after
    each_warning_once the same text shows once, and an 'ignore' filter set before still wins."""
    text = f"the same warning {uuid.uuid4()}"
    ignored = f"ignored {uuid.uuid4()}"

    def warn_three_times():
        for _ in range(3):
            with warnings.catch_warnings():
                pass
            warnings.warn(text, UserWarning)
            warnings.warn(ignored, FutureWarning)

    with warnings.catch_warnings(record=True) as default_caught:
        warnings.resetwarnings()
        warn_three_times()
    assert sum(str(w.message) == text for w in default_caught) == 3  # the noise this fixes
    handlers = list(logging.getLogger().handlers)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.filterwarnings("ignore", message="ignored", category=FutureWarning)
            each_warning_once()
            warn_three_times()
        assert [str(w.message) for w in caught] == [text]
    finally:
        for handler in logging.getLogger().handlers:
            if handler not in handlers:
                logging.getLogger().removeHandler(handler)
            while any(isinstance(f, OnceFilter) for f in handler.filters):
                handler.removeFilter(next(f for f in handler.filters if isinstance(f, OnceFilter)))
        import transformers.utils.logging as hf_logging

        for handler in hf_logging.get_logger().handlers:
            for f in [f for f in handler.filters if isinstance(f, OnceFilter)]:
                handler.removeFilter(f)


def test_once_filter_passes_each_message_once_per_logger_and_level():
    once = OnceFilter()
    records = [logging.LogRecord(name, level, __file__, 1, msg, None, None)
               for name, level, msg in [("peft", logging.WARNING, "a"), ("peft", logging.WARNING, "a"),
                                        ("peft", logging.WARNING, "b"), ("accelerate", logging.WARNING, "a"),
                                        ("peft", logging.ERROR, "a")]]
    assert [once.filter(r) for r in records] == [True, False, True, True, True]


def test_no_loading_bars_turns_off_the_conversion_bars_only_within_the_block():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    import transformers.utils.logging as hf_logging

    original = gguf_utils.tqdm
    with no_loading_bars():
        assert gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...").disable
        if hasattr(hf_logging, "set_tqdm_hook"):
            assert hf_logging.tqdm(range(3), desc="Loading weights").disable
        assert not hf_logging.tqdm(range(3), desc="Downloading", disable=False).disable  # downloads stay
    assert gguf_utils.tqdm is original
    assert not hf_logging.tqdm(range(3), desc="Loading weights", disable=False).disable


def test_report_to_is_a_key_of_every_recipe_and_is_checked_early():
    from recipes.instruct import InstructConfig
    from recipes.mmlu import MMLUConfig
    from recipes.nlg import NLGConfig
    from recipes.vision import VisionConfig

    for config_class in (NLGConfig, InstructConfig, VisionConfig, MMLUConfig):
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        assert fields["report_to"].default == "none", config_class.__name__
        if config_class is not NLGConfig:  # the fields this change added carry their help text
            assert "tensorboard" in fields["report_to"].metadata["help"]
    assert report_targets("none") == [] and report_targets(None) == []
    with pytest.raises(RecipeError, match="report_to 'tensorbord' is not a tracker Trainer knows"):
        report_targets("tensorbord")
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    if "tensorboard" not in get_available_reporting_integrations():
        with pytest.raises(RecipeError, match="pip install tensorboard"):
            report_targets("tensorboard")


@pytest.fixture
def recording_tracker(monkeypatch):
    """A tracker named "recorder" that Trainer's integration table knows and reports as installed."""
    import transformers.integrations.integration_utils as integrations
    from transformers import TrainerCallback

    received = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            received.append(("begin", args.output_dir))

        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(("log", state.global_step, dict(logs)))

        def on_train_end(self, args, state, control, **kwargs):
            received.append(("end",))

    monkeypatch.setitem(integrations.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["recorder"])
    return received


def test_scores_without_training_reach_the_tracker_through_its_trainer_callback(tmp_path, recording_tracker):
    assert report_metrics("recorder", tmp_path, {"mmlu/MMLU": 25.0}, step=3) == ["recorder"]
    assert recording_tracker == [("begin", str(tmp_path)), ("log", 3, {"mmlu/MMLU": 25.0}), ("end",)]
    assert report_metrics("none", tmp_path, {"mmlu/MMLU": 25.0}) == [] and len(recording_tracker) == 3


def test_mmlu_report_to_needs_an_output_dir_and_says_so_before_loading(recording_tracker):
    from recipes.mmlu import main

    with pytest.raises(RecipeError, match="report_to needs output_dir"):
        main(["--model", "./no/such/model", "--report_to", "recorder"])
