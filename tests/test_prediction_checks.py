"""recipes/prediction_checks.py and its use by the NLG recipe: empty or all-identical predictions give a warning, a
``prediction_check`` record in results.json and a mark in the printed table."""

import json
import warnings

import pytest

from recipes.nlg_report import comparison_markdown, paper_row
from recipes.prediction_checks import (
    DEGENERATE_MARK,
    DegenerateOutputWarning,
    check_predictions,
    degenerate_note,
    prediction_check,
)


def test_more_than_a_tenth_empty_is_degenerate_and_a_tenth_is_not():
    one_in_ten = ["a sentence"] * 9 + [""]
    two_in_ten = ["a sentence", "another"] * 4 + ["", "  \n"]
    assert prediction_check(one_in_ten)["degenerate"] is False
    check = prediction_check(two_in_ten)
    assert (check["empty"], check["predictions"], check["empty_share"]) == (2, 10, 0.2)
    assert check["degenerate"] is True and "2 of 10 predictions are empty" in check["problems"][0]


def test_all_identical_is_degenerate_and_varied_text_is_not():
    check = prediction_check(["The pub is nice."] * 4)
    assert check["degenerate"] is True and check["distinct"] == 1 and check["most_common_share"] == 1.0
    assert "all 4 predictions are the same text" in check["problems"][0]
    healthy = prediction_check(["The pub is nice.", "A cheap cafe.", "The pub is nice.", "Aromi serves Thai food."])
    assert healthy == {"predictions": 4, "empty": 0, "empty_share": 0.0, "distinct": 3, "most_common_share": 0.5,
                       "degenerate": False, "problems": []}
    assert prediction_check(["one prediction"])["degenerate"] is False  # one input cannot be "all the same"


def test_all_empty_is_reported_as_empty_not_as_identical():
    check = prediction_check([""] * 8)
    assert check["problems"] == ["8 of 8 predictions are empty (100%, more than 10%)"]


def test_check_predictions_warns_only_when_degenerate():
    with pytest.warns(DegenerateOutputWarning, match=r"LoRA \(r=1\): 8 of 8 predictions are empty"):
        check_predictions([""] * 8, "LoRA (r=1)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_predictions(["a", "b"], "LoRA (r=1)")["degenerate"] is False


def test_tables_mark_a_degenerate_run_and_explain_it_under_the_table():
    metrics = {"BLEU": 0.0, "METEOR": 0.0, "TER": 1.0}
    bad = prediction_check([""] * 4)
    good = prediction_check(["a", "b", "c", "d"])
    run = {"row_label": "LoRA (r=1)", "trainable_params": 1000, "metrics": metrics, "adapter_bytes": 10,
           "train_time_s": 1.0, "decode_time_s": 1.0}
    assert paper_row({**run, "prediction_check": bad}, "dart")["Method"] == f"LoRA (r=1) {DEGENERATE_MARK}"
    assert paper_row({**run, "prediction_check": good}, "dart")["Method"] == "LoRA (r=1)"
    assert paper_row(run, "dart")["Method"] == "LoRA (r=1)"  # results written before the check existed
    table = comparison_markdown({"dataset": "dart", "base_metrics": metrics, "base_decode_time_s": 1.0,
                                 "base_prediction_check": good, "runs": [{**run, "prediction_check": bad}]})
    labels = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert labels == ["Base model (no training)", f"LoRA (r=1) {DEGENERATE_MARK}"]
    note = degenerate_note({"Base model (no training)": good, "LoRA (r=1)": bad})
    assert note == f"{DEGENERATE_MARK} LoRA (r=1): 4 of 4 predictions are empty (100%, more than 10%); its scores " \
                   "are not meaningful."


def test_nlg_recipe_warns_and_records_degenerate_predictions(tmp_path, monkeypatch):
    """A whole (tiny) NLG run whose decoder returns made-up degenerate outputs: empty strings for the trained run,
    one repeated sentence for the base model. results.json, results.md and the warnings must all say so."""
    pytest.importorskip("peft_nola")
    pytest.importorskip("nltk", reason="the WebNLG scorer tokenizes with NLTK (pip install nltk)")
    from tests.test_nlg_recipe import TINY_GPT2, need_data, need_java, smoke_args

    need_data("webnlg/train.json", "webnlg/test.json")
    need_java()
    import recipes.nlg as nlg

    def made_up(model, tokenizer, cfg, sources, desc="decoding"):
        return ["The airport serves the city."] * len(sources) if "base" in desc else [""] * len(sources)

    monkeypatch.setattr(nlg, "generate_sharded", made_up)
    with pytest.warns(DegenerateOutputWarning) as caught:
        nlg.main(smoke_args(tmp_path, "webnlg", TINY_GPT2, ["--method", "lora", "--target_modules", "c_attn",
                                                            "--r", "1", "--learning_rate", "1e-3"]))
    messages = [str(w.message) for w in caught if w.category is DegenerateOutputWarning]
    assert any("4 of 4 predictions are empty" in m for m in messages)
    assert any("all 4 predictions are the same text" in m for m in messages)
    out = tmp_path / "webnlg"
    results = json.loads((out / "results.json").read_text())
    assert results["prediction_check"]["degenerate"] is True and results["prediction_check"]["empty"] == 4
    assert results["base_prediction_check"]["degenerate"] is True
    assert results["base_prediction_check"]["distinct"] == 1
    table = (out / "results.md").read_text()
    assert f"Base model (no training) {DEGENERATE_MARK}" in table and f"{DEGENERATE_MARK} |" in table
    assert "its scores are not meaningful" in table


def test_report_tables_mark_degenerate_runs_from_their_results_files():
    """scripts/report.py's tables: the mark and note come from each results.json's own checks (the base row from
    base_prediction_check, not from the run it is stored with)."""
    from recipes.nlg_report import tables_markdown

    metrics = {"BLEU": 10.0, "METEOR": 0.2, "TER": 0.9}
    base = {"dataset": "dart", "model": "m", "row_label": "LoRA (r=1)", "trainable_params": 10, "metrics": metrics,
            "base_metrics": metrics, "config": {}, "prediction_check": prediction_check([""] * 3),
            "base_prediction_check": prediction_check(["a", "b", "c"])}
    table = tables_markdown([base])
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert labels == ["Base model (no training)", f"LoRA (r=1) {DEGENERATE_MARK}"]
    assert f"{DEGENERATE_MARK} LoRA (r=1): 3 of 3 predictions are empty" in table
