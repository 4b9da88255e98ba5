"""recipes/nlg_data.py: the readers linearise like the LoRA code and group references per input."""

import json

import pytest

from recipes.nlg_data import (
    DataFileError,
    linearize_e2e_csv_mr,
    read_dart,
    read_e2e,
    read_webnlg,
    subsample,
    training_pairs,
)
from tests.conftest import shared_data_dir

DATA = shared_data_dir()


def need(*relative):
    paths = [DATA / r for r in relative]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"real data not present ({', '.join(missing)}); see ../shared/data/MANIFEST.md")
    return paths if len(paths) > 1 else paths[0]


def test_e2e_csv_mr_uses_the_lora_attribute_names():
    mr = "name[The Eagle], eatType[coffee shop], priceRange[£20-25], familyFriendly[yes], near[Burger King]"
    assert linearize_e2e_csv_mr(mr) == (
        "name : The Eagle | Type : coffee shop | price : £20-25 | family friendly : yes | near : Burger King"
    )


def test_e2e_text_file_groups_references_in_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a : 1 | b : 2||First ref . \nc : 3||Other . \na : 1 | b : 2||Second ref . \n\n")
    examples = read_e2e(path)
    assert [e.source for e in examples] == ["a : 1 | b : 2", "c : 3"]
    assert examples[0].references == ["First ref .", "Second ref ."]
    assert training_pairs(examples) == [("a : 1 | b : 2", "First ref ."), ("a : 1 | b : 2", "Second ref ."),
                                        ("c : 3", "Other .")]


def test_dart_lowercases_relations(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"tripleset": [["Mars Hill College", "JOINED", "1973"], ["X", "LOCATION", "Y"]],
                                 "annotations": [{"source": "s", "text": "A school joined in 1973. "}]}]))
    (example,) = read_dart(path)
    assert example.source == "Mars Hill College : joined : 1973 | X : location : Y"
    assert example.references == ["A school joined in 1973."]


def test_webnlg_keeps_good_lexicalisations_and_tags_unseen(tmp_path):
    entry = {"category": "Artist", "modifiedtripleset": [{"subject": "A_B", "property": "genre", "object": "Rock"}],
             "lexicalisations": [{"comment": "good", "lex": "A B plays rock."},
                                 {"comment": "toFix", "lex": "bad one"}]}
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"entries": [{"1": entry}]}))
    (example,) = read_webnlg(path)
    assert example.source == "A_B : genre : Rock"
    assert example.references == ["A B plays rock."]
    assert example.category == "Artist" and example.seen is False


def test_missing_file_says_where_data_comes_from(tmp_path):
    with pytest.raises(DataFileError, match=r"e2e data file not found: .*microsoft/LoRA"):
        read_e2e(tmp_path / "train.txt")


def test_subsample_is_seeded_and_bounded():
    items = list(range(100))
    assert subsample(items, 10, seed=3) == subsample(items, 10, seed=3) != subsample(items, 10, seed=4)
    assert subsample(items, None) == items and subsample(items, 5) == [0, 1, 2, 3, 4]


# Real data: counts from ../shared/data/MANIFEST.md and the WebNLG 2017 challenge (971 seen-category test inputs).


def test_real_e2e_test_set_counts_and_csv_agree():
    txt, csv_path = need("e2e/test.txt", "e2e/testset_w_refs.csv")
    from_txt, from_csv = read_e2e(txt), read_e2e(csv_path)
    assert len(from_txt) == 630 and sum(len(e.references) for e in from_txt) == 4693
    # The text file is the tokenised version of the CSV: same inputs (modulo spaces), same reference counts.
    assert [e.source.replace(" ", "") for e in from_txt] == [e.source.replace(" ", "") for e in from_csv]
    assert [len(e.references) for e in from_txt] == [len(e.references) for e in from_csv]


def test_real_webnlg_and_dart_counts():
    webnlg, dart = need("webnlg/test.json", "dart/dart-v1.1.1-full-dev.json")
    test = read_webnlg(webnlg)
    assert len(test) == 1862 and sum(len(e.references) for e in test) == 4928
    assert sum(e.seen for e in test) == 971
    dev = read_dart(dart)
    assert sum(len(e.references) for e in dev) == 6980
