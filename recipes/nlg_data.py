"""Readers for the data-to-text benchmarks of the LoRA / NOLA papers: E2E NLG, DART and WebNLG 2017.

Every reader returns a list of :class:`NLGExample`: one linearised input with *all* its references grouped (what
scoring needs). :func:`training_pairs` expands them to one (input, reference) pair per reference (what training uses,
as in the LoRA code, which trains on every pair).

Linearisation follows microsoft/LoRA ``examples/NLG/src/format_converting_*.py``:

* E2E: ``name : The Vaults | Type : pub | price : more than £ 30`` (the ``mr||ref`` text files already hold it; the
  original CSV's ``name[The Vaults], eatType[pub]`` is mapped onto the same attribute names).
* DART: ``subject : relation : object | ...`` with the relation lower-cased.
* WebNLG: ``subject : property : object | ...`` from ``modifiedtripleset``, keeping lexicalisations whose comment is
  ``good``; categories are tagged seen/unseen by the 10 categories of the training set.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

DATASETS = ("e2e", "dart", "webnlg")

# The ten DBpedia categories of the WebNLG 2017 training data; test inputs from the other five are "unseen".
WEBNLG_SEEN_CATEGORIES = frozenset(
    ["Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam", "University",
     "WrittenWork"]
)

# Attribute names of the E2E CSV files -> the names used by the tokenised ``mr||ref`` files of the LoRA code.
E2E_CSV_ATTRIBUTE_NAMES = {"eatType": "Type", "familyFriendly": "family friendly", "priceRange": "price"}

# Default file names inside each dataset's directory (the layout of ../shared/data and of the LoRA repository).
DEFAULT_FILES = {
    "e2e": {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
    "dart": {"train": "dart-v1.1.1-full-train.json", "validation": "dart-v1.1.1-full-dev.json",
             "test": "dart-v1.1.1-full-test.json"},
    "webnlg": {"train": "train.json", "validation": "dev.json", "test": "test.json"},
}

WHERE_TO_GET = {
    "e2e": "E2E: microsoft/LoRA examples/NLG/data/e2e/{train,valid,test}.txt or tuetschek/e2e-dataset CSVs",
    "dart": "DART: Yale-LILY/dart data/v1.1.1/dart-v1.1.1-full-{train,dev,test}.json",
    "webnlg": "WebNLG 2017: microsoft/LoRA examples/NLG/data/webnlg_challenge_2017/{train,dev,test}.json",
}


class DataFileError(FileNotFoundError):
    """A dataset file is missing or unreadable; the message says where the data comes from."""


@dataclass
class NLGExample:
    """One linearised input and every human reference for it."""

    source: str
    references: list[str]
    category: str | None = None  # WebNLG DBpedia category
    seen: bool | None = None  # WebNLG: category present in the training data


def _group(pairs: Iterable[tuple[str, str, str | None]]) -> list[NLGExample]:
    """Group (source, reference, category) rows by source, keeping first-appearance order."""
    grouped: dict[str, NLGExample] = {}
    for source, reference, category in pairs:
        example = grouped.get(source)
        if example is None:
            seen = None if category is None else category in WEBNLG_SEEN_CATEGORIES
            example = grouped[source] = NLGExample(source, [], category, seen)
        example.references.append(reference)
    return list(grouped.values())


def linearize_e2e_csv_mr(mr: str) -> str:
    """``name[Blue Spice], eatType[coffee shop]`` -> ``name : Blue Spice | Type : coffee shop``."""
    parts = []
    for item in mr.split("],"):
        item = item.strip().rstrip("]")
        if not item:
            continue
        key, _, value = item.partition("[")
        key = key.strip()
        parts.append(f"{E2E_CSV_ATTRIBUTE_NAMES.get(key, key)} : {value.strip()}")
    return " | ".join(parts)


def linearize_triples(triples: Sequence[Sequence[str]], lowercase_relation: bool = False) -> str:
    """``[(s, p, o), ...]`` -> ``s : p : o | s2 : p2 : o2``."""
    return " | ".join(
        f"{s} : {p.lower() if lowercase_relation else p} : {o}" for s, p, o in triples
    )


def _check_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DataFileError(
            f"{dataset} data file not found: {path}. Point data_dir / train_file / test_file at a local copy "
            f"({WHERE_TO_GET[dataset]}), or set $PEFT_NOLA_DATA_DIR to a folder holding {dataset}/."
        )
    return path


def read_e2e(path: str | Path) -> list[NLGExample]:
    """E2E from a LoRA-style ``mr||ref`` text file or an original CSV (columns ``mr`` and ``ref``)."""
    path = _check_file(Path(path), "e2e")
    rows = []
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "mr" not in reader.fieldnames:
                raise DataFileError(f"{path}: expected an E2E CSV with an 'mr' column, got {reader.fieldnames}")
            has_ref = "ref" in reader.fieldnames
            for row in reader:
                rows.append((linearize_e2e_csv_mr(row["mr"]), row["ref"].strip() if has_ref else "", None))
    else:
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                source, sep, reference = line.partition("||")
                if not sep:
                    raise DataFileError(f"{path}:{line_number}: expected 'meaning representation||reference'")
                rows.append((source.strip(), reference.strip(), None))
    return _group(rows)


def read_dart(path: str | Path) -> list[NLGExample]:
    """DART JSON: a list of ``{"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}, ...]}``."""
    path = _check_file(Path(path), "dart")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for item in data:
        source = linearize_triples(item["tripleset"], lowercase_relation=True)
        for annotation in item["annotations"]:
            rows.append((source, annotation["text"].strip(), None))
    return _group(rows)


def read_webnlg(path: str | Path, good_only: bool = True) -> list[NLGExample]:
    """WebNLG 2017 challenge JSON (``{"entries": [{"1": {...}}, ...]}``) with category and seen/unseen tags."""
    path = _check_file(Path(path), "webnlg")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for entry in data["entries"]:
        (item,) = entry.values()
        triples = [(t["subject"], t["property"], t["object"]) for t in item["modifiedtripleset"]]
        source = linearize_triples(triples)
        for lex in item["lexicalisations"]:
            if good_only and lex.get("comment", "good") != "good":
                continue
            rows.append((source, lex["lex"].strip(), item["category"]))
    return _group(rows)


READERS = {"e2e": read_e2e, "dart": read_dart, "webnlg": read_webnlg}


def read_split(dataset: str, path: str | Path) -> list[NLGExample]:
    """Read ``path`` with the reader for ``dataset`` (one of :data:`DATASETS`)."""
    if dataset not in READERS:
        raise ValueError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")
    return READERS[dataset](path)


def load_hub_split(dataset: str, hub_name: str, split: str) -> list[NLGExample]:
    """The same examples from a Hugging Face hub dataset (needs internet): e2e_nlg, dart, web_nlg."""
    from datasets import load_dataset

    rows = []
    if dataset == "e2e":
        for r in load_dataset(hub_name, split=split):
            rows.append((linearize_e2e_csv_mr(r["meaning_representation"]), r["human_reference"].strip(), None))
    elif dataset == "dart":
        for r in load_dataset(hub_name, split=split):
            source = linearize_triples(r["tripleset"], lowercase_relation=True)
            rows.extend((source, t.strip(), None) for t in r["annotations"]["text"])
    elif dataset == "webnlg":
        for r in load_dataset(hub_name, "webnlg_challenge_2017", split=split):
            triples = [tuple(x.strip() for x in t.split("|")) for t in r["modified_triple_sets"]["mtriple_set"][0]]
            source = linearize_triples(triples)
            for text, comment in zip(r["lex"]["text"], r["lex"]["comment"]):
                if comment == "good":
                    rows.append((source, text.strip(), r["category"]))
    else:
        raise ValueError(f"unknown dataset '{dataset}'")
    return _group(rows)


TABLE_SUFFIXES = (".jsonl", ".json", ".csv")
# What --hub_dataset names for each benchmark (Hugging Face datasets; needs internet).
HUB_NAMES = {"e2e": "e2e_nlg", "dart": "dart", "webnlg": "web_nlg"}


def _text(value: object, column: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFileError(f"{where}: column '{column}' must hold non-empty text, got {value!r}")
    return value.strip()


def _rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` of a JSON-lines / JSON-list (.jsonl, .json) or CSV (.csv) file."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    from recipes.alpaca_data import DataFormatError, iter_json_records

    try:
        records = iter_json_records(path)
    except DataFormatError as exc:
        raise DataFileError(str(exc)) from None
    for line, record in records:
        if not isinstance(record, dict):
            raise DataFileError(f"{path}:{line}: expected a JSON object per record, got {type(record).__name__}")
    return records


def read_columns(path: str | Path, source_column: str, target_column: str) -> list[NLGExample]:
    """Your own data: the rows of a JSON-lines (``.jsonl``, or ``.json`` holding JSON lines or one list of records)
    or CSV (``.csv``) file, ``source_column`` the input and ``target_column`` its reference. Rows with the same source
    are one example with several references (as the benchmarks' test sets are scored)."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise DataFileError(f"{path}: with source_column set, data files must be JSON lines (.jsonl / .json) or CSV "
                            f"(.csv), got '{path.suffix}'")
    if not path.is_file():
        raise DataFileError(f"data file not found: {path}")
    rows = []
    for line, record in _rows(path):
        where = f"{path}:{line}"
        missing = [c for c in (source_column, target_column) if c not in record]
        if missing:
            raise DataFileError(f"{where}: no column {', '.join(repr(c) for c in missing)} (the record has "
                                f"{', '.join(map(repr, record))}); set source_column / target_column to yours")
        rows.append((_text(record[source_column], source_column, where),
                     _text(record[target_column], target_column, where), None))
    if not rows:
        raise DataFileError(f"{path}: no records")
    return _group(rows)


def load_hub_columns(hub_name: str, split: str, source_column: str, target_column: str) -> list[NLGExample]:
    """Your own data from a Hugging Face ``datasets`` name (needs internet): ``split``'s rows as :func:`read_columns`
    reads a file's."""
    from datasets import load_dataset

    data = load_dataset(hub_name, split=split)
    missing = [c for c in (source_column, target_column) if c not in data.column_names]
    if missing:
        raise DataFileError(f"{hub_name} ({split}): no column {', '.join(map(repr, missing))} (it has "
                            f"{', '.join(map(repr, data.column_names))}); set source_column / target_column")
    where = f"{hub_name} ({split})"
    return _group((_text(r[source_column], source_column, where), _text(r[target_column], target_column, where), None)
                  for r in data)


def training_pairs(examples: Sequence[NLGExample]) -> list[tuple[str, str]]:
    """One (source, reference) pair per reference."""
    return [(ex.source, ref) for ex in examples for ref in ex.references]


def subsample(items: Sequence, limit: int | None, seed: int | None = None) -> list:
    """The first ``limit`` items, after a seeded shuffle when ``seed`` is given (None/0 limit keeps all)."""
    items = list(items)
    if seed is not None:
        random.Random(seed).shuffle(items)
    return items if not limit or limit >= len(items) else items[:limit]
