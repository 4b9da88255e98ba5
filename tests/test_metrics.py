"""Tests for recipes.metrics against the official E2E / WebNLG scoring scripts and hand arithmetic.

Golden values: printed by the official E2E script, ``measure_scores.py -p REFS HYPS`` from
tuetschek/e2e-metrics (pymteval.py as published; pycocoevalcap 1.2's tokenizer/METEOR/ROUGE/CIDEr
and jars in place of its vendored Python-2-era copy), run from a scratch directory outside this
repository on shared/data/e2e-metrics-cases. The full-precision repr() of each score is pinned
too; the official script prints 4 decimals. Python-3 fixes in that scratch copy: a two-line
``past.utils.old_div`` shim (the ``future`` package is not installed), ``COCO.loadRes(anns)``
instead of the vendored ``loadRes(resData=...)``, and the vendored ``pycocoevalcap/eval.py``
(METEOR, ROUGE_L, CIDEr only) ported to print().

WebNLG/DART golden values: WebNLG GenerationEval ``eval.py -nr 3 -m bleu,meteor,ter`` (scratch copy,
Perl multi-bleu-detok.perl from moses, METEOR 1.5 jar, pyter 0.3, NLTK 3.10.4) on a case built from
LoRA's DART references (``_dart_case`` below).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import metrics
from recipes.metrics import (
    JavaNotFoundError,
    MetricsInputError,
    load_pair,
    multi_bleu_detok,
    pymteval_bleu,
    pymteval_nist,
    read_hypotheses,
    read_references,
    score_e2e,
    write_hypotheses,
    write_references,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("PEFT_NOLA_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


CASES_DIR = _data_dir() / "e2e-metrics-cases"

# measure_scores.py -p output (printed '%.4f') and, in the comment, the repr of the raw float.
OFFICIAL_E2E = {
    # BLEU 0.7202928494322162, NIST 7.788887609555574, METEOR 0.4800716745732023,
    # ROUGE_L 0.7909526131515365, CIDEr 2.303943135258847
    "example": {"BLEU": 0.7203, "NIST": 7.7889, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039},
    # BLEU 2.3446607111120727e-05 (no 4-gram survives: pymteval's 1e-15 smoothing), NIST 3.191928933842666,
    # METEOR 0.3291866481187682, ROUGE_L 0.6524795004270845, CIDEr 0.8752973557857417
    "drop_every_3rd_word": {"BLEU": 0.0000, "NIST": 3.1919, "METEOR": 0.3292, "ROUGE_L": 0.6525, "CIDEr": 0.8753},
    # BLEU 0.5923741694403448, NIST 7.223649491597212, METEOR 0.44685250137693855,
    # ROUGE_L 0.7335450878216883, CIDEr 2.112133724900052
    "lower_shuffle_every_5th": {"BLEU": 0.5924, "NIST": 7.2236, "METEOR": 0.4469, "ROUGE_L": 0.7335, "CIDEr": 2.1121},
    # BLEU 0.4929152588806297, NIST 5.859571734866333, METEOR 0.41570262688068615,
    # ROUGE_L 0.6370770073787069, CIDEr 2.84407229438146
    "e2e_style_tokenization": {"BLEU": 0.4929, "NIST": 5.8596, "METEOR": 0.4157, "ROUGE_L": 0.6371, "CIDEr": 2.8441},
}
OFFICIAL_E2E_RAW_BLEU_NIST = {
    "example": (0.7202928494322162, 7.788887609555574),
    "drop_every_3rd_word": (2.3446607111120727e-05, 3.191928933842666),
    "lower_shuffle_every_5th": (0.5923741694403448, 7.223649491597212),
    "e2e_style_tokenization": (0.4929152588806297, 5.859571734866333),
}

needs_cases = pytest.mark.skipif(
    not CASES_DIR.is_dir(),
    reason=f"E2E metric cases not found at {CASES_DIR} (set PEFT_NOLA_DATA_DIR to the shared data folder)",
)


@pytest.fixture(scope="module")
def official_cases_scored():
    """Score every shared case once: METEOR's Java start-up (seconds) is paid once per module."""
    if not CASES_DIR.is_dir():
        pytest.skip(f"E2E metric cases not found at {CASES_DIR}")
    scored = {}
    for case in OFFICIAL_E2E:
        refs, hyps = load_pair(CASES_DIR / case / "refs.txt", CASES_DIR / case / "hyps.txt")
        scored[case] = score_e2e(refs, hyps)
    return scored


# --------------------------------------------------------------------------- golden values


@needs_cases
@pytest.mark.parametrize("case", sorted(OFFICIAL_E2E))
def test_e2e_matches_official_script_to_the_printed_digit(official_cases_scored, case):
    ours = official_cases_scored[case]
    assert list(ours) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    printed = {name: float(f"{value:.4f}") for name, value in ours.items()}
    assert printed == OFFICIAL_E2E[case]


@needs_cases
@pytest.mark.parametrize("case", sorted(OFFICIAL_E2E_RAW_BLEU_NIST))
def test_pymteval_bleu_nist_match_official_floats(case):
    refs, hyps = load_pair(CASES_DIR / case / "refs.txt", CASES_DIR / case / "hyps.txt")
    bleu, nist = OFFICIAL_E2E_RAW_BLEU_NIST[case]
    assert pymteval_bleu(refs, hyps) == pytest.approx(bleu, rel=1e-12, abs=0)
    assert pymteval_nist(refs, hyps) == pytest.approx(nist, rel=1e-12, abs=0)


@needs_cases
def test_example_case_file_shapes():
    # example/: first 10 inputs of the E2E devset with their 137 human references (README.md).
    refs, hyps = load_pair(CASES_DIR / "example" / "refs.txt", CASES_DIR / "example" / "hyps.txt")
    assert len(refs) == len(hyps) == 10
    assert sum(len(group) for group in refs) == 137


def test_e2e_edge_case_matches_official_script(tmp_path):
    # An empty output line, "|||" (METEOR's field separator), "£", quotes and a group of two
    # references; the official measure_scores.py -p on these exact bytes printed (raw floats):
    # BLEU 7.547373243020655e-05, NIST 1.8476748765582747, METEOR 0.27436343982782796,
    # ROUGE_L 0.4921178421617403, CIDEr 1.439088609376941.
    (tmp_path / "refs.txt").write_text(
        'The Eagle is a pub.\nIt is a pub.\n\nCheap food, £20.\nLow prices\n\nA | B ||| C\nTwo refs here "quoted".\n\n',
        encoding="utf-8",
    )
    (tmp_path / "hyps.txt").write_text("the eagle pub\n\nA ||| B c\n", encoding="utf-8")
    scores = score_e2e(*load_pair(tmp_path / "refs.txt", tmp_path / "hyps.txt"))
    official = {"BLEU": 7.547373243020655e-05, "NIST": 1.8476748765582747, "METEOR": 0.27436343982782796,
                "ROUGE_L": 0.4921178421617403, "CIDEr": 1.439088609376941}
    for name, value in official.items():
        assert scores[name] == pytest.approx(value, rel=1e-12), name


# --------------------------------------------------------------------------- hand-computed


def test_pymteval_bleu_single_input_by_hand():
    # hyp "A b C d e" (lowercased n-grams), refs "a b c d f" / "a b c x e"; clipped matches:
    #   1-grams a b c d e      -> 5/5      2-grams ab bc cd (not de) -> 3/4
    #   3-grams abc bcd        -> 2/3      4-grams abcd (not bcde)  -> 1/2
    # both refs have 5 tokens = hyp length, so BP = exp(1 - 5/5) = 1.
    # BLEU = (1 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.25 ** 0.25 = 1/sqrt(2)
    bleu = pymteval_bleu([["a b c d f", "a b c x e"]], ["A b C d e"])
    assert bleu == pytest.approx(1 / math.sqrt(2), rel=1e-12)


def test_pymteval_bleu_counts_negative_candidate_lengths():
    # Input 1 as above: hits [5,3,2,1], candidate n-gram counts [5,4,3,2], closest ref length 5.
    # Input 2: hyp "g h", refs "g h i j" (4 tokens) / "g" (1 token):
    #   hits: unigrams g h -> 2, bigram gh -> 1, none above.
    #   pymteval adds len(hyp) - n + 1 per order: 2, 1, 0, -1 (negative, not clipped at 0).
    #   closest ref length: |4-2| = 2 vs |1-2| = 1 -> 1.
    # Totals: hits [7,4,2,1], lengths [7,5,3,1]; ref length 5+1 = 6 < 7, so BP = 1.
    # BLEU = (7/7 * 4/5 * 2/3 * 1/1) ** (1/4) = (8/15) ** (1/4); textbook BLEU would use 2 4-grams.
    bleu = pymteval_bleu([["a b c d f", "a b c x e"], ["g h i j", "g"]], ["A b C d e", "g h"])
    assert bleu == pytest.approx((8 / 15) ** 0.25, rel=1e-12)


def test_pymteval_bleu_brevity_penalty_and_tiny_smoothing():
    # hyp "a b c" vs ref "a b c d e f": precisions 3/3, 2/2, 1/1 and 0/0 4-grams -> 1e-15 / 1e-9
    # (pymteval's floors), BP = exp(1 - 6/3) = e^-1.
    # BLEU = e^-1 * (1 * 1 * 1 * 1e-6) ** (1/4)
    bleu = pymteval_bleu([["a b c d e f"]], ["a b c"])
    assert bleu == pytest.approx(math.exp(-1) * 1e-6**0.25, rel=1e-9)


def test_pymteval_nist_by_hand():
    # Input 1: hyp "a b c d e", ref "a b c d e"; input 2: hyp "a b", ref "a b c d e".
    # Reference n-gram counts over the corpus: 10 words; each unigram 2, each bigram 2, ...
    # info(w) = log2(10 / 2) = log2 5 for unigrams; info of any longer n-gram = log2(2/2) = 0.
    # Unigram term: (5 + 2 matches) * log2 5 / 7 candidate unigrams = log2 5; other terms 0.
    # Length penalty: 7 output words vs 5 + 5 average reference words, ratio 0.7:
    #   exp(-beta * ln(0.7)^2), beta = -ln(0.5) / ln(1.5)^2 (mteval-v13a: 0.5 at ratio 2/3).
    nist = pymteval_nist([["a b c d e"], ["a b c d e"]], ["a b c d e", "a b"])
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert nist == pytest.approx(math.log2(5) * math.exp(-beta * math.log(0.7) ** 2), rel=1e-12)


def test_pymteval_nist_reference_information_weights():
    # hyp "a b x y z", refs "a b c d e" / "a c f g h": 10 reference words; counts a:2 b:1;
    # bigram (a b):1.  Matches: unigrams a, b and bigram "a b"; x, y, z and longer n-grams miss.
    # info(a) = log2(10/2), info(b) = log2(10/1), info(a b) = log2(count(a) / count(a b)) = log2(2/1) = 1.
    # Unigram term (log2 5 + log2 10) / 5 candidate unigrams, bigram term 1 / 4, others 0.
    # Length: 5 output words vs average reference length 5 -> no penalty.
    nist = pymteval_nist([["a b c d e", "a c f g h"]], ["a b x y z"])
    assert nist == pytest.approx((math.log2(5) + math.log2(10)) / 5 + 1 / 4, rel=1e-12)


def test_pymteval_nist_without_bigrams_does_not_crash():
    # Documented difference 1: one-word outputs leave no bigram in the corpus; the official script
    # divides by zero there, we count that order's length as 1 (its hit information is 0 anyway).
    # hyp "a", ref "a b": info(a) = log2(2 ref words / 1) = 1 over 1 unigram; output 1 word vs
    # reference 2 -> ratio 0.5 -> penalty exp(-beta * ln(0.5)^2).
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert pymteval_nist([["a b"]], ["a"]) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), rel=1e-12)


def test_multi_bleu_detok_is_case_sensitive_and_zero_without_4gram_match():
    # Same n-gram arithmetic as the pymteval hand case: 100 * 0.25 ** 0.25.
    assert multi_bleu_detok([["a b c d f", "a b c x e"]], ["a b c d e"]) == pytest.approx(100 / math.sqrt(2))
    # Case-sensitive: "A b C d e" matches only b, d, e and no bigram -> BLEU 0 (no smoothing).
    assert multi_bleu_detok([["a b c d f", "a b c x e"]], ["A b C d e"]) == 0.0


def test_mteval_tokenization_of_e2e_text():
    # mteval-v13a splits ASCII punctuation except "'" and "-" (kept inside words), splits a dash
    # only after a digit, keeps "." and "," between digits; "£" is not ASCII and stays attached.
    assert metrics.mteval_tokenize("It's £20-25, 3.5 stars.") == ["It's", "£20", "-", "25", ",", "3.5", "stars", "."]
    assert metrics.mteval_tokenize('Hi (there) x-y 3,000 "q"') == ["Hi", "(", "there", ")", "x-y", "3,000", '"', "q", '"']
    assert metrics.mteval_tokenize("") == [""]


# --------------------------------------------------------------------------- file formats / CLI


def test_reference_and_hypothesis_files_round_trip(tmp_path):
    refs = [["First ref.", "Second ref."], ["Only ref."]]
    hyps = ["out one", ""]
    write_references(tmp_path / "refs.txt", refs)
    write_hypotheses(tmp_path / "hyps.txt", hyps)
    assert (tmp_path / "refs.txt").read_text() == "First ref.\nSecond ref.\n\nOnly ref.\n\n"
    assert read_references(tmp_path / "refs.txt") == refs
    assert read_hypotheses(tmp_path / "hyps.txt") == hyps


def test_reference_file_without_blank_lines_is_single_reference(tmp_path):
    # The official reader treats a file with no blank separator as one reference per input.
    (tmp_path / "refs.txt").write_text("ref one\nref two\n")
    assert read_references(tmp_path / "refs.txt") == [["ref one"], ["ref two"]]


def test_count_mismatch_names_both_counts_and_file(tmp_path):
    write_references(tmp_path / "refs.txt", [["a"], ["b"], ["c"]])
    write_hypotheses(tmp_path / "hyps.txt", ["a", "b"])
    with pytest.raises(MetricsInputError) as err:
        load_pair(tmp_path / "refs.txt", tmp_path / "hyps.txt")
    message = str(err.value)
    assert "2 hypotheses" in message and "3 reference groups" in message and "hyps.txt" in message


def test_empty_files_are_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MetricsInputError, match="empty"):
        read_references(tmp_path / "empty.txt")
    with pytest.raises(MetricsInputError, match="empty"):
        read_hypotheses(tmp_path / "empty.txt")
    with pytest.raises(MetricsInputError, match="no such file"):
        read_hypotheses(tmp_path / "missing.txt")


def test_api_rejects_mismatch_and_line_breaks():
    with pytest.raises(MetricsInputError, match="2 hypotheses but 1 reference groups"):
        score_e2e([["a"]], ["a", "b"])
    with pytest.raises(MetricsInputError, match="line break"):
        score_e2e([["a"]], ["a\nb"])
    with pytest.raises(MetricsInputError, match="empty"):
        score_e2e([[]], ["a"])


def test_missing_java_names_the_install_command(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="apt-get install default-jre-headless"):
        metrics.ptb_tokenize([["a"]])


def test_cli_prints_json_scores(tmp_path, capsys):
    # The two hand-computed BLEU inputs above, through the files and the CLI.
    refs = [["a b c d f", "a b c x e"], ["g h i j", "g"]]
    hyps = ["A b C d e", "g h"]
    write_references(tmp_path / "refs.txt", refs)
    write_hypotheses(tmp_path / "hyps.txt", hyps)
    # In-process so the METEOR Java process started by other tests is reused (seconds each start);
    # test_cli_reports_count_mismatch runs the real `python -m recipes.metrics` entry point.
    code = metrics.main(["--refs", str(tmp_path / "refs.txt"), "--hyps", str(tmp_path / "hyps.txt"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    scores = json.loads(out.out.strip().splitlines()[-1])
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores["BLEU"] == pytest.approx((8 / 15) ** 0.25, rel=1e-12)
    # ROUGE_L (beta 1.2) on PTB tokens, best precision and best recall over references taken apart:
    #   input 1: LCS 4 with either ref -> P = R = 4/5 -> F = 0.8
    #   input 2: "g h" vs "g h i j" P = 1 (R 1/2); vs "g" R = 1 -> P_max = R_max = 1 -> F = 1
    # mean 0.9
    assert scores["ROUGE_L"] == pytest.approx(0.9, rel=1e-12)
    assert 0.0 < scores["METEOR"] < 1.0


def test_single_multi_reference_input_cannot_be_written(tmp_path):
    # The official reader takes a file with one group as one reference per input, so writing
    # one input with two references would be read back as two inputs.
    with pytest.raises(MetricsInputError, match="single input"):
        write_references(tmp_path / "refs.txt", [["ref one", "ref two"]])


def test_cli_reports_count_mismatch(tmp_path):
    write_references(tmp_path / "refs.txt", [["a"], ["b"]])
    write_hypotheses(tmp_path / "hyps.txt", ["a"])
    out = subprocess.run(
        [sys.executable, "-m", "recipes.metrics", "--refs", str(tmp_path / "refs.txt"),
         "--hyps", str(tmp_path / "hyps.txt"), "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "1 hypotheses" in out.stderr and "2 reference groups" in out.stderr


def test_lora_postprocess_matches_gpt2_decode():
    # gpt2_decode.py --tokenize --lower: lowercase, split around every non-word character.
    assert metrics.lora_postprocess("The Eagle's price: £20-25.") == "the eagle ' s price : £ 20 - 25 ."


# --------------------------------------------------------------------------- WebNLG / DART suite

try:
    import nltk  # noqa: F401

    HAVE_NLTK = True
except ImportError:
    HAVE_NLTK = False

needs_nltk = pytest.mark.skipif(not HAVE_NLTK, reason="WebNLG METEOR/TER tokenize with NLTK: pip install nltk")
DART_REFS_DIR = _data_dir() / "dart" / "lora_eval_refs_2020test"

# GenerationEval eval.py (BLEU via multi-bleu-detok.perl, METEOR 1.5 file mode -l en -norm -r 3, TER via
# pyter 0.3; nltk.word_tokenize with an untrained Punkt splitter, as punkt_tab is not installable here)
# on _dart_case(): raw floats, printed as BLEU 57.75, METEOR 0.45, TER 0.23.
OFFICIAL_DART_CASE = {"BLEU": 57.754299410984679, "METEOR": 0.4542320544515711, "TER": 0.23476078864496694}


def _dart_case(start: int = 1600, count: int = 60) -> tuple[list[list[str]], list[str]]:
    """Inputs 1600..1659 of LoRA's DART references (1-3 references each, padded with empty lines)
    and synthetic outputs from reference0: even inputs drop every third word, every tenth input
    (i % 10 == 1) has its words reversed, the rest are copied."""
    columns = [
        (DART_REFS_DIR / f"reference{k}.txt").read_text(encoding="utf-8").split("\n")[start : start + count]
        for k in range(3)
    ]
    hypotheses = []
    for i, line in enumerate(columns[0]):
        words = line.split()
        if i % 2 == 0:
            words = [w for j, w in enumerate(words) if j % 3 != 2]
        elif i % 5 == 1:
            words = words[::-1]
        hypotheses.append(" ".join(words))
    return [list(group) for group in zip(*columns)], hypotheses


@needs_nltk
@pytest.mark.skipif(not DART_REFS_DIR.is_dir(), reason=f"LoRA DART references not found at {DART_REFS_DIR}")
@pytest.mark.filterwarnings("ignore:NLTK's punkt_tab")
def test_webnlg_suite_matches_generationeval_on_dart_case():
    references, hypotheses = _dart_case()
    assert sum(1 for group in references for ref in group if not ref) > 0  # empty padded references occur
    ours = metrics.score_webnlg(references, hypotheses)
    assert ours["BLEU"] == pytest.approx(OFFICIAL_DART_CASE["BLEU"], rel=1e-12)
    assert ours["METEOR"] == pytest.approx(OFFICIAL_DART_CASE["METEOR"], rel=1e-12)
    # GenerationEval prints round(x, 2); sacrebleu's tercom shifts differ from pyter's on one
    # reversed sentence here (module docstring, difference 5).
    assert round(ours["TER"], 2) == round(OFFICIAL_DART_CASE["TER"], 2)
    assert ours["TER"] == pytest.approx(OFFICIAL_DART_CASE["TER"], abs=5e-4)


@needs_nltk
@pytest.mark.filterwarnings("ignore:NLTK's punkt_tab")
def test_webnlg_ter_by_hand():
    # hyp "a b c d": vs "a b c e" one substitution over 4 reference words = 0.25; vs the empty
    # (padding) reference GenerationEval scores 1.0; the minimum is 0.25.
    scores = metrics.score_webnlg([["a b c e", ""]], ["a b c d"])
    assert scores["TER"] == pytest.approx(0.25)
    # With GenerationEval's extra empty segment from a newline-terminated file: (0.25 + 1) / 2.
    assert metrics.score_webnlg([["a b c e", ""]], ["a b c d"], trailing_empty_segment=True)["TER"] == pytest.approx(0.625)


@needs_nltk
@pytest.mark.filterwarnings("ignore:NLTK's punkt_tab")
def test_cli_webnlg_suite(tmp_path, capsys):
    # BLEU: the multi-bleu-detok hand case above (100 / sqrt 2) plus an exact copy "g h i j" of
    # its reference: hits [5+4, 3+3, 2+2, 1+1] over [5+4, 4+3, 3+2, 2+1] n-grams, lengths 9 = 9.
    # BLEU = 100 * (1 * 6/7 * 4/5 * 2/3) ** (1/4)
    write_references(tmp_path / "refs.txt", [["a b c d f", "a b c x e"], ["g h i j"]])
    write_hypotheses(tmp_path / "hyps.txt", ["a b c d e", "g h i j"])
    code = metrics.main(
        ["--refs", str(tmp_path / "refs.txt"), "--hyps", str(tmp_path / "hyps.txt"), "--suite", "webnlg", "--json"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    scores = json.loads(out.out.strip().splitlines()[-1])
    assert list(scores) == ["BLEU", "METEOR", "TER"]
    assert scores["BLEU"] == pytest.approx(100 * (6 / 7 * 4 / 5 * 2 / 3) ** 0.25, rel=1e-12)
    # TER: input 1 one substitution over 5 words (either reference) = 0.2, input 2 exact = 0.
    assert scores["TER"] == pytest.approx(0.1)
