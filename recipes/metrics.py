"""Offline NLG metrics that reproduce the official scoring scripts used by the LoRA and NOLA papers.

Two suites:

* ``score_e2e`` -- the E2E NLG Challenge script (tuetschek/e2e-metrics ``measure_scores.py -p``):
  BLEU and NIST from its Python "pymteval" implementation (mteval-v13a tokenization, lowercased
  n-grams, multi-reference), METEOR, ROUGE_L and CIDEr from the MS-COCO caption evaluator
  (Stanford PTB tokenizer with ``-lowerCase``, punctuation removed). Scales are the script's:
  BLEU, METEOR and ROUGE_L in 0..1, NIST and CIDEr unbounded.
* ``score_webnlg`` -- the WebNLG GenerationEval ``eval.py -m bleu,meteor,ter`` setup that LoRA uses
  for WebNLG and DART: BLEU of ``multi-bleu-detok.perl`` (0..100), METEOR 1.5 ``-l en -norm``
  (0..1) and TER (0..1), the last two on NLTK-tokenized text.

What comes from libraries: the mteval-v13a tokenizer is sacrebleu's ``Tokenizer13a`` (identical
regexes to pymteval's and multi-bleu-detok's); the PTB tokenizer, METEOR 1.5 jar (with its
paraphrase table), ROUGE_L and CIDEr are PyPI ``pycocoevalcap`` -- the same code and jars the E2E
script vendors; TER is sacrebleu's; word tokenization for WebNLG is NLTK's. Written here: the
pymteval BLEU/NIST and multi-bleu-detok BLEU n-gram statistics (no library reproduces their
corner cases) and the file readers.

Golden values: the test-suite pins the values printed by the official ``measure_scores.py -p``
(run from a scratch copy, see tests/test_metrics.py) on the cases in
``shared/data/e2e-metrics-cases``; all five metrics agree bit for bit. For the WebNLG suite it pins
GenerationEval's output on a DART case built from LoRA's DART references: BLEU and METEOR agree bit
for bit, TER to the printed digit (difference 5 below).

Remaining differences from the official scripts (all in corner cases):

1. NIST: where the official script divides by zero (the whole output has no n-gram of some order
   <= 5, e.g. every output is one token long) it crashes; we count that order's length as 1, as
   the widely used fork of the script in lxuechen/private-transformers does.
2. Inputs: the official readers accept anything; we raise on mismatched counts, empty files, empty
   reference groups (the official script would crash in ``min()``), and on strings containing line
   breaks passed to the Python API (they cannot be written to the line-based file formats).
3. E2E METEOR/ROUGE_L/CIDEr run PyPI pycocoevalcap 1.2 rather than the copy vendored in
   e2e-metrics. The tokenizer and scorer code and the jars (stanford-corenlp-3.4.1, meteor-1.5)
   are the same coco-caption code; the vendored copy differs only in Python-2/3 porting.
4. WebNLG word tokenization: GenerationEval calls ``nltk.word_tokenize``, which needs NLTK's
   downloadable "punkt_tab" sentence model. When that model is installed we use it and match
   exactly; offline (no NLTK data can be downloaded here) we split sentences with NLTK's
   *untrained* Punkt tokenizer, which differs on abbreviations such as "Mr." or "St." (a warning
   is emitted). With LoRA's post-processing (``lora_postprocess``: lowercase and split every
   non-word character), periods are already separate tokens and the difference vanishes.
5. WebNLG TER: GenerationEval uses ``pyter`` (per sentence: edit distance with greedy shifts over
   one reference, minimum over references, mean over sentences; an empty reference scores 1).
   We keep that aggregation but compute each sentence's TER with sacrebleu's tercom port, whose
   shift search differs from pyter's. On the pinned DART case (60 outputs, every tenth one with
   its words reversed) one sentence differs and the mean moves by 1.3e-4 (0.23463 vs 0.23476;
   both print 0.23); on 300 such outputs one sentence differs, 3e-4 on the mean.
6. GenerationEval reads its files with ``read().split('\\n')``, so newline-terminated files add
   one empty segment. For TER that segment scores 1.0; for METEOR it adds ``num_refs - 1`` stray
   reference lines, on which METEOR 1.5 stops ("test and reference not same length") and
   GenerationEval reports METEOR = -1. Published METEOR values therefore come from runs without
   that segment, and by default we score without it; ``trailing_empty_segment=True`` adds the
   TER-1.0 segment for comparing with a run that had it.
7. WebNLG BLEU (multi-bleu-detok.perl): where the Perl script dies or exits (no reference or no
   output words at all) we return 0.0; its ``chop`` also eats the last character of a file whose
   last line has no newline, which cannot happen with strings passed to ``score_webnlg``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
WEBNLG_METRICS = ("BLEU", "METEOR", "TER")

JAVA_INSTALL_HINT = "apt-get install default-jre-headless"


class MetricsInputError(ValueError):
    """Inputs that the official scoring scripts could not score (or would score wrongly)."""


class JavaNotFoundError(RuntimeError):
    """METEOR and the PTB tokenizer are Java programs; raised when ``java`` is not on PATH."""


# ----------------------------------------------------------------------------------------------
# E2E file formats
# ----------------------------------------------------------------------------------------------


def _read_stripped_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise MetricsInputError(f"{path}: no such file")
    text = path.read_bytes().decode("utf-8")
    # The official reader iterates a codecs stream, which breaks lines like str.splitlines()
    # (also on \x0b, \x1c, \u2028, ...), then strips each line.
    return [line.strip() for line in text.splitlines()]


def read_references(path: str | Path) -> list[list[str]]:
    """Read an E2E reference file: one reference per line, a blank line between inputs.

    As in the official script, a file without any blank-line separator is read as one
    reference per input.
    """
    groups: list[list[str]] = [[]]
    for line in _read_stripped_lines(path):
        if line:
            groups[-1].append(line)
        else:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise MetricsInputError(f"{path}: reference file is empty")
    if len(groups) == 1:
        groups = [[ref] for ref in groups[0]]
    empty = [i + 1 for i, group in enumerate(groups) if not group]
    if empty:
        raise MetricsInputError(
            f"{path}: reference groups {empty[:10]} are empty (two blank lines in a row?); "
            "every input needs at least one reference"
        )
    return groups


def read_hypotheses(path: str | Path) -> list[str]:
    """Read an E2E system-output file: one hypothesis per line (blank lines are empty outputs)."""
    hypotheses = _read_stripped_lines(path)
    if not hypotheses:
        raise MetricsInputError(f"{path}: hypothesis file is empty")
    return hypotheses


def write_references(path: str | Path, references: Sequence[Sequence[str]]) -> None:
    """Write references in the E2E format (groups separated by blank lines)."""
    _check_inputs(references, [""] * len(references))
    if len(references) == 1 and len(references[0]) > 1:
        raise MetricsInputError(
            "a single input with several references cannot be written in the E2E format: the official "
            "reader takes a file with one group as one reference per input"
        )
    with open(path, "w", encoding="utf-8") as fh:
        for group in references:
            fh.write("".join(ref.strip() + "\n" for ref in group) + "\n")


def write_hypotheses(path: str | Path, hypotheses: Sequence[str]) -> None:
    """Write one hypothesis per line."""
    _check_no_line_breaks(hypotheses, "hypothesis")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(hyp.strip() + "\n" for hyp in hypotheses))


def load_pair(refs_path: str | Path, hyps_path: str | Path) -> tuple[list[list[str]], list[str]]:
    """Read a reference file and a hypothesis file and check that they describe the same inputs."""
    references = read_references(refs_path)
    hypotheses = read_hypotheses(hyps_path)
    if len(references) != len(hypotheses):
        raise MetricsInputError(
            f"{hyps_path} has {len(hypotheses)} hypotheses but {refs_path} has {len(references)} "
            "reference groups (groups are separated by blank lines); they must match one to one"
        )
    return references, hypotheses


def _check_no_line_breaks(texts: Iterable[str], what: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise MetricsInputError(f"{what} {i} is {type(text).__name__}, not str")
        if len(text.splitlines()) > 1:
            raise MetricsInputError(
                f"{what} {i} contains a line break, which the line-based official formats cannot "
                "hold; join its lines first (e.g. ' '.join(text.split()))"
            )


def _check_inputs(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> None:
    if isinstance(hypotheses, str) or any(isinstance(group, str) for group in references):
        raise MetricsInputError("references must be a list of lists of str and hypotheses a list of str")
    if len(hypotheses) == 0:
        raise MetricsInputError("no hypotheses to score")
    if len(references) != len(hypotheses):
        raise MetricsInputError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference groups; they must match one to one"
        )
    _check_no_line_breaks(hypotheses, "hypothesis")
    for i, group in enumerate(references):
        if not group:
            raise MetricsInputError(f"reference group {i} is empty; every input needs a reference")
        _check_no_line_breaks(group, f"input {i}, reference")
        if any(not ref.strip() for ref in group):
            raise MetricsInputError(
                f"reference group {i} holds an empty reference, which the E2E file format cannot hold"
            )


# ----------------------------------------------------------------------------------------------
# BLEU / NIST statistics (pymteval and multi-bleu-detok)
# ----------------------------------------------------------------------------------------------

_TOKENIZER_13A = None


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a tokenization (sacrebleu's ``13a``), split the way pymteval splits.

    ``"".split(" ")`` is ``[""]``: pymteval counts an empty output as one empty token, and we keep
    that so short outputs get the same length statistics.
    """
    global _TOKENIZER_13A
    if _TOKENIZER_13A is None:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        _TOKENIZER_13A = Tokenizer13a()
    return _TOKENIZER_13A(text).split(" ")


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _max_ref_counts(ref_token_lists: Sequence[Sequence[str]], n: int) -> dict[tuple[str, ...], int]:
    """For each n-gram, its largest count in any one reference (the BLEU clipping ceiling)."""
    ceiling: dict[tuple[str, ...], int] = {}
    for ref in ref_token_lists:
        for ngram, count in Counter(_ngrams(ref, n)).items():
            if count > ceiling.get(ngram, 0):
                ceiling[ngram] = count
    return ceiling


def _clipped_hits(hyp: Sequence[str], ceiling: dict, n: int) -> dict[tuple[str, ...], int]:
    """Clipped matches per hypothesis n-gram, in first-occurrence order (float sums depend on it)."""
    hits = {}
    for ngram, count in Counter(_ngrams(hyp, n)).items():
        matched = min(count, ceiling.get(ngram, 0))
        if matched:
            hits[ngram] = matched
    return hits


def _closest_ref_length(hyp_len: int, ref_lens: Iterable[int]) -> int:
    # Closest reference length; ties go to the shorter reference (pymteval and multi-bleu agree).
    return min(ref_lens, key=lambda ref_len: (abs(ref_len - hyp_len), ref_len))


def _lowercased(tokens: list[str]) -> list[str]:
    return [tok.lower() for tok in tokens]


def _mteval_tokenized(references: Sequence[Sequence[str]], hypotheses: Sequence[str]):
    """``(hypothesis tokens, [reference tokens, ...])`` per input, tokenized and lowercased as pymteval does."""
    for group, hyp_text in zip(references, hypotheses):
        yield _lowercased(mteval_tokenize(hyp_text)), [_lowercased(mteval_tokenize(ref)) for ref in group]


def pymteval_bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[str], max_ngram: int = 4) -> float:
    """Corpus BLEU exactly as e2e-metrics' pymteval ``BLEUScore`` computes it (0..1).

    Its quirks, kept on purpose: n-grams are lowercased; the candidate length for order n adds
    ``len(hyp) - n + 1`` per sentence even when that is negative; a zero n-gram precision is
    smoothed to 1e-15 hits (so BLEU is tiny but not 0); the brevity penalty applies when the
    candidate is not longer than the reference.
    """
    hits = [0] * max_ngram
    cand_lens = [0] * max_ngram
    ref_len = 0
    for hyp, refs in _mteval_tokenized(references, hypotheses):
        for i in range(max_ngram):
            n = i + 1
            hits[i] += sum(_clipped_hits(hyp, _max_ref_counts(refs, n), n).values())
            cand_lens[i] += len(hyp) - i
        ref_len += _closest_ref_length(len(hyp), (len(ref) for ref in refs))

    brevity = 1.0
    if cand_lens[0] <= ref_len:
        brevity = math.exp(1.0 - ref_len / (float(cand_lens[0]) if cand_lens[0] else 1e-5))
    log_precision_sum = 0.0
    for n_hits, n_len in zip(hits, cand_lens):
        log_precision_sum += math.log(max(n_hits + 0.0, 1e-15) / max(n_len + 0.0, 1e-9))
    return brevity * math.exp((1.0 / max_ngram) * log_precision_sum)


# NIST's length-penalty constant from mteval-v13a: penalty 0.5 at a 2/3 length ratio.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def pymteval_nist(references: Sequence[Sequence[str]], hypotheses: Sequence[str], max_ngram: int = 5) -> float:
    """Corpus NIST exactly as e2e-metrics' pymteval ``NISTScore`` computes it.

    Information weights come from n-gram counts over *all* references of the corpus (with the
    total reference word count as the 0-gram count); the length penalty uses the sum over inputs
    of each input's average reference length.
    """
    ref_counts: list[Counter] = [Counter() for _ in range(max_ngram + 1)]
    hits_per_order: list[list[dict]] = [[] for _ in range(max_ngram)]
    cand_lens = [0] * max_ngram
    avg_ref_len = 0.0
    for hyp, refs in _mteval_tokenized(references, hypotheses):
        for i in range(max_ngram):
            n = i + 1
            cand_lens[i] += len(hyp) - i
            hits_per_order[i].append(_clipped_hits(hyp, _max_ref_counts(refs, n), n))
            for ref in refs:
                ref_counts[n].update(_ngrams(ref, n))
        ref_words = sum(len(ref) for ref in refs)
        ref_counts[0][()] += ref_words
        avg_ref_len += ref_words / float(len(refs))

    def information(ngram: tuple[str, ...]) -> float:
        return math.log(ref_counts[len(ngram) - 1][ngram[:-1]] / float(ref_counts[len(ngram)][ngram]), 2)

    nist_sum = 0.0
    for i in range(max_ngram):
        hit_info = 0.0
        for sentence_hits in hits_per_order[i]:
            hit_info += sum(information(ngram) * count for ngram, count in sentence_hits.items())
        # The official script divides by zero here; see difference 1 in the module docstring.
        nist_sum += hit_info / (cand_lens[i] if cand_lens[i] != 0 else 1)

    ratio = cand_lens[0] / float(avg_ref_len)
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return penalty * nist_sum


def multi_bleu_detok(references: Sequence[Sequence[str]], hypotheses: Sequence[str], max_ngram: int = 4) -> float:
    """Corpus BLEU (0..100) as Moses ``multi-bleu-detok.perl`` computes it (case-sensitive).

    Unlike pymteval: n-gram totals count only existing n-grams, a zero precision gives BLEU 0,
    and empty references still count when picking the closest reference length.
    """
    correct = [0] * max_ngram
    total = [0] * max_ngram
    hyp_len_sum = 0
    ref_len_sum = 0
    for group, hyp_text in zip(references, hypotheses):
        hyp = mteval_tokenize(hyp_text)
        hyp = hyp if hyp != [""] else []
        refs = [tokens if tokens != [""] else [] for tokens in (mteval_tokenize(ref) for ref in group)]
        hyp_len_sum += len(hyp)
        ref_len_sum += _closest_ref_length(len(hyp), (len(ref) for ref in refs))
        for i in range(max_ngram):
            n = i + 1
            total[i] += max(len(hyp) - i, 0)
            correct[i] += sum(_clipped_hits(hyp, _max_ref_counts(refs, n), n).values())
    if ref_len_sum == 0 or hyp_len_sum == 0:
        return 0.0
    precisions = [c / t if t else 0.0 for c, t in zip(correct, total)]
    if min(precisions) == 0.0:
        return 0.0
    brevity = math.exp(1 - ref_len_sum / hyp_len_sum) if hyp_len_sum < ref_len_sum else 1.0
    return 100 * brevity * math.exp(sum(math.log(p) for p in precisions) / max_ngram)


# ----------------------------------------------------------------------------------------------
# COCO caption metrics (METEOR, ROUGE_L, CIDEr) via pycocoevalcap
# ----------------------------------------------------------------------------------------------

_METEOR_LOCK = threading.Lock()
_METEOR = None


def _require_java() -> None:
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "METEOR and the Stanford PTB tokenizer (pycocoevalcap) need a Java runtime, and `java` is "
            f"not on PATH; install one, e.g. `{JAVA_INSTALL_HINT}`"
        )


def _meteor():
    """One METEOR 1.5 Java process per Python process (its start-up costs seconds)."""
    global _METEOR
    _require_java()
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR = Meteor()
        return _METEOR


@contextlib.contextmanager
def _java_stderr_kept_for_errors():
    """The Stanford tokenizer writes a "PTBTokenizer tokenized N tokens" line to the inherited stderr on every call;
    hold the process's stderr (file descriptor 2, which the Java child inherits) in a temporary file and replay it
    only when the call fails, so that a real error still shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ptb_tokenize(texts_per_input: Sequence[Sequence[str]]) -> list[list[str]]:
    """Stanford PTB tokenization as the COCO evaluator does it: lowercased, punctuation dropped."""
    _require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {i: [{"caption": text} for text in texts] for i, texts in enumerate(texts_per_input)}
    with _java_stderr_kept_for_errors():
        tokenized = PTBTokenizer().tokenize(captions)
    return [tokenized[i] for i in range(len(texts_per_input))]


def coco_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr as the e2e-metrics COCO evaluator computes them."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # References and outputs go through the tokenizer in two separate batches, as in the official
    # evaluator; the dict key order (input order) fixes the order of METEOR's aggregate.
    gts = dict(enumerate(ptb_tokenize(references)))
    res = dict(enumerate(ptb_tokenize([[hyp] for hyp in hypotheses])))
    meteor = _meteor()
    scores = {"METEOR": float(meteor.compute_score(gts, res)[0])}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def score_e2e(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """Score outputs as ``measure_scores.py -p`` of the E2E NLG Challenge does.

    ``references[i]`` holds all references of input i, ``hypotheses[i]`` its system output.
    Returns BLEU, NIST, METEOR, ROUGE_L and CIDEr on the official scales (BLEU and ROUGE_L in 0..1).
    """
    _check_inputs(references, hypotheses)
    references = [[ref.strip() for ref in group] for group in references]
    hypotheses = [hyp.strip() for hyp in hypotheses]
    scores = {
        "BLEU": pymteval_bleu(references, hypotheses),
        "NIST": pymteval_nist(references, hypotheses),
    }
    scores.update(coco_scores(references, hypotheses))
    return {name: scores[name] for name in E2E_METRICS}


# ----------------------------------------------------------------------------------------------
# WebNLG GenerationEval (BLEU, METEOR, TER)
# ----------------------------------------------------------------------------------------------

_NLTK_TOKENIZERS = None


def _nltk_tokenizers():
    """(sentence splitter, word tokenizer) that make up ``nltk.word_tokenize``, built once."""
    global _NLTK_TOKENIZERS
    if _NLTK_TOKENIZERS is None:
        try:
            import nltk
            from nltk.tokenize import NLTKWordTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the WebNLG/DART metrics tokenize like GenerationEval with NLTK: `pip install nltk`") from exc
        try:
            nltk.data.find("tokenizers/punkt_tab/english/")

            def split_sentences(text: str) -> list[str]:
                return nltk.sent_tokenize(text, language="english")

        except LookupError:
            warnings.warn(
                "NLTK's punkt_tab model is not installed; WebNLG METEOR/TER split sentences with an "
                "untrained Punkt tokenizer, which can differ from GenerationEval around abbreviations",
                stacklevel=3,
            )
            from nltk.tokenize.punkt import PunktSentenceTokenizer

            split_sentences = PunktSentenceTokenizer().tokenize
        _NLTK_TOKENIZERS = (split_sentences, NLTKWordTokenizer())
    return _NLTK_TOKENIZERS


def nltk_word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` as GenerationEval calls it (offline: see difference 4 above)."""
    split_sentences, word_tokenizer = _nltk_tokenizers()
    return [token for sentence in split_sentences(text) for token in word_tokenizer.tokenize(sentence)]


_TER = None


def _sentence_ter(hyp: str, ref: str) -> float:
    """One sentence's TER against one reference, on whitespace-split words as pyter sees them."""
    global _TER
    if not ref:
        return 1.0  # GenerationEval's rule for an empty reference
    if _TER is None:
        from sacrebleu.metrics import TER

        # pyter: case-sensitive, no normalization or punctuation handling.
        _TER = TER(case_sensitive=True)
    return _TER.sentence_score(hyp, [ref]).score / 100.0


def score_webnlg(
    references: Sequence[Sequence[str]],
    hypotheses: Sequence[str],
    trailing_empty_segment: bool = False,
) -> dict[str, float]:
    """Score outputs as WebNLG GenerationEval ``eval.py -m bleu,meteor,ter`` (LoRA's DART/WebNLG setup).

    Returns BLEU (multi-bleu-detok, 0..100), METEOR (0..1) and TER (0..1). ``references[i]`` may hold
    any number of references (LoRA pads missing ones with the first, which changes nothing).
    ``trailing_empty_segment=True`` adds the empty segment (TER 1.0) that GenerationEval sees in
    newline-terminated files; see difference 6 in the module docstring.
    """
    _check_no_line_breaks(hypotheses, "hypothesis")
    if len(hypotheses) == 0 or len(references) != len(hypotheses):
        raise MetricsInputError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference groups; they must match one to one"
        )
    for i, group in enumerate(references):
        if not group:
            raise MetricsInputError(f"reference group {i} is empty; every input needs a reference")
        _check_no_line_breaks(group, f"input {i}, reference")

    bleu = multi_bleu_detok(references, hypotheses)

    hyps_tok = [" ".join(nltk_word_tokenize(hyp)) for hyp in hypotheses]
    refs_tok = [[" ".join(nltk_word_tokenize(ref)) for ref in group] for group in references]

    meteor = _meteor()
    # pycocoevalcap's Meteor asserts one hypothesis per input while holding its lock; a failed assert
    # would leave the lock taken and hang the interpreter at exit, so the shapes here must be right.
    gts = {i: list(group) for i, group in enumerate(refs_tok)}
    res = {i: [hyp] for i, hyp in enumerate(hyps_tok)}
    meteor_score = float(meteor.compute_score(gts, res)[0])

    ter_per_segment = [min(_sentence_ter(hyp, ref) for ref in group) for hyp, group in zip(hyps_tok, refs_tok)]
    if trailing_empty_segment:
        ter_per_segment.append(1.0)
    ter = sum(ter_per_segment) / len(ter_per_segment)
    return {"BLEU": bleu, "METEOR": meteor_score, "TER": ter}


def lora_postprocess(text: str, tokenize: bool = True, lower: bool = True) -> str:
    """LoRA's ``gpt2_decode.py --tokenize --lower`` post-processing of outputs and references.

    Lowercases, then puts spaces around every non-word character. LoRA (and NOLA, which reuses its
    scripts) apply it to both sides before writing the files the official scorers read.
    """
    if lower:
        text = text.lower()
    if tokenize:
        text = " ".join(" ".join(re.split(r"(\W)", text)).split())
    return text


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.metrics",
        description="Score NLG outputs like the official E2E (measure_scores.py -p) or WebNLG GenerationEval scripts.",
    )
    parser.add_argument("--refs", required=True, help="references: one per line, a blank line between inputs")
    parser.add_argument("--hyps", required=True, help="system outputs: one per line, same order as --refs")
    parser.add_argument("--suite", choices=("e2e", "webnlg"), default="e2e", help="metric suite (default e2e)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    try:
        references, hypotheses = load_pair(args.refs, args.hyps)
        scores = score_e2e(references, hypotheses) if args.suite == "e2e" else score_webnlg(references, hypotheses)
    except (MetricsInputError, JavaNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scores))
    else:
        for name, value in scores.items():
            print(f"{name}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
