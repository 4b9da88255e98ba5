"""scripts/compression_study.py end to end on a tiny GPT-2 and real E2E slices: learning rates chosen on the
validation split, several seeds, resume (nothing re-run; a deleted or half-written run redone, reproducing its
predictions), and a report whose numbers are recomputed here from the per-run results.json files."""

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
        "claim": {"reference": "lora", "compressed": "nola", "rank_one": "lora", "margin_bleu": 1.0},
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


def test_study_end_to_end_selects_on_validation_resumes_and_reports_consistently(tmp_path, monkeypatch, capsys):
    for needed in ("e2e/train.txt", "e2e/valid.txt", "e2e/test.txt"):
        if not (DATA / needed).is_file():
            pytest.skip(f"real data not present: {DATA / needed}; see ../shared/data/MANIFEST.md")
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java (apt-get install default-jre-headless)")
    pytest.importorskip("peft_nola")
    path = study_yaml(tmp_path)
    out = tmp_path / "study"

    # --jobs 2: the runs go to two worker processes (spawned: they import the script from scripts/), each run's output
    # to the log.txt in its folder, one line per run start and end to the terminal.
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    capsys.readouterr()
    first = study_script.main(["--study", str(path), "--jobs", "2"])
    assert [e["action"] for e in first["log"]] == ["ran"] * 8  # 2 settings x (2 rates x 1 seed + 2 seeds)
    terminal = capsys.readouterr().out
    for run_dir in sorted(out.glob("runs/*/*")):
        rel = str(run_dir.relative_to(out))
        assert f"[study] {rel}: done in" in terminal
        assert f"results written to {run_dir / 'results.json'}" in (run_dir / "log.txt").read_text()

    # Selection runs decoded the validation split, test runs the test split.
    valid, test = first_sources("valid.txt", 4), first_sources("test.txt", 4)
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
        per_seed = []
        for seed in SEEDS:
            run_dir = out / "runs" / name / f"test_seed{seed}"
            assert sources_of(run_dir) == test
            result = json.loads((run_dir / "results.json").read_text())
            assert (result["config"]["learning_rate"], result["config"]["seed"], result["config"]["basis_seed"]) == \
                (best, seed, seed)
            per_seed.append(result)
        # Aggregates: recomputed from the per-run files with the textbook formulas.
        for metric in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
            values = [r["metrics"][metric] for r in per_seed]
            mean = sum(values) / 2
            std = (sum((v - mean) ** 2 for v in values) / (2 - 1)) ** 0.5
            assert setting["metrics"][metric]["mean"] == pytest.approx(mean, abs=1e-12)
            assert setting["metrics"][metric]["std"] == pytest.approx(std, abs=1e-12)
        assert setting["trainable_params"] == per_seed[0]["trainable_params"]
        assert setting["adapter_bytes"] == per_seed[0]["adapter_bytes"]

    # Parameter counts by formula: LoRA r=2 on c_attn (32 -> 96), NOLA 2 layers x 2 slices x (8 + 8).
    assert first["settings"]["lora"]["trainable_params"] == 2 * 2 * (32 + 96)
    assert first["settings"]["nola"]["trainable_params"] == 2 * 2 * (8 + 8)

    # results.md shows those numbers (BLEU in percent, mean ± std) and the claim; study.json holds the same.
    report = (out / "results.md").read_text()
    saved = json.loads((out / "study.json").read_text())
    for name, label in (("lora", "LoRA r=2"), ("nola", "NOLA k=l=8")):
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        for metric in ("BLEU", "METEOR"):
            values = [json.loads((out / "runs" / name / f"test_seed{s}" / "results.json").read_text())
                      ["metrics"][metric] for s in SEEDS]
            cell = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
            assert cell in row, (cell, row)
            assert saved["settings"][name]["metrics"][metric]["values"] == values
    assert any(saved["settings"][name]["metrics"]["METEOR"]["std"] > 0 for name in GRIDS)  # seeds differ
    lora_mean = 100 * saved["settings"]["lora"]["metrics"]["BLEU"]["mean"]
    nola_mean = 100 * saved["settings"]["nola"]["metrics"]["BLEU"]["mean"]
    verdict = "yes, it is within" if nola_mean - lora_mean >= -1.0 else "no, it is not within"
    assert verdict in saved["claim"] and saved["claim"] in report
    assert f"difference {round(nola_mean - lora_mean, 2) + 0.0:+.2f}" in saved["claim"]
    assert (out / "bleu_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert report.count("(still at the edge of the grid: widen it)") == 2  # two rates have no inside, widen_grid 0
    seconds = [json.loads(f.read_text())["wall_time_s"] for f in out.glob("runs/*/*/results.json")]
    assert f"4 selection and 4 test runs; their wall times sum to {sum(seconds) / 3600:.1f} h " \
           f"({statistics.fmean(seconds) / 60:.1f} min a run" in report

    # --dry_run lists what is left: nothing, or the runs of a seed added on the command line.
    assert study_script.main(["--study", str(path), "--dry_run"])["todo"] == []
    assert study_script.main(["--study", str(path), "--dry_run", "--seeds", "1,2,3"])["todo"] == \
        ["runs/lora/test_seed3", "runs/nola/test_seed3"]

    # Second invocation: every run is kept, no results.json rewritten.
    before = results_mtimes(out)
    second = study_script.main(["--study", str(path)])
    assert {e["action"] for e in second["log"]} == {"kept"} and len(second["log"]) == 8
    assert results_mtimes(out) == before

    # A deleted test run and a half-written selection run are redone (and only they); same seed, same predictions.
    gone = out / "runs" / "nola" / f"test_seed{SEEDS[1]}"
    torn = out / "runs" / "lora" / f"select_lr{GRIDS['lora'][0]:g}_seed{SEEDS[0]}"
    expected = {gone: sources_and_predictions(gone), torn: sources_and_predictions(torn)}
    (gone / "results.json").unlink()
    text = (torn / "results.json").read_text()
    (torn / "results.json").write_text(text[: len(text) // 2])
    third = study_script.main(["--study", str(path), "--jobs", "2"])  # as the first: the same computation
    redone = sorted(e["run"] for e in third["log"] if e["action"] == "ran")
    assert redone == sorted(str(p.relative_to(out)) for p in (gone, torn))
    for run_dir, before_preds in expected.items():
        assert sources_and_predictions(run_dir) == before_preds


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
    sentence = study_script.answer_claim(study, settings)
    assert "NOLA at 1/20 of LoRA r=4's parameters: yes, it is within 1 BLEU" in sentence
    assert "54.10 ± 0.14 BLEU vs LoRA r=4, 230,400, 54.60 ± 0.14; difference -0.50" in sentence
    assert "yes for NOLA k=l=400, NOLA k=l=96, not for NOLA k=l=48" in sentence
    assert "NOLA k=l=48 (5,760) 52.30 ± 0.14 (-1.50)" in sentence
    settings["k96"] = entry("NOLA k=l=96", "nola", 11520, [0.530, 0.532])
    assert "parameters: no, it is not within 1 BLEU" in study_script.answer_claim(study, settings)


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
