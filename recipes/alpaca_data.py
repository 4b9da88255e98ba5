"""Instruction data for ``recipes.instruct``: reading, validation, prompt format, tokenisation, batching.

Two record formats, one per file:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` as in ``alpaca_data.json`` of
  tatsu-lab/stanford_alpaca. The prompt format and the loss masking follow QLoRA (artidoro/qlora), which the NOLA
  paper's LLaMA-2 experiments were run with: the source is ``BOS + prompt``, the target ``output + EOS``, each
  truncated separately, and only target tokens carry labels unless ``train_on_source`` is set.
* Chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` ending with the
  assistant's answer. The source is every message before the last, rendered by the tokenizer's chat template with
  the assistant header after it; the target is the last message's content + EOS, masked the same way.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

IGNORE_INDEX = -100  # label value the causal-LM loss skips

# QLoRA's variant of the Alpaca prompt (a space after "### Response:"), kept so losses are comparable to the paper's.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)

HUB_ALPACA = "tatsu-lab/alpaca"
MAX_LISTED_PROBLEMS = 10


class DataFormatError(ValueError):
    """A data file is malformed; the message lists each bad record as ``file:line: problem``."""


def raise_for_problems(path: Path, problems: list[tuple[int, str]], what: str) -> None:
    """Raise one :class:`DataFormatError` listing every bad record (up to a limit) with its file and line."""
    if not problems:
        return
    shown = "\n".join(f"  {path}:{line}: {msg}" for line, msg in problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataFormatError(
        f"{len(problems)} malformed {what} record(s) in {path} (fix or remove them; none were skipped):\n{shown}{tail}"
    )


def iter_json_records(path: Path) -> list[tuple[int, object]]:
    """``(line_number, record)`` pairs from a JSON array file or a JSON-lines file.

    Line numbers point at where each record starts, so errors can name them; a JSON syntax error is reported with
    its own line and column.
    """
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(f"{path}: the file is empty")
    if stripped[0] == "[":
        return _records_of_array(path, text)
    records: list[tuple[int, object]] = []
    for line_number, line_text in enumerate(text.splitlines(), start=1):
        if line_text.strip():
            try:
                records.append((line_number, json.loads(line_text)))
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{line_number}: invalid JSON: {exc.msg}") from None
    return records


def _records_of_array(path: Path, text: str) -> list[tuple[int, object]]:
    """Decode a JSON array element by element so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, object]] = []
    pos = text.index("[") + 1
    line, counted_to = 1, 0
    try:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise json.JSONDecodeError("unterminated array", text, pos)
            if text[pos] == "]":
                return records
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            record, pos = decoder.raw_decode(text, pos)
            records.append((line, record))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def validate_alpaca_record(record: object) -> str | None:
    """The problem with one Alpaca record, or None when it is well formed."""
    if not isinstance(record, dict):
        return f"expected an object with instruction/input/output, got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record:
            return f"missing field '{key}'"
        if not isinstance(record[key], str):
            return f"field '{key}' must be a string, got {type(record[key]).__name__}"
    if not record["instruction"].strip():
        return "field 'instruction' is empty"
    if "input" in record and record["input"] is not None and not isinstance(record["input"], str):
        return f"field 'input' must be a string, got {type(record['input']).__name__}"
    return None


CHAT_ROLES = ("system", "user", "assistant")


def validate_chat_record(record: object) -> str | None:
    """The problem with one chat record, or None when it is well formed."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return "expected an object with a non-empty 'messages' list"
    for number, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            return f"message {number}: expected {{role, content}} with role one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {number}: 'content' must be a string"
    if record["messages"][-1]["role"] != "assistant" or len(record["messages"]) < 2:
        return "the last message must be the assistant's answer, after at least one other message"
    return None


def is_chat(record: object) -> bool:
    return isinstance(record, dict) and "messages" in record


def read_records(path: Path) -> list[dict]:
    """Alpaca or chat records of one file (the first record decides the format; a file mixing them is an error).

    Every record is checked; malformed ones raise :class:`DataFormatError` naming file and line, so a broken file
    never trains on a silently thinned subset.
    """
    numbered = iter_json_records(path)
    chat = bool(numbered) and is_chat(numbered[0][1])
    problems: list[tuple[int, str]] = []
    records = []
    for line, record in numbered:
        if is_chat(record) != chat:
            problems.append((line, f"a {'chat' if is_chat(record) else 'Alpaca'} record in a file of "
                                   f"{'chat' if chat else 'Alpaca'} records"))
            continue
        problem = validate_chat_record(record) if chat else validate_alpaca_record(record)
        if problem:
            problems.append((line, problem))
        elif chat:
            records.append({"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]})
        else:
            records.append(
                {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
            )
    raise_for_problems(path, problems, "chat" if chat else "Alpaca")
    return records


def load_alpaca(path_or_name: str | Path) -> list[dict]:
    """Instruction records from a local JSON / JSON-lines file (Alpaca or chat, :func:`read_records`), or Alpaca
    records from the hub (``tatsu-lab/alpaca``) when not a file."""
    path = Path(path_or_name)
    if path.is_file():
        return read_records(path)
    if path.suffix in (".json", ".jsonl") or str(path_or_name).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"Alpaca data file not found: {path} (point data_path at alpaca_data.json, e.g. "
            "../shared/data/alpaca/alpaca_5000.json, or at the hub name tatsu-lab/alpaca)"
        )
    from datasets import load_dataset  # recipes may use datasets; only the hub path needs it

    try:
        hub = load_dataset(str(path_or_name), split="train")
    except Exception as exc:  # offline or unknown name: say what to do instead
        raise FileNotFoundError(
            f"cannot load Alpaca data '{path_or_name}' from the hub ({exc}); pass a local alpaca_data.json as data_path"
        ) from None
    problems = []
    records = []
    for index, record in enumerate(hub):
        problem = validate_alpaca_record(record)
        if problem:
            problems.append((index + 1, problem))
        else:
            records.append({"instruction": record["instruction"], "input": record.get("input") or "",
                            "output": record["output"]})
    raise_for_problems(Path(str(path_or_name)), problems, "Alpaca")
    return records


def format_prompt(record: dict) -> str:
    """The Alpaca prompt (instruction, optional input) that precedes the response."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def split_train_validation(records: Sequence[dict], validation_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed`` and hold out ``validation_size`` records (QLoRA's ``eval_dataset_size``)."""
    if validation_size >= len(records):
        raise ValueError(f"validation_size={validation_size} leaves no training data ({len(records)} records)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    validation = [records[i] for i in order[:validation_size]]
    train = [records[i] for i in order[validation_size:]]
    return train, validation


def chat_prompt(tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> str:
    """Every message before the last, rendered by the chat template (``chat_template``, else the tokenizer's) and
    followed by the assistant header the answer comes after."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError("chat records need a chat template: the tokenizer has none, so set chat_template (a "
                              "Jinja template) or use a tokenizer that ships one")
    return tokenizer.apply_chat_template(list(messages[:-1]), chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True)


def tokenize_example(tokenizer, record: dict, source_max_len: int, target_max_len: int,
                     train_on_source: bool = False, chat_template: str | None = None) -> dict:
    """``input_ids`` and ``labels`` for one record: the prompt (labels masked) then the answer + EOS (labels kept).

    Alpaca: BOS + the Alpaca prompt, then ``output``. Chat: the earlier messages through the chat template
    (:func:`chat_prompt`), then the last message's content.
    """
    eos = tokenizer.eos_token or ""
    if is_chat(record):
        source, answer = chat_prompt(tokenizer, record["messages"], chat_template), record["messages"][-1]["content"]
    else:
        source, answer = (tokenizer.bos_token or "") + format_prompt(record), record["output"]
    source_ids = tokenizer(source, add_special_tokens=False, truncation=True, max_length=source_max_len)["input_ids"]
    target_ids = tokenizer(answer + eos, add_special_tokens=False, truncation=True,
                           max_length=target_max_len)["input_ids"]
    source_labels = list(source_ids) if train_on_source else [IGNORE_INDEX] * len(source_ids)
    return {"input_ids": list(source_ids) + list(target_ids), "labels": source_labels + list(target_ids)}


def tokenize_records(tokenizer, records: Sequence[dict], source_max_len: int, target_max_len: int,
                     train_on_source: bool = False, chat_template: str | None = None) -> list[dict]:
    """:func:`tokenize_example` over a list, dropping nothing (an empty target still contributes its EOS label)."""
    return [tokenize_example(tokenizer, r, source_max_len, target_max_len, train_on_source, chat_template)
            for r in records]


@dataclass
class InstructionCollator:
    """Right-pads a batch of tokenised examples.

    The attention mask comes from the true lengths, not from ``input_ids != pad``: many tokenizers (SmolLM2, GPT-2)
    use EOS as the pad token, and masking by value would hide the EOS the model must learn to emit.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
