"""scripts/compression_study.py end to end on a tiny GPT-2 and real E2E slices: learning rates chosen on the
validation split, several seeds, a record of finished runs that a fresh clone resumes from (nothing re-run; a deleted
or half-written run redone, reproducing its predictions), paired intervals and a report whose numbers are recomputed
here from the recorded runs; the pairing itself (same batches for every setting of a seed); --dry_run's time
estimate and the report on made-up runs; the GPU script's dry run."""

import importlib.util
import json
import math
import shutil
import statistics
import sys

import pytest
import yaml

from recipes.cli import RecipeError
from tests.conftest import REPO_ROOT, shared_data_dir

DATA = shared_data_dir()
SEEDS = [1, 2]
GRIDS = {"lora": [3e-3, 3e-2], "nola": [0.02, 0.2]}


def load_script():
    spec = importlib.util.spec_from_file_location("compression_study", REPO_ROOT / "scripts" / "compression_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


study_script = load_script()
study_report = sys.modules["study_report"]  # imported by the script from beside it


def word_tokenizer(tmp_path) -> tuple[str, int]:
    """A word-level tokenizer over E2E's 400 most frequent training words: a tiny random model's greedy outputs then
    share words with the references, so METEOR, NIST and ROUGE-L differ between runs (the GPT-2 BPE's 50k tokens
    give all-zero scores after a few steps)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = Counter()
    for line in (DATA / "e2e" / "train.txt").read_text(encoding="utf-8").splitlines()[:2000]:
        words.update(line.replace("||", " ").split())
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for word, _ in words.most_common(400):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    tokenizer.add_special_tokens(["<|endoftext|>", "[UNK]"])
    path = tmp_path / "word_tokenizer.json"
    tokenizer.save(str(path))
    return str(path), len(vocab)


def study_yaml(tmp_path, **changes):
    tokenizer, vocab_size = word_tokenizer(tmp_path)
    study = {
        "output_dir": str(tmp_path / "study"),
        "record_dir": str(tmp_path / "record"),
        "seeds": SEEDS,
        "selection_seeds": SEEDS[:1],
        "seed_keys": ["seed", "basis_seed"],
        "validation_file": "valid.txt",
        "max_validation_inputs": 4,
        "selection_metric": "METEOR",
        "widen_grid": 0,  # BLEU needs 4-gram matches, which a few steps of a random model never make
        "common": {
            "dataset": "e2e", "data_dir": str(DATA / "e2e"),
            "model_config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256,
                             "vocab_size": vocab_size},
            "tokenizer_name_or_path": tokenizer, "target_modules": ["c_attn"], "evaluate_base": False,
            "max_train_pairs": 64, "max_test_inputs": 4, "max_steps": 4, "per_device_train_batch_size": 8,
            "warmup_steps": 0, "num_beams": 1, "max_new_tokens": 12, "no_repeat_ngram_size": 1, "eval_batch_size": 4,
            "save_strategy": "no", "logging_steps": 100,
        },
        "settings": [
            {"name": "lora", "label": "LoRA r=2", "config": {"method": "lora", "r": 2, "lora_alpha": 4},
             "lr_grid": GRIDS["lora"]},
            {"name": "nola", "label": "NOLA k=l=8", "lr_grid": GRIDS["nola"],
             "config": {"method": "nola", "r": 2, "num_basis_A": 8, "num_basis_B": 8, "basis_mode": "shared",
                        "output_slices": {"c_attn": {"splits": 3, "adapt": [0, 2]}}}},
        ],
        "claim": {"references": ["lora"], "compared": ["nola"], "margin_bleu": 1.0, "bootstrap_resamples": 200},
        "paper_reference": {"source": "test", "points": [
            {"label": "LoRA r=4 (paper)", "method": "lora", "trainable_params": 770000, "BLEU": 70.4}]},
    }
    study.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def first_sources(name, n):
    """The first n distinct inputs of an E2E ``mr||ref`` file, read here without the project's reader."""
    seen = []
    for line in (DATA / "e2e" / name).read_text(encoding="utf-8").splitlines():
        mr = line.split("||", 1)[0].strip()
        if mr and mr not in seen:
            seen.append(mr)
        if len(seen) == n:
            break
    return seen


def sources_of(run_dir):
    return [json.loads(line)["source"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def results_mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/results.json")}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_study_end_to_end_selects_on_validation_records_resumes_and_reports_consistently(tmp_path, monkeypatch, capsys):
    for needed in ("e2e/train.txt", "e2e/valid.txt", "e2e/test.txt"):
        if not (DATA / needed).is_file():
            pytest.skip(f"real data not present: {DATA / needed}; see ../shared/data/MANIFEST.md")
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java (apt-get install default-jre-headless)")
    pytest.importorskip("peft_nola")
    path = study_yaml(tmp_path)
    out, record = tmp_path / "study", tmp_path / "record"

    # --jobs 2: the runs go to two worker processes (spawned: they import the script from scripts/), each run's output
    # to the log.txt in its folder, one line per run start and end to the terminal.
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    capsys.readouterr()
    first = study_script.main(["--study", str(path), "--jobs", "2"])
    assert [e["action"] for e in first["log"]] == ["ran"] * 8  # 2 settings x (2 rates x 1 seed + 2 seeds)
    terminal = capsys.readouterr().out
    run_dirs = sorted(out.glob("runs/*/*"))
    assert len(run_dirs) == 8
    for run_dir in run_dirs:
        rel = run_dir.relative_to(out)
        assert f"[study] {rel}: done in" in terminal
        assert f"results written to {run_dir / 'results.json'}" in (run_dir / "log.txt").read_text()
        # The record: the run's results.json as the recipe wrote it; a test run's predictions without references.
        assert json.loads((record / rel / "results.json").read_text()) == \
            json.loads((run_dir / "results.json").read_text())
        if rel.name.startswith("test_"):
            assert [(r["source"], r["prediction"]) for r in read_jsonl(record / rel / "predictions.jsonl")] == \
                sources_and_predictions(run_dir)
        else:
            assert not (record / rel / "predictions.jsonl").exists()
    # The study's test inputs and references, recorded once: those every test run decoded.
    references = read_jsonl(record / "test_references.jsonl")
    assert [r["source"] for r in references] == first_sources("test.txt", 4)
    for run_dir in out.glob("runs/*/test_seed*"):
        assert [(r["source"], r["references"]) for r in read_jsonl(run_dir / "predictions.jsonl")] == \
            [(r["source"], r["references"]) for r in references]

    # Selection runs decoded the validation split, test runs the test split.
    valid, test = first_sources("valid.txt", 4), first_sources("test.txt", 4)
    per_seed = {}
    for name, grid in GRIDS.items():
        val_score = {}
        for lr in grid:
            run_dir = out / "runs" / name / f"select_lr{lr:g}_seed{SEEDS[0]}"
            assert sources_of(run_dir) == valid
            val_score[lr] = json.loads((run_dir / "results.json").read_text())["metrics"]["METEOR"]
        assert val_score[grid[0]] != val_score[grid[1]]  # otherwise the choice below would be a tie
        best = max(grid, key=lambda lr: val_score[lr])
        setting = first["settings"][name]
        assert setting["learning_rate"] == best
        per_seed[name] = []
        for seed in SEEDS:
            run_dir = out / "runs" / name / f"test_seed{seed}"
            assert sources_of(run_dir) == test
            result = json.loads((run_dir / "results.json").read_text())
            assert (result["config"]["learning_rate"], result["config"]["seed"], result["config"]["basis_seed"]) == \
                (best, seed, seed)
            per_seed[name].append(result)
        # Aggregates: recomputed from the per-run files with the textbook formulas.
        for metric in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
            values = [r["metrics"][metric] for r in per_seed[name]]
            mean = sum(values) / 2
            std = (sum((v - mean) ** 2 for v in values) / (2 - 1)) ** 0.5
            assert setting["metrics"][metric]["mean"] == pytest.approx(mean, abs=1e-12)
            assert setting["metrics"][metric]["std"] == pytest.approx(std, abs=1e-12)
        assert setting["trainable_params"] == per_seed[name][0]["trainable_params"]
        assert setting["adapter_bytes"] == per_seed[name][0]["adapter_bytes"]

    # Parameter counts by formula: LoRA r=2 on c_attn (32 -> 96), NOLA 2 layers x 2 slices x (8 + 8).
    assert first["settings"]["lora"]["trainable_params"] == 2 * 2 * (32 + 96)
    assert first["settings"]["nola"]["trainable_params"] == 2 * 2 * (8 + 8)

    # Paired: the per-seed differences, their t interval by hand (two seeds: t(0.975, 1) = 12.706205), and corpus
    # BLEU recomputed from the recorded predictions equal to each run's reported BLEU (the bootstrap resamples what
    # was scored).
    stats = sys.modules["study_stats"]
    for name in GRIDS:
        for seed, result in zip(SEEDS, per_seed[name]):
            predictions = read_jsonl(record / "runs" / name / f"test_seed{seed}" / "predictions.jsonl")
            recomputed = stats.bleu_from_statistics(stats.bleu_statistics(
                [r["references"] for r in references], [p["prediction"] for p in predictions]).sum(axis=0))
            assert float(recomputed) == pytest.approx(result["metrics"]["BLEU"], rel=1e-12, abs=0)
    (paired,) = first["paired"]
    diffs = [100 * (n["metrics"]["BLEU"] - lo["metrics"]["BLEU"]) for n, lo in zip(per_seed["nola"], per_seed["lora"])]
    assert (paired["compared"], paired["reference"], paired["seeds"]) == ("nola", "lora", SEEDS)
    assert paired["differences"] == pytest.approx(diffs, abs=1e-12)
    half = 12.706205 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)  # sd of two values: |d1 - d2| / sqrt 2
    assert paired["t_interval"] == pytest.approx([sum(diffs) / 2 - half, sum(diffs) / 2 + half], abs=1e-5)
    assert paired["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-9)
    low, high = paired["bootstrap_interval"]
    assert low <= paired["mean"] + 1e-9 and paired["mean"] - 1e-9 <= high

    # results.md (in the record) shows the table (BLEU in percent, mean ± std), the paired row and the answer.
    report = (record / "results.md").read_text()
    saved = json.loads((record / "study.json").read_text())
    for name, label in (("lora", "LoRA r=2"), ("nola", "NOLA k=l=8")):
        params = per_seed[name][0]["trainable_params"]
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} | {params:,} |"))
        for metric in ("BLEU", "METEOR"):
            values = [r["metrics"][metric] for r in per_seed[name]]
            cell = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
            assert cell in row, (cell, row)
            assert saved["settings"][name]["metrics"][metric]["values"] == values
    assert any(saved["settings"][name]["metrics"]["METEOR"]["std"] > 0 for name in GRIDS)  # seeds differ
    assert saved["paired"] == first["paired"] and saved["claim"] in report
    mean = round(sum(diffs) / 2, 2) + 0.0
    assert f"NOLA k=l=8 (64 parameters) − LoRA r=2 (512): {mean:+.2f} BLEU" in saved["claim"]
    assert paired["verdict"] in saved["claim"]
    assert "| NOLA k=l=8 | LoRA r=2 | " in report
    assert (record / "bleu_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert report.count("(still at the edge of the grid: widen it)") == 2  # two rates have no inside, widen_grid 0
    recorded = [json.loads(f.read_text()) for f in record.glob("runs/*/*/results.json")]
    seconds = [r["wall_time_s"] for r in recorded]
    assert f"4 selection and 4 test runs; their wall times sum to {sum(seconds) / 3600:.1f} h " \
           f"({statistics.fmean(seconds) / 60:.1f} min a run" in report

    # --dry_run lists what is left: nothing, or the runs of a seed added on the command line, with times measured on
    # the recorded runs: steps x s/step + inputs x s/input + the rest of a run's time.
    dry = study_script.main(["--study", str(path), "--dry_run"])
    assert dry["todo"] == [] and dry["figures"]["source"] == "measured on 8 finished run(s)"
    step_s = sum(r["train_time_s"] for r in recorded) / sum(r["train_steps"] for r in recorded)
    input_s = sum(r["decode_time_s"] for r in recorded) / sum(r["test_inputs"] for r in recorded)
    rest_s = statistics.fmean(r["wall_time_s"] - r["train_time_s"] - r["decode_time_s"] for r in recorded)
    assert (dry["figures"]["train_step_s"], dry["figures"]["decode_input_s"], dry["figures"]["overhead_s"]) == \
        pytest.approx((step_s, input_s, rest_s), rel=1e-12)
    more = study_script.main(["--study", str(path), "--dry_run", "--seeds", "1,2,3"])
    assert more["todo"] == ["runs/lora/test_seed3", "runs/nola/test_seed3"]
    per_run = 4 * step_s + 4 * input_s + rest_s
    assert more["estimate_s"] == pytest.approx(2 * per_run, rel=1e-9)
    assert more["wall_s"] == pytest.approx({1: 2 * per_run, 2: per_run}, rel=1e-9)

    # A fresh clone holds only the record: every run is kept from it, no recorded file rewritten.
    shutil.rmtree(out)
    before = results_mtimes(record)
    second = study_script.main(["--study", str(path)])
    assert {e["action"] for e in second["log"]} == {"kept"} and len(second["log"]) == 8
    assert results_mtimes(record) == before and second["paired"] == first["paired"]

    # A deleted test run and a half-written selection run in the record are redone (and only they); same seed, same
    # predictions and metrics.
    gone = record / "runs" / "nola" / f"test_seed{SEEDS[1]}"
    torn = record / "runs" / "lora" / f"select_lr{GRIDS['lora'][0]:g}_seed{SEEDS[0]}"
    expected_predictions = read_jsonl(gone / "predictions.jsonl")
    expected_metrics = {run: json.loads((run / "results.json").read_text())["metrics"] for run in (gone, torn)}
    (gone / "results.json").unlink()
    text = (torn / "results.json").read_text()
    (torn / "results.json").write_text(text[: len(text) // 2])
    third = study_script.main(["--study", str(path), "--jobs", "2"])  # as the first: the same computation
    redone = sorted(e["run"] for e in third["log"] if e["action"] == "ran")
    assert redone == sorted(str(p.relative_to(record)) for p in (gone, torn))
    assert read_jsonl(gone / "predictions.jsonl") == expected_predictions
    for run, metrics in expected_metrics.items():
        assert json.loads((run / "results.json").read_text())["metrics"] == metrics


def load_script_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources_and_predictions(run_dir):
    records = map(json.loads, (run_dir / "predictions.jsonl").read_text().splitlines())
    return [(r["source"], r["prediction"]) for r in records]


def test_bad_study_fails_before_any_run(tmp_path):
    bad_key = study_yaml(tmp_path, claim=None,
                         settings=[{"name": "x", "config": {"method": "nola", "num_basis_a": 2}, "lr_grid": [1e-3]}])
    with pytest.raises(RecipeError, match=r"unknown config key 'num_basis_a' \(setting 'x' of .*Did you mean: .*_A"):
        study_script.main(["--study", str(bad_key)])
    assert not (tmp_path / "study" / "runs").exists()
    fixed_lr = study_yaml(tmp_path, claim=None,
                          settings=[{"name": "x", "config": {"learning_rate": 1e-3}, "lr_grid": [1e-3]}])
    with pytest.raises(RecipeError, match="'learning_rate' is set by the study per run"):
        study_script.main(["--study", str(fixed_lr)])
    with pytest.raises(RecipeError, match="widen_grid must be 0 .* or more, got -1"):
        study_script.main(["--study", str(study_yaml(tmp_path, widen_grid=-1))])
    with pytest.raises(RecipeError, match="study file not found"):
        study_script.main(["--study", str(tmp_path / "nope.yaml")])


def entry(label, method, params, bleus):
    mean = statistics.mean(bleus)
    return {"label": label, "method": method, "trainable_params": params,
            "metrics": {"BLEU": {"mean": mean, "std": statistics.stdev(bleus), "values": bleus}}}


def test_claim_sentence_numbers_and_verdicts():
    """Hand-made aggregates with known answers: NOLA at 1/20 is 0.5 BLEU below (within 1); of the two NOLA settings
    below LoRA r=1's count, one is 0.2 above it (matches) and one 1.5 below (does not)."""
    study = study_script.Study(output_dir=None, seeds=[1, 2], selection_seeds=[1], seed_keys=["seed"],
                                validation_file="valid.txt", max_validation_inputs=None, selection_metric="BLEU",
                                common={}, settings=[], claim={"reference": "r4", "compressed": "k96",
                                                               "rank_one": "r1", "margin_bleu": 1.0})
    settings = {
        "r4": entry("LoRA r=4", "lora", 230400, [0.545, 0.547]),
        "r1": entry("LoRA r=1", "lora", 57600, [0.537, 0.539]),
        "k400": entry("NOLA k=l=400", "nola", 48000, [0.539, 0.541]),
        "k96": entry("NOLA k=l=96", "nola", 11520, [0.540, 0.542]),
        "k48": entry("NOLA k=l=48", "nola", 5760, [0.522, 0.524]),
    }
    sentence = study_report.answer_claim(study, settings)
    assert "NOLA at 1/20 of LoRA r=4's parameters: yes, it is within 1 BLEU" in sentence
    assert "54.10 ± 0.14 BLEU vs LoRA r=4, 230,400, 54.60 ± 0.14; difference -0.50" in sentence
    assert "yes for NOLA k=l=400, NOLA k=l=96, not for NOLA k=l=48" in sentence
    assert "NOLA k=l=48 (5,760) 52.30 ± 0.14 (-1.50)" in sentence
    settings["k96"] = entry("NOLA k=l=96", "nola", 11520, [0.530, 0.532])
    assert "parameters: no, it is not within 1 BLEU" in study_report.answer_claim(study, settings)


def test_rate_at_the_edge_of_its_grid_is_flagged(tmp_path):
    """Validation scores made up here: a peak inside the grid is chosen plainly, a best score at the grid's largest
    (or smallest) rate is chosen and flagged, since a wider grid might do better."""
    grids = {"lora": [1e-3, 2e-3, 4e-3], "nola": [0.01, 0.02, 0.04]}
    path = study_yaml(tmp_path, settings=[
        {"name": name, "config": {"method": name, "r": 2}, "lr_grid": grid} for name, grid in grids.items()])
    study = study_script.load_study(path)
    scores = {("lora", 1e-3): 0.30, ("lora", 2e-3): 0.35, ("lora", 4e-3): 0.32,  # peak inside
              ("nola", 0.01): 0.20, ("nola", 0.02): 0.25, ("nola", 0.04): 0.27}  # still rising at the top
    selection = {study_script.Run(name, "select", SEEDS[0], lr): {"metrics": {"METEOR": scores[name, lr]}}
                 for name, grid in grids.items() for lr in grid}
    chosen = study_script.choose_learning_rates(study, selection)
    assert (chosen["lora"]["learning_rate"], chosen["lora"]["at_grid_edge"]) == (2e-3, False)
    assert (chosen["nola"]["learning_rate"], chosen["nola"]["at_grid_edge"]) == (0.04, True)


def test_grid_widens_past_an_edge_until_the_best_rate_is_inside(tmp_path):
    """Made-up validation scores that peak at 4e-3 for one setting and at the smallest rate 1e-3 for the other: the
    first grid grows 2e-3 -> 4e-3 -> 8e-3 (the grid's ratio at that end) and stops once 4e-3 is inside; the second
    grows downward, to 5e-4 and 2.5e-4, and stays flagged when widen_grid (2) runs out."""
    grids = {"lora": [1e-3, 2e-3], "nola": [1e-3, 2e-3]}
    peak = {"lora": 4e-3, "nola": 1e-9}
    path = study_yaml(tmp_path, widen_grid=2, settings=[
        {"name": name, "config": {"method": name, "r": 2}, "lr_grid": grid} for name, grid in grids.items()])
    study = study_script.load_study(path)
    asked = []

    def get(runs):
        asked.extend(runs)
        return {run: {"metrics": {"METEOR": -abs(math.log(run.learning_rate / peak[run.setting]))}} for run in runs}

    selection, chosen = study_script.select_learning_rates(study, get)
    grids_now = {s.name: s.lr_grid for s in study.settings}
    assert grids_now == {"lora": [1e-3, 2e-3, 4e-3, 8e-3], "nola": [2.5e-4, 5e-4, 1e-3, 2e-3]}
    assert (chosen["lora"]["learning_rate"], chosen["lora"]["at_grid_edge"]) == (4e-3, False)
    assert (chosen["nola"]["learning_rate"], chosen["nola"]["at_grid_edge"]) == (2.5e-4, True)
    assert sorted(map(repr, selection)) == sorted(map(repr, asked)) and len(asked) == 8  # each run asked once
    assert study_script.rate_beyond([2e-3, 5e-3, 1e-2], 1e-2) == 0.02  # not 0.019999999999999997
    assert study_script.rate_beyond([0.02, 0.05, 0.1], 0.02) == 0.008


def test_settings_of_one_seed_train_on_the_same_batches(tmp_path, monkeypatch):
    """The pairing: with the same seed, a LoRA run, a NOLA run and a LoRA run whose set-up draws extra random numbers
    before training train on the same sequence of batches (6 steps of 4 over 16 pairs: into the second epoch); another
    seed draws another sequence. Batches recorded as the Trainer hands them to the training step."""
    for needed in ("e2e/train.txt", "e2e/test.txt"):
        if not (DATA / needed).is_file():
            pytest.skip(f"real data not present: {DATA / needed}; see ../shared/data/MANIFEST.md")
    pytest.importorskip("peft_nola")
    import torch
    from transformers import Trainer

    from recipes import nlg
    from recipes.nlg_report import TABLE_COLUMNS

    tokenizer, vocab_size = word_tokenizer(tmp_path)
    batches: list[list] = []
    training_step = Trainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        batches[-1].append(inputs["input_ids"].tolist())
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording_step)
    # Scoring plays no part in the order of training batches; skipping it (and its Java scorers) saves seconds.
    monkeypatch.setattr(nlg, "score", lambda dataset, examples, hypotheses, tokenize_lower=None:
                        {m: 0.0 for m in TABLE_COLUMNS["e2e"]})
    apply_method = nlg.apply_method

    def train(seed, draw_first=0, **method):
        batches.append([])
        config = {"dataset": "e2e", "data_dir": str(DATA / "e2e"), "tokenizer_name_or_path": tokenizer,
                  "model_config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256,
                                   "vocab_size": vocab_size},
                  "target_modules": ["c_attn"], "evaluate_base": False, "max_train_pairs": 16, "max_test_inputs": 1,
                  "max_steps": 6, "per_device_train_batch_size": 4, "warmup_steps": 0, "num_beams": 1,
                  "max_new_tokens": 1, "save_strategy": "no", "logging_steps": 100, "seed": seed, "basis_seed": seed,
                  "output_dir": str(tmp_path / f"run{len(batches)}"), **method}
        path = tmp_path / f"run{len(batches)}.yaml"
        path.write_text(yaml.safe_dump(config))

        def apply_after_drawing(model, args):
            torch.rand(draw_first)  # a method whose set-up consumes the global RNG before the sampler exists
            return apply_method(model, args)

        monkeypatch.setattr(nlg, "apply_method", apply_after_drawing)
        nlg.main(["--config", str(path)])
        return batches[-1]

    lora = {"method": "lora", "r": 2, "lora_alpha": 4}
    nola = {"method": "nola", "r": 2, "num_basis_A": 8, "num_basis_B": 8, "basis_mode": "shared",
            "output_slices": {"c_attn": {"splits": 3, "adapt": [0, 2]}}}
    first = train(5, **lora)
    assert len(first) == 6 and all(len(batch) == 4 for batch in first)
    assert train(5, **nola) == first
    assert train(5, draw_first=1000, **lora) == first
    assert train(6, **lora) != first
    # The first epoch is a permutation of the 16 pairs; the second starts another one.
    rows = [tuple(row) for batch in first for row in batch]
    assert len(set(rows[:16])) == 16 and rows[16:] != rows[:8]


def made_up_study(tmp_path, **changes):
    """A study over a tiny random-init model (no data read): three settings at fixed rates, three seeds."""
    study = {
        "output_dir": str(tmp_path / "work"), "record_dir": str(tmp_path / "record"), "seeds": [1, 2, 3],
        "seed_keys": ["seed", "basis_seed"], "max_validation_inputs": 6, "selection_metric": "BLEU", "widen_grid": 0,
        "common": {"dataset": "e2e", "model_config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2},
                   "target_modules": ["c_attn"], "evaluate_base": False, "max_test_inputs": 6, "max_steps": 4,
                   "per_device_train_batch_size": 4, "num_beams": 10, "length_penalty": 0.8},
        "settings": [{"name": "lora_r4", "label": "LoRA r=4", "config": {"method": "lora", "r": 4}, "lr_grid": [0.01]},
                     {"name": "lora_r1", "label": "LoRA r=1", "config": {"method": "lora", "r": 1}, "lr_grid": [0.02]},
                     {"name": "nola_k96", "label": "NOLA k=l=96", "config": {"method": "nola", "r": 8},
                      "lr_grid": [0.1]}],
        "claim": {"references": ["lora_r4", "lora_r1"], "compared": ["nola_k96"], "margin_bleu": 1.0,
                  "bootstrap_resamples": 300},
        "time_model": {"train_step_s": 2.0, "decode_input_s": 0.5, "overhead_s": 10},
        "history": {"title": "issue 19, 100 steps", "study_json": str(REPO_ROOT / "docs/compression_study/study.json"),
                    "report": "../results.md"},
    }
    study.update(changes)
    path = tmp_path / "made_up.yaml"
    path.write_text(yaml.safe_dump(study, allow_unicode=True))
    return path


MADE_UP_REFS = [["The Eagle is a cheap pub near Burger King .", "Cheap pub The Eagle is near Burger King ."],
                ["Alimentum serves Chinese food in the city centre ."], ["The Mill is a family friendly coffee shop ."],
                ["Zizzi is a pub with a low customer rating ."], ["Loch Fyne serves French food ."],
                ["The Punter is an expensive restaurant by the river ."]]


def made_up_outputs(setting, seed):
    """LoRA r=4 copies the first reference; LoRA r=1 and NOLA give the same weaker outputs (so their difference is 0
    on every seed and resample); the seed drops a different input's last words."""
    outputs = [refs[0] for refs in MADE_UP_REFS]
    if setting != "lora_r4":
        outputs = [" ".join(o.split()[:-3]) for o in outputs]
    outputs[seed] = " ".join(outputs[seed].split()[:3])
    return outputs


def write_made_up_record(study_script_module, study, runs):
    from recipes.config import config_to_dict
    from recipes.metrics import pymteval_bleu

    record = study.record_dir
    record.mkdir(parents=True, exist_ok=True)
    sources = [f"name[input {i}]" for i in range(len(MADE_UP_REFS))]
    (record / "test_references.jsonl").write_text("".join(
        json.dumps({"source": s, "references": r}) + "\n" for s, r in zip(sources, MADE_UP_REFS)))
    params = {"lora_r4": 230400, "lora_r1": 57600, "nola_k96": 11520}
    bleu = {}
    for run in runs:
        folder = record / run.relative_dir
        folder.mkdir(parents=True)
        outputs = made_up_outputs(run.setting, run.seed)
        bleu[run.setting, run.seed] = pymteval_bleu(MADE_UP_REFS, outputs)
        (folder / "predictions.jsonl").write_text("".join(
            json.dumps({"source": s, "prediction": o}) + "\n" for s, o in zip(sources, outputs)))
        results = {"config": config_to_dict(study_script_module.run_config(study, run)),
                   "metrics": {"BLEU": bleu[run.setting, run.seed], "NIST": 5.0 + run.seed, "METEOR": 0.4,
                               "ROUGE_L": 0.6, "CIDEr": 1.5},
                   "trainable_params": params[run.setting], "adapter_bytes": 4 * params[run.setting],
                   "wall_time_s": 100.0 + run.seed, "train_time_s": 40.0, "decode_time_s": 30.0, "train_steps": 4,
                   "test_inputs": 6}
        (folder / "results.json").write_text(json.dumps(results))
    return bleu


def test_dry_run_estimates_from_the_time_model_then_from_finished_runs(tmp_path, capsys):
    """Made-up figures: before any run, 9 test runs of 4 steps x 2 s + 6 inputs x 0.5 s + 10 s = 21 s each; two workers
    take 5 runs one after another (105 s). With 3 runs recorded at 100 + seed seconds (40 s training, 30 s decoding),
    the rest is estimated from those: 10 s a step, 5 s an input, 32 s besides."""
    path = made_up_study(tmp_path)
    study = study_script.load_study(path)
    dry = study_script.main(["--study", str(path), "--dry_run"])
    assert len(dry["todo"]) == 9 and dry["figures"]["source"].startswith("time_model of ")
    assert dry["estimate_s"] == pytest.approx(9 * 21.0) and dry["wall_s"] == pytest.approx({1: 189.0, 2: 105.0})
    capsys.readouterr()
    runs = [study_script.Run("lora_r4", "test", seed, 0.01) for seed in (1, 2, 3)]
    write_made_up_record(study_script, study, runs)
    dry = study_script.main(["--study", str(path), "--dry_run", "--jobs", "3"])
    assert dry["todo"] == [f"runs/{name}/test_seed{seed}" for name in ("lora_r1", "nola_k96") for seed in (1, 2, 3)]
    assert dry["figures"] == {"train_step_s": 10.0, "decode_input_s": 5.0, "overhead_s": pytest.approx(32.0),
                              "source": "measured on 3 finished run(s)"}
    per_run = 4 * 10.0 + 6 * 5.0 + 32.0
    assert dry["estimate_s"] == pytest.approx(6 * per_run) and dry["wall_s"] == pytest.approx({1: 6 * per_run,
                                                                                               3: 2 * per_run})
    out = capsys.readouterr().out
    assert "selection: 0 of 0 run(s) to do; test: 6 of 9 run(s) to do" in out
    assert f"   runs/nola_k96/test_seed3  ~{per_run / 60:.0f} min" in out
    assert study_script.makespan([5, 3, 3, 2], 2) == 7  # 5 | 3, 3 -> the 2 goes to the first free worker (5)


def test_report_only_on_made_up_runs(tmp_path):
    """Made-up recorded runs with known BLEU (the recipe's scorer on made-up outputs): the paired differences by hand,
    the t interval with t(0.975, 2) = 4.302653, a zero difference judged within ±1 BLEU and a 17-point gap below it,
    the history table from the earlier round's study.json, and a plot whose texts do not overlap."""
    path = made_up_study(tmp_path)
    study = study_script.load_study(path)
    runs = [study_script.Run(name, "test", seed, lr) for name, lr in (("lora_r4", 0.01), ("lora_r1", 0.02),
                                                                     ("nola_k96", 0.1)) for seed in (1, 2, 3)]
    bleu = write_made_up_record(study_script, study, runs)
    summary = study_script.main(["--study", str(path), "--report_only"])
    report = (tmp_path / "record" / "results.md").read_text()
    by_reference = {c["reference"]: c for c in summary["paired"]}
    diffs = [100 * (bleu["nola_k96", s] - bleu["lora_r4", s]) for s in (1, 2, 3)]
    mean = sum(diffs) / 3
    half = 4.302653 * statistics.stdev(diffs) / math.sqrt(3)
    below = by_reference["lora_r4"]
    assert below["differences"] == pytest.approx(diffs, abs=1e-12)
    assert below["t_interval"] == pytest.approx([mean - half, mean + half], abs=1e-5)
    assert below["mean"] == pytest.approx(mean, abs=1e-9) and mean < -10
    assert below["bootstrap_interval"][1] < -1 and below["verdict"] == "more than 1 BLEU below"
    same = by_reference["lora_r1"]
    assert same["differences"] == [0.0, 0.0, 0.0] and same["t_interval"] == [0.0, 0.0]
    assert same["bootstrap_interval"] == [0.0, 0.0] and same["verdict"] == "within ±1 BLEU"
    sentence = (f"NOLA k=l=96 (11,520 parameters) − LoRA r=4 (230,400): {round(mean, 2):+.2f} BLEU (t "
                f"[{round(mean - half, 2):+.2f}, {round(mean + half, 2):+.2f}], bootstrap")
    assert sentence in summary["claim"] and summary["claim"] in report
    assert "NOLA k=l=96 (11,520 parameters) − LoRA r=1 (57,600): +0.00 BLEU (t [+0.00, +0.00], bootstrap " \
           "[+0.00, +0.00]), within ±1 BLEU" in summary["claim"]
    assert f"| NOLA k=l=96 | LoRA r=4 | {', '.join(f'{d:+.2f}' for d in diffs)} | {mean:+.2f} |" in report
    row = next(line for line in report.splitlines() if line.startswith("| LoRA r=4 |"))
    values = [bleu["lora_r4", s] for s in (1, 2, 3)]
    assert f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}" in row
    assert "fixed rate (a one-rate grid: no selection)" in report
    assert "beam search (10 beams, length penalty 0.8)" in report
    # History: the earlier round's table from its study.json, with its LoRA r=4 row as it was reported.
    assert "## History: issue 19, 100 steps" in report and "[../results.md](../results.md)" in report
    assert "| LoRA r=4 | 230,400 | 0.01 | 3 | 57.24 ± 1.92 |" in report
    assert (tmp_path / "record" / "bleu_vs_params.png").read_bytes()[:4] == b"\x89PNG"

    fig = study_report.plot_paired(summary["settings"], summary["paired"], 1.0, "made-up", tmp_path / "p.png")
    assert study_report.text_overlaps(fig) == []
    fig.text(0.5, 0.5, "AAAA")  # the check can fail: two texts on one spot
    fig.text(0.5, 0.5, "BBBB")
    assert ("AAAA", "BBBB") in study_report.text_overlaps(fig)


def test_report_refuses_predictions_that_do_not_reproduce_the_reported_bleu(tmp_path):
    path = made_up_study(tmp_path)
    study = study_script.load_study(path)
    runs = [study_script.Run(name, "test", seed, lr) for name, lr in (("lora_r4", 0.01), ("lora_r1", 0.02),
                                                                     ("nola_k96", 0.1)) for seed in (1, 2, 3)]
    write_made_up_record(study_script, study, runs)
    changed = tmp_path / "record" / "runs" / "nola_k96" / "test_seed2" / "predictions.jsonl"
    changed.write_text(changed.read_text().replace("Alimentum", "Zizzi"))
    with pytest.raises(RecipeError, match="nola_k96/test_seed2: BLEU recomputed from predictions.jsonl is"):
        study_script.main(["--study", str(path), "--report_only"])


def test_the_paired_study_yaml_has_the_issues_sizes():
    """configs/studies/paired_study.yaml as issue 26 asks: 5 settings, 5 seeds, >= 400 steps of batch 4, >= 300 test
    inputs, the official decoding, warmup scaled from 500 of 52,580, label smoothing 0.1, and grids holding the
    official scripts' rate and the earlier round's choice."""
    study = study_script.load_study(REPO_ROOT / "configs/studies/paired_study.yaml")
    cfg = study_script.run_config(study, study_script.Run("nola_k96", "test", 110, 0.1))
    assert len(study.seeds) == 5 and not set(study.seeds) & set(study.selection_seeds)
    assert cfg.max_steps * cfg.per_device_train_batch_size >= 1600 and cfg.max_test_inputs >= 300
    assert (cfg.num_beams, cfg.length_penalty, cfg.no_repeat_ngram_size, cfg.max_new_tokens) == (10, 0.8, 4, 64)
    assert (cfg.label_smoothing, cfg.lr_scheduler_type, cfg.warmup_steps) == (0.1, "linear", round(400 * 500 / 52580))
    assert set(study.seed_keys) == {"seed", "basis_seed"}
    grids = {s.name: s.lr_grid for s in study.settings}
    official = {"lora_r4": 2e-4, "lora_r1": 2e-4, "nola_k96": 0.01, "nola_k96_per_layer": 0.01, "nola_k400": 0.01}
    earlier = {"lora_r4": 0.01, "lora_r1": 0.02, "nola_k96": 0.1, "nola_k96_per_layer": 0.1, "nola_k400": 0.05}
    assert all(official[name] in grids[name] and earlier[name] in grids[name] for name in official)


def test_gpu_check_dry_run_prints_the_steps_and_checks_paths(tmp_path, capsys, monkeypatch):
    gpu_check = load_script_module("gpu_check")
    out = tmp_path / "gpu"
    assert gpu_check.main(["--dry_run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1. kernels (limit 90 s): " in printed
    assert "-m pytest -q -p no:cacheprovider -rs tests/test_kernels.py" in printed
    assert f"scripts/bench.py --shapes gpt2-medium-qv gpt2-medium-mlp gpt2-large-qv gpt2-large-mlp llama-stack " \
           f"vit-b-mlp --batch 8 --seq 256 --reps 10 --warmup 1 --budget_s 8 --out {out}/bench/bench.json" in printed
    assert f"scripts/compression_study.py --study configs/studies/paired_study_gpu.yaml " \
           f"--output_dir {out}/study/work --record_dir {out}/study --jobs 5" in printed
    assert "dry run: nothing was run" in printed and "problem" not in printed and not out.exists()
    assert sum(gpu_check.LIMITS.values()) <= 560  # 10 minutes with time to start Python and write the summary
    # A broken path is a problem, and the exit status says so.
    monkeypatch.setattr(gpu_check, "STUDY_YAML", "configs/studies/missing.yaml")
    assert gpu_check.main(["--dry_run", "--out", str(out)]) == 1
    assert "problem: study: configs/studies/missing.yaml not found" in capsys.readouterr().out
