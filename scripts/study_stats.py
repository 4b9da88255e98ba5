"""Paired statistics for the compression study: how far apart two settings are, with 95% confidence intervals.

Two intervals for the mean over seeds of a paired difference ``d_s = BLEU(a, seed s) - BLEU(b, seed s)`` (both
settings trained on the same data order and decoded on the same test inputs for seed s):

* paired t over seeds: ``mean(d) ± t(0.975, n - 1) * sd(d) / sqrt(n)`` -- how much the training randomness (seed)
  moves the difference, the test inputs held fixed;
* paired bootstrap over test inputs: resample the test inputs with replacement, recompute the corpus BLEU of both
  settings for every seed on the same resample, average the seed differences; the 2.5th and 97.5th percentiles of
  that mean -- how much the choice of test inputs moves it, the seeds held fixed.

Corpus BLEU is e2e-metrics' pymteval BLEU (the recipe's scorer, ``recipes.metrics.pymteval_bleu``), computed from
per-input sufficient statistics (clipped n-gram hits, candidate n-gram counts, closest reference length: integers,
so any resample's corpus BLEU is the same formula over summed rows). Pure functions of numbers and strings.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np

MAX_NGRAM = 4
# Two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30 (scipy.stats.t.ppf(0.975, df), 6 decimals);
# used where scipy is not installed (it is no dependency of the project).
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_quantile_975(df: int) -> float:
    """t(0.975, df): scipy's when installed, else the table above (df <= 30)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    try:
        from scipy.stats import t
    except ImportError:
        if df > len(T_975):
            raise ValueError(f"t(0.975, {df}) is not in the table (df <= {len(T_975)}); pip install scipy") from None
        return T_975[df - 1]
    return float(t.ppf(0.975, df))


def paired_t_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% paired-t interval of the mean of per-seed differences."""
    n = len(differences)
    mean = statistics.fmean(differences)
    half = t_quantile_975(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def bleu_statistics(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> np.ndarray:
    """Per input (rows): clipped n-gram hits for n = 1..4, candidate n-gram counts for n = 1..4 (pymteval counts
    ``len(hyp) - n + 1`` even when negative), closest reference length; int64, shape (inputs, 9). Tokenized,
    lowercased and clipped by the recipe's own pymteval pieces, after the same strip ``score_e2e`` applies."""
    from recipes.metrics import _clipped_hits, _closest_ref_length, _max_ref_counts, _mteval_tokenized

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference groups but {len(hypotheses)} hypotheses")
    refs = [[r.strip() for r in group] for group in references]
    hyps = [h.strip() for h in hypotheses]
    rows = []
    for hyp, group in _mteval_tokenized(refs, hyps):
        hits = [sum(_clipped_hits(hyp, _max_ref_counts(group, n), n).values()) for n in range(1, MAX_NGRAM + 1)]
        lengths = [len(hyp) - i for i in range(MAX_NGRAM)]
        rows.append(hits + lengths + [_closest_ref_length(len(hyp), (len(r) for r in group))])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 2 * MAX_NGRAM + 1)


def bleu_from_statistics(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0..1) from summed statistics, shape (..., 9) -> (...): pymteval's formula (brevity penalty when
    the candidate is not longer than the reference; a zero precision smoothed to 1e-15 hits)."""
    totals = np.asarray(totals, dtype=np.float64)
    hits, cand, ref = totals[..., :MAX_NGRAM], totals[..., MAX_NGRAM:2 * MAX_NGRAM], totals[..., -1]
    cand1 = cand[..., 0]
    brevity = np.where(cand1 <= ref, np.exp(1.0 - ref / np.where(cand1 != 0, cand1, 1e-5)), 1.0)
    log_precision = np.log(np.maximum(hits, 1e-15) / np.maximum(cand, 1e-9)).sum(axis=-1)
    return brevity * np.exp(log_precision / MAX_NGRAM)


def resample_counts(inputs: int, resamples: int, seed: int) -> np.ndarray:
    """How often each test input is drawn in each bootstrap resample, shape (resamples, inputs); row sums = inputs."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.multinomial(inputs, np.full(inputs, 1.0 / inputs), size=resamples)


def paired_bootstrap_interval(stats_a: Sequence[np.ndarray], stats_b: Sequence[np.ndarray], resamples: int = 2000,
                              seed: int = 0, scale: float = 100.0) -> tuple[float, float, float]:
    """(mean, low, high) of ``scale * mean over seeds of (BLEU_a - BLEU_b)``: the full-set value and the 95%
    percentile interval over resamples of the test inputs, one resample shared by both settings and every seed.
    ``stats_a[s]``, ``stats_b[s]``: :func:`bleu_statistics` of seed s's predictions, rows in the same input order."""
    if len(stats_a) != len(stats_b) or not stats_a:
        raise ValueError(f"need the same number of seeds on both sides, got {len(stats_a)} and {len(stats_b)}")
    inputs = stats_a[0].shape[0]
    if any(s.shape[0] != inputs for s in (*stats_a, *stats_b)):
        raise ValueError("every run must be scored on the same test inputs (the rows differ in number)")
    counts = resample_counts(inputs, resamples, seed).astype(np.float64)
    full = [bleu_from_statistics(a.sum(axis=0)) - bleu_from_statistics(b.sum(axis=0)) for a, b in zip(stats_a, stats_b)]
    draws = np.mean([bleu_from_statistics(counts @ a) - bleu_from_statistics(counts @ b)
                     for a, b in zip(stats_a, stats_b)], axis=0)
    low, high = np.percentile(scale * draws, [2.5, 97.5])
    return scale * float(np.mean(full)), float(low), float(high)


def verdict(intervals: Sequence[tuple[float, float]], margin: float) -> str:
    """Where the intervals lie relative to ±margin: all inside, all below -margin, all above +margin, or across."""
    if all(-margin <= low and high <= margin for low, high in intervals):
        return f"within ±{margin:g} BLEU"
    if all(high < -margin for _, high in intervals):
        return f"more than {margin:g} BLEU below"
    if all(low > margin for low, _ in intervals):
        return f"more than {margin:g} BLEU above"
    return f"not shown within ±{margin:g} BLEU (an interval reaches past it)"
