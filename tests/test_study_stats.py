"""scripts/study_stats.py with made-up numbers: t quantiles against the textbook table, the paired-t interval by hand,
corpus BLEU from per-input statistics against the recipe's scorer (pymteval), and the paired bootstrap against an
explicit loop that scores every resample with that scorer."""

import builtins
import importlib.util

import numpy as np
import pytest

from recipes.metrics import pymteval_bleu
from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("study_stats", REPO_ROOT / "scripts" / "study_stats.py")
study_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_stats)

REFS = [["the cat sat on the mat", "a cat is on the mat"], ["there is a dog in the park today"],
        ["The Eagle is a cheap pub , near Burger King .", "Cheap pub The Eagle is near Burger King."],
        ["x y"], ["one two three four five six"], ["a b c d f"]]
HYPS = ["the cat is on the mat", "a dog in the park", "The Eagle is a cheap pub near Burger King .", " ",
        "one two three four", "a b c d e"]


def test_t_quantiles_match_the_textbook_table_and_scipy(monkeypatch):
    # Textbook two-sided 95% values (e.g. any statistics table): df 1, 2, 4, 10, 30.
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert study_stats.t_quantile_975(df) == pytest.approx(value, abs=5e-4)
    if importlib.util.find_spec("scipy") is not None:
        from scipy.stats import t

        for df in range(1, 31):
            assert study_stats.T_975[df - 1] == pytest.approx(t.ppf(0.975, df), abs=1e-6)
    # Without scipy the table answers, and says what to do past its end.
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert study_stats.t_quantile_975(4) == 2.776445
    with pytest.raises(ValueError, match="not in the table .*pip install scipy"):
        study_stats.t_quantile_975(31)
    with pytest.raises(ValueError, match="at least 2 values"):
        study_stats.t_quantile_975(0)


def test_paired_t_interval_by_hand():
    # d = 1..5: mean 3, sample sd sqrt(2.5), half-width t(0.975, 4) * sqrt(2.5) / sqrt(5) = 2.776445 * 0.707107.
    mean, low, high = study_stats.paired_t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert (low, high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
    # Two seeds: df 1, half-width 12.706205 * |d1 - d2| / 2.
    assert study_stats.paired_t_interval([-1.0, 0.0])[1:] == pytest.approx((-0.5 - 6.353102, -0.5 + 6.353102), abs=1e-5)


def test_bleu_from_statistics_is_the_scorers_bleu():
    stats = study_stats.bleu_statistics(REFS, HYPS)
    assert stats.shape == (6, 9) and stats.dtype == np.int64
    assert float(study_stats.bleu_from_statistics(stats.sum(axis=0))) == pytest.approx(pymteval_bleu(REFS, HYPS),
                                                                                     abs=1e-15)
    # Any subset (with repeats) is the scorer's BLEU of that subset.
    pick = [5, 0, 0, 2, 3]
    subset = stats[pick].sum(axis=0)
    assert float(study_stats.bleu_from_statistics(subset)) == pytest.approx(
        pymteval_bleu([REFS[i] for i in pick], [HYPS[i] for i in pick]), abs=1e-15)
    # By hand: "a b c d e" against "a b c d f": precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty).
    assert float(study_stats.bleu_from_statistics(stats[5])) == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25,
                                                                              abs=1e-12)
    # An identical output scores 1; the empty output counts one empty token, so 3 negative n-gram counts (pymteval).
    assert list(stats[3][4:8]) == [1, 0, -1, -2]
    assert float(study_stats.bleu_from_statistics(study_stats.bleu_statistics([["a b c d"]], ["a b c d"])[0])) == 1.0
    with pytest.raises(ValueError, match="2 reference groups but 1 hypotheses"):
        study_stats.bleu_statistics(REFS[:2], HYPS[:1])


def test_paired_bootstrap_matches_an_explicit_loop_over_resamples():
    """Two settings, two seeds, made-up outputs: every resample's mean difference equals the scorer's BLEU of the
    materialised resample (the same inputs for both settings and both seeds)."""
    outputs = {("a", 1): HYPS, ("b", 1): ["the cat on the mat", "a dog is in a park", "The Eagle pub", "x y",
                                          "one two three four five six", "a b c"],
               ("a", 2): HYPS[:5] + ["a b c d f"], ("b", 2): ["cat", "dog in the park today",
                                                                          "The Eagle is a cheap pub .", "x", "one two",
                                                                          "a b c d e"]}
    stats = {k: study_stats.bleu_statistics(REFS, v) for k, v in outputs.items()}
    resamples, seed = 60, 7
    mean, low, high = study_stats.paired_bootstrap_interval([stats["a", 1], stats["a", 2]],
                                                            [stats["b", 1], stats["b", 2]], resamples, seed)
    full = [pymteval_bleu(REFS, outputs["a", s]) - pymteval_bleu(REFS, outputs["b", s]) for s in (1, 2)]
    assert mean == pytest.approx(100 * sum(full) / 2, abs=1e-10)
    counts = study_stats.resample_counts(len(REFS), resamples, seed)
    assert counts.shape == (resamples, len(REFS)) and (counts.sum(axis=1) == len(REFS)).all()
    assert len({tuple(row) for row in counts}) > resamples // 2  # resamples differ
    draws = []
    for row in counts:
        picked = [i for i, c in enumerate(row) for _ in range(c)]
        refs = [REFS[i] for i in picked]
        draws.append(100 * sum(pymteval_bleu(refs, [outputs["a", s][i] for i in picked])
                               - pymteval_bleu(refs, [outputs["b", s][i] for i in picked]) for s in (1, 2)) / 2)
    assert (low, high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=1e-9)
    assert low < mean < high
    # The same seed gives the same interval; identical settings give a zero-width one.
    assert study_stats.paired_bootstrap_interval([stats["a", 1]], [stats["b", 1]], resamples, seed) == \
        study_stats.paired_bootstrap_interval([stats["a", 1]], [stats["b", 1]], resamples, seed)
    assert study_stats.paired_bootstrap_interval([stats["a", 1]], [stats["a", 1]], resamples, seed) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same test inputs"):
        study_stats.paired_bootstrap_interval([stats["a", 1]], [stats["b", 1][:4]])


def test_verdict_against_the_margin():
    assert study_stats.verdict([(-0.8, 0.3), (-0.5, 0.9)], 1.0) == "within ±1 BLEU"
    assert study_stats.verdict([(-0.8, 0.3), (-1.2, 0.1)], 1.0).startswith("not shown within ±1 BLEU")
    assert study_stats.verdict([(-3.0, -1.5), (-2.5, -1.1)], 1.0) == "more than 1 BLEU below"
    assert study_stats.verdict([(1.5, 3.0)], 1.0) == "more than 1 BLEU above"
