"""Data-to-text generation (E2E NLG, DART, WebNLG) with NOLA, LoRA or full fine-tuning: the GPT-2 rows of the NOLA paper.

    python -m recipes.nlg --config configs/e2e/gpt2m_nola_qv_k1000.yaml [--key value ...]
    python -m recipes.nlg --config configs/quickstart.yaml --train_file train.jsonl --test_file test.jsonl \
        --source_column meaning --target_column sentence          # your own data: JSON lines or CSV
    python -m recipes.nlg --help                                  # every key, its type, default and meaning

Trains with ``transformers.Trainer`` (so ``accelerate launch`` / ``torchrun`` and ``--resume_from_checkpoint`` work),
decodes the test inputs, scores them against all references of each input, and writes ``results.json``,
``results.md`` (a row in the paper's table format), ``predictions.jsonl`` and the adapter into ``output_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from recipes.cli import RecipeError, run_cli
from recipes.config import AdapterArgs, ModelArgs, coerce_mapping, config_to_dict, load_config
from recipes.methods import METHODS, apply_method, build_peft_config, check_target_modules, count_trainable_parameters
from recipes.models import load_model_and_tokenizer
from recipes.nlg_data import (
    DATASETS,
    DEFAULT_FILES,
    HUB_NAMES,
    WHERE_TO_GET,
    DataFileError,
    NLGExample,
    load_hub_columns,
    load_hub_split,
    read_columns,
    read_split,
    subsample,
    training_pairs,
)
from recipes.nlg_report import (
    METRIC_SCALES,
    comparison_markdown,
    heading_short,
    paper_markdown,
    paper_row,
    plot_params_vs_bleu,
    printed_metrics,
    row_label,
    run_heading,
)
from recipes.paths import data_candidates, dataset_dir, default_data_root, locate, resolve_path
from recipes.prediction_checks import check_predictions, degenerate_note
from recipes.results import write_results
from recipes.console import use_console
from recipes.training import peak_memory_bytes, report_targets, resume_checkpoint, save_adapter
from recipes.training import training_arguments as common_training_arguments


@dataclass
class NLGConfig(ModelArgs, AdapterArgs):
    """The NLG recipe: data, prompt, training, decoding and reporting."""

    # ---- data
    dataset: str = field(default="e2e", metadata={"help": (
        "Which benchmark: e2e, dart or webnlg. It picks the file reader, the default files and the metrics and table; "
        "with source_column set (your own data) only the metrics and table.")})
    data_dir: str | None = field(default=None, metadata={"help": (
        "Folder with the dataset files. Default: <data root>/<dataset>, the data root being $PEFT_NOLA_DATA_DIR or "
        "../shared/data next to the repository.")})
    train_file: str | None = field(default=None, metadata={"help": (
        "Training file, found by the data rule: as given (absolute, or relative to the working directory or the "
        "repository), else in data_dir, else under $PEFT_NOLA_DATA_DIR or ../shared/data. Default: the dataset's own (e2e train.txt, dart dart-v1.1.1-full-train.json, webnlg "
        "train.json). With source_column set: JSON lines (.jsonl, or .json holding a list of records) or CSV (.csv).")})
    validation_file: str | None = field(default=None, metadata={"help": (
        "Optional held-out file read like train_file; when set, Trainer reports its loss after training "
        "(validation_loss in results.json).")})
    test_file: str | None = field(default=None, metadata={"help": (
        "Test file read like train_file; rows with the same source are one test input with several references. "
        "Default: the dataset's own (e2e test.txt, ...).")})
    source_column: str | None = field(default=None, metadata={"help": (
        "Your own data: the column (JSON key or CSV header) holding the input text. When set, train/validation/test "
        "files (or hub_dataset) are read as rows with source_column and target_column instead of the benchmark's "
        "format.")})
    target_column: str | None = field(default=None, metadata={"help": (
        "Your own data: the column holding the reference text the model learns to write.")})
    hub_dataset: str | None = field(default=None, metadata={"help": (
        "A Hugging Face datasets name (needs internet) to use instead of local files: e2e_nlg, dart or web_nlg for "
        "the benchmarks, or any dataset with train/test splits together with source_column and target_column.")})
    max_train_pairs: int | None = field(default=None, metadata={"help": (
        "Keep this many (input, reference) training pairs after a seeded shuffle (null: all).")})
    max_test_inputs: int | None = field(default=None, metadata={"help": (
        "Decode and score the first this many test inputs (null: all).")})
    data_seed: int = field(default=0, metadata={"help": (
        "Seed of the shuffle before max_train_pairs picks training pairs; the test set keeps file order.")})
    # ---- how an input becomes a prompt. LoRA setup: "<input><eos> <reference><eos>", loss on the reference only.
    prompt_template: str = field(default="{source}", metadata={"help": (
        "Prompt text; {source} is replaced by the input. The loss is on the reference only.")})
    eos_after_prompt: bool = field(default=True, metadata={"help": (
        "End the prompt with the EOS token, as the LoRA/NOLA GPT-2 setup (<input><eos> <reference><eos>).")})
    chat_template: bool = field(default=False, metadata={"help": (
        "Wrap the prompt as a user turn of the tokenizer's chat template (instruct models) and the reference as the "
        "assistant turn, so that the un-adapted model can attempt the task and base_metrics is a fair baseline. "
        "Needs eos_after_prompt: false.")})
    max_length: int = field(default=512, metadata={"help": "Truncate prompt + reference to this many tokens."})
    # ---- training (transformers.TrainingArguments names)
    output_dir: str = field(default="runs/nlg", metadata={"help": (
        "Folder for results.json, results.md, predictions.jsonl, checkpoints and the adapter.")})
    seed: int = field(default=110, metadata={"help": "Seed of Trainer (adapter init, data order, dropout)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Training epochs (TrainingArguments)."})
    max_steps: int = field(default=-1, metadata={"help": (
        "Stop after this many optimizer steps; -1 trains num_train_epochs (TrainingArguments).")})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": (
        "Batches accumulated per optimizer step.")})
    learning_rate: float = field(default=0.1, metadata={"help": (
        "Peak learning rate (AdamW). NOLA's coefficients take larger steps than LoRA's matrices.")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=500, metadata={"help": "Linear warm-up steps of the learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": (
        "Learning-rate schedule after warm-up (TrainingArguments: linear, cosine, constant, ...).")})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the loss (paper: 0.1)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=0.0, metadata={"help": (
        "Gradient clipping norm; 0 disables clipping, as in the LoRA/NOLA scripts (--clip 0.0).")})
    logging_steps: int = field(default=50, metadata={"help": "Log the training loss every this many steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When Trainer checkpoints: no, steps or epoch."})
    save_steps: int = field(default=1000, metadata={"help": "Checkpoint interval with save_strategy: steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": (
        "Keep at most this many checkpoints (null: all).")})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": (
        "Resume training from a checkpoint folder, or true for the newest complete one in output_dir.")})
    bf16: bool = field(default=False, metadata={"help": "Train with bfloat16 autocast (fp32 master weights)."})
    fp16: bool = field(default=False, metadata={"help": "Train with float16 autocast (fp32 master weights)."})
    report_to: str = field(default="none", metadata={"help": (
        "Experiment tracker for Trainer's logs (TrainingArguments.report_to: none, tensorboard, wandb, ...).")})
    # ---- decoding (paper: beam 10, length penalty 0.9 (E2E) / 0.8, no-repeat 4-gram, 64 new tokens)
    num_beams: int = field(default=10, metadata={"help": "Beam size for decoding the test inputs (1: greedy)."})
    length_penalty: float = field(default=0.9, metadata={"help": (
        "Beam-search length penalty (paper: 0.9 for E2E, 0.8 for DART/WebNLG).")})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": (
        "Never repeat an n-gram of this size in a generation (0: off).")})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of generate (1.0: off)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per test input."})
    eval_batch_size: int = field(default=16, metadata={"help": "Test inputs decoded per batch."})
    stop_at_newline: bool = field(default=True, metadata={"help": (
        "Keep only the first line of each generation (every reference is one line).")})
    score_tokenize_lower: bool | None = field(default=None, metadata={"help": (
        "Lower-case and split punctuation on both sides before scoring (LoRA's gpt2_decode.py --tokenize --lower, "
        "which its DART/WebNLG scripts use and its E2E script does not). null: on for dart/webnlg, off for e2e.")})
    evaluate_base: bool = field(default=True, metadata={"help": (
        "Also decode and score the un-adapted model on the same inputs (base_metrics).")})
    # ---- reporting
    row_label: str | None = field(default=None, metadata={"help": (
        "Row label in the table, e.g. \"NOLA (QV)\"; derived from method and target_modules when unset.")})
    paper_table: str | None = field(default=None, metadata={"help": (
        "Which table of the NOLA paper this config reproduces (recorded in results.json).")})
    compare: list[dict] | None = field(default=None, metadata={"help": (
        "Side-by-side runs (the quickstart): each entry overrides keys of this config for one run, e.g. "
        "[{method: nola, num_basis_A: 400}, {method: lora, r: 1, learning_rate: 2.0e-3}]. Every run trains on the "
        "same data and steps from the same base model; the un-adapted model is decoded once. Writes one table, "
        "results.json with a runs list, params_vs_bleu.png and one adapter per run.")})
    table_note: str | None = field(default=None, metadata={"help": (
        "A sentence printed under the table's heading (e.g. how the run differs from the paper).")})


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def _hub_hint(cfg: NLGConfig) -> str:
    """How to get the data without local files (for missing-data errors)."""
    if cfg.source_column:
        return ("pass --hub_dataset NAME (a Hugging Face datasets name with these columns and train/test splits; "
                "needs internet)")
    return (f"pass --hub_dataset {HUB_NAMES[cfg.dataset]} to download it with datasets (needs internet). Where to get "
            f"the files: {WHERE_TO_GET[cfg.dataset]}")


def data_files(cfg: NLGConfig) -> dict[str, Path]:
    """The files to read by split (train, test, and validation when validation_file is set), each found by the data
    rule (as given, else in data_dir, else under the data root); RecipeError naming every missing one."""
    data_dir = dataset_dir(cfg.data_dir, cfg.dataset, hub_hint=_hub_hint(cfg))
    given = {"train": cfg.train_file, "test": cfg.test_file, "validation": cfg.validation_file}
    found, missing = {}, []
    for split in ("train", "test", "validation"):
        name = given[split] or (None if split == "validation" else str(data_dir / DEFAULT_FILES[cfg.dataset][split]))
        if name is None:
            continue
        places = data_candidates(name, data_dir)
        hit = next((place for place in places if place.is_file()), None)
        if hit is None:
            missing.append(f"{split}_file '{name}' (looked at {', '.join(map(str, places))})")
        else:
            found[split] = hit
    if missing:
        which = "your" if cfg.source_column else cfg.dataset
        raise RecipeError(f"{which} data file(s) not found: {'; '.join(missing)}. "
                          f"Pass existing files (train_file / test_file / data_dir), set $PEFT_NOLA_DATA_DIR to the "
                          f"folder holding {cfg.dataset}/, or {_hub_hint(cfg)}.")
    return found


def read_examples(cfg: NLGConfig) -> dict[str, list[NLGExample]]:
    """Examples by split: the benchmark's files or hub dataset, or your own (source_column / target_column)."""
    if cfg.hub_dataset:
        splits = ("train", "test")
        if cfg.source_column:
            return {s: load_hub_columns(cfg.hub_dataset, s, cfg.source_column, cfg.target_column) for s in splits}
        return {s: load_hub_split(cfg.dataset, cfg.hub_dataset, s) for s in splits}
    files = data_files(cfg)
    if cfg.source_column:
        return {s: read_columns(path, cfg.source_column, cfg.target_column) for s, path in files.items()}
    return {s: read_split(cfg.dataset, path) for s, path in files.items()}


def load_data(cfg: NLGConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[NLGExample]]:
    """(training pairs, validation pairs (empty without validation_file), grouped test examples) per the config;
    RecipeError when files are missing or malformed."""
    if cfg.dataset not in DATASETS:
        raise RecipeError(f"unknown dataset '{cfg.dataset}': choose one of {', '.join(DATASETS)}")
    try:
        examples = read_examples(cfg)
    except (DataFileError, KeyError, ValueError) as exc:
        raise RecipeError(str(exc)) from None
    pairs = subsample(training_pairs(examples["train"]), cfg.max_train_pairs, seed=cfg.data_seed)
    validation = training_pairs(examples.get("validation", []))
    test = subsample(examples["test"], cfg.max_test_inputs)
    if not pairs or not test:
        raise RecipeError(f"no training pairs ({len(pairs)}) or test inputs ({len(test)}) after reading the data")
    return pairs, validation, test


def prompt_ids(tokenizer, cfg: NLGConfig, source: str) -> list[int]:
    """Token ids the model is conditioned on (and generation starts from)."""
    text = cfg.prompt_template.format(source=source)
    if cfg.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = list(encoded["input_ids"])
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if cfg.eos_after_prompt else ids


def chat_turn_end_warning(tokenizer, cfg: NLGConfig) -> str | None:
    """Why ``eos_after_prompt`` without ``chat_template`` misleads on a chat model, or None where it does not.

    LoRA's GPT-2 layout ends the prompt with EOS. A chat model's EOS (SmolLM2's ``<|im_end|>``) ends a turn, and the
    model learned to follow it with a new turn ("\n<|im_start|>..."): un-adapted or briefly trained, it decodes a
    newline and EOS (an empty prediction) or a turn header ("assistant" after the first-line cut).
    """
    template = getattr(tokenizer, "chat_template", None)
    eos = tokenizer.eos_token
    if cfg.chat_template or not cfg.eos_after_prompt or not isinstance(template, str) or not eos or eos not in template:
        return None
    return (f"eos_after_prompt: true ends every prompt with {eos}, which this model's chat template uses to end a "
            f"turn; the model then starts a new turn, so until training overrides that (hundreds of steps) it decodes "
            f"empty strings. Set chat_template: true and eos_after_prompt: false (as configs/quickstart.yaml does).")


def encode_pair(tokenizer, cfg: NLGConfig, source: str, reference: str) -> dict:
    """Prompt + " reference" + EOS, with labels masked (-100) over the prompt, truncated to max_length."""
    context = prompt_ids(tokenizer, cfg, source)
    # GPT-2 BPE marks word starts with a leading space (LoRA encodes " " + reference); a chat turn starts fresh.
    lead = "" if cfg.chat_template else " "
    completion = tokenizer(lead + reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (context + completion)[: cfg.max_length]
    labels = ([-100] * len(context) + completion)[: cfg.max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class PairDataset:
    """Tokenised training pairs for Trainer (a plain indexable; no datasets dependency needed)."""

    def __init__(self, tokenizer, cfg: NLGConfig, pairs: Sequence[tuple[str, str]]):
        self.features = [encode_pair(tokenizer, cfg, s, r) for s, r in pairs]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


# --------------------------------------------------------------------------------------------------------------------
# Decoding and scoring
# --------------------------------------------------------------------------------------------------------------------


def postprocess(text: str, stop_at_newline: bool) -> str:
    """One line of text: the first line of the generation, or all of it with whitespace runs collapsed (the
    line-based scorers cannot hold line breaks)."""
    text = text.strip()
    if stop_at_newline:
        text = text.split("\n", 1)[0]
    return " ".join(text.split())


def generate(model, tokenizer, cfg: NLGConfig, sources: Sequence[str], desc: str = "decoding") -> list[str]:
    """Decode every source (left-padded batches) with the config's decoding settings."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outputs: list[str] = []
    batch_size = max(1, cfg.eval_batch_size)
    for start in tqdm(range(0, len(sources), batch_size), desc=desc, unit="batch"):
        batch = [prompt_ids(tokenizer, cfg, s) for s in sources[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
                do_sample=False,
                length_penalty=cfg.length_penalty,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size or 0,
                repetition_penalty=cfg.repetition_penalty,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                early_stopping=True if cfg.num_beams > 1 else False,
            )
        for row in generated[:, width:]:
            outputs.append(postprocess(tokenizer.decode(row, skip_special_tokens=True), cfg.stop_at_newline))
    return outputs


def generate_sharded(model, tokenizer, cfg: NLGConfig, sources: Sequence[str], desc: str = "decoding") -> list[str]:
    """:func:`generate` split across the processes of ``torchrun`` / ``accelerate launch`` (each takes every n-th
    input); every process gets all outputs back in input order. One process: plain :func:`generate`."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return generate(model, tokenizer, cfg, sources, desc)
    mine = list(range(state.process_index, len(sources), state.num_processes))
    outputs = generate(model, tokenizer, cfg, [sources[i] for i in mine], f"{desc} [rank {state.process_index}]")
    ordered: list[str | None] = [None] * len(sources)
    for index, text in gather_object(list(zip(mine, outputs))):
        ordered[index] = text
    return ordered  # type: ignore[return-value]


def score(dataset: str, examples: Sequence[NLGExample], hypotheses: Sequence[str],
          tokenize_lower: bool | None = None) -> dict[str, float]:
    """Paper metrics on the official scales: E2E -> BLEU, NIST, METEOR, ROUGE_L, CIDEr (BLEU/METEOR/ROUGE_L in 0..1);
    DART -> BLEU (0..100), METEOR, TER; WebNLG -> the same for all inputs plus ``_S`` (seen categories) and ``_U``
    (unseen) variants. ``tokenize_lower`` applies LoRA's post-processing to both sides (default: not for E2E)."""
    from recipes import metrics  # the scorers' dependencies load only when scoring

    if tokenize_lower is None:
        tokenize_lower = dataset != "e2e"
    refs = [list(ex.references) for ex in examples]
    hyps = list(hypotheses)
    if tokenize_lower:
        refs = [[metrics.lora_postprocess(r) for r in group] for group in refs]
        hyps = [metrics.lora_postprocess(h) for h in hyps]
    if dataset == "e2e":
        return {k: float(v) for k, v in metrics.score_e2e(refs, hyps).items()}
    result = {k: float(v) for k, v in metrics.score_webnlg(refs, hyps).items()}
    if dataset == "webnlg":
        for suffix, want in (("_S", True), ("_U", False)):
            idx = [i for i, ex in enumerate(examples) if ex.seen is want]
            if idx:
                part = metrics.score_webnlg([refs[i] for i in idx], [hyps[i] for i in idx])
                result.update({k + suffix: float(v) for k, v in part.items()})
    return result


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def validate(cfg: NLGConfig) -> None:
    """Checks that need no model or data, so a typo fails in a second rather than after loading."""
    if cfg.method not in METHODS:
        raise RecipeError(f"unknown method '{cfg.method}': choose one of {', '.join(METHODS)}")
    if cfg.save_strategy not in ("no", "steps", "epoch"):
        raise RecipeError(f"save_strategy must be no, steps or epoch, not '{cfg.save_strategy}'")
    if cfg.hub_dataset and (cfg.train_file or cfg.validation_file or cfg.test_file):
        raise RecipeError("hub_dataset reads its train and test splits in place of train_file / validation_file / "
                          "test_file: set one or the other")
    if bool(cfg.source_column) != bool(cfg.target_column):
        raise RecipeError("your own data needs both source_column and target_column (the input and its reference)")
    if cfg.source_column and not cfg.hub_dataset and not (cfg.train_file and cfg.test_file):
        raise RecipeError("with source_column / target_column, pass train_file and test_file (JSON lines or CSV), "
                          "or hub_dataset")
    if "{source}" not in cfg.prompt_template:
        raise RecipeError("prompt_template must contain {source}")
    if cfg.chat_template and cfg.eos_after_prompt:
        raise RecipeError("chat_template: true already ends the prompt with the assistant header; "
                          "set eos_after_prompt: false")
    resume_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    report_targets(cfg.report_to)
    if cfg.compare is not None:
        run_configs(cfg)
        if importlib.util.find_spec("matplotlib") is None:
            raise RecipeError("compare writes params_vs_bleu.png with matplotlib: pip install matplotlib "
                              "(or pip install -e '.[recipes]')")


# Keys a compare entry may not set: they are what every run of a comparison shares (data, decoding, where it goes).
SHARED_KEYS = ("dataset", "data_dir", "train_file", "validation_file", "test_file", "source_column", "target_column",
               "hub_dataset", "max_train_pairs", "max_test_inputs",
               "data_seed", "model_name_or_path", "gguf_file", "tokenizer_name_or_path", "model_config",
               "output_dir", "resume_from_checkpoint", "evaluate_base", "num_beams", "length_penalty",
               "no_repeat_ngram_size", "repetition_penalty", "max_new_tokens", "stop_at_newline",
               "score_tokenize_lower", "max_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "compare")


def run_configs(cfg: NLGConfig) -> list[NLGConfig]:
    """The runs ``cfg`` asks for: itself, or one config per ``compare`` entry (RecipeError for a bad entry)."""
    if cfg.compare is None:
        return [cfg]
    if not isinstance(cfg.compare, list) or not cfg.compare or not all(isinstance(e, dict) for e in cfg.compare):
        raise RecipeError("compare must be a non-empty list of mappings, e.g. [{method: lora, r: 1}]")
    if cfg.resume_from_checkpoint:
        raise RecipeError("resume_from_checkpoint resumes one run; remove compare, or resume_from_checkpoint")
    runs = []
    for entry in cfg.compare:
        values = coerce_mapping(NLGConfig, entry, f"in the compare entry {entry}")
        shared = sorted(set(entry) & set(SHARED_KEYS))
        if shared:
            raise RecipeError(f"compare entry {entry}: {shared} must be the same for every run; set them at the top "
                              "level of the config")
        run = dataclasses.replace(cfg, **values, compare=None)
        if run.method == "full":
            raise RecipeError(f"compare entry {entry}: compare runs adapters on one shared base model; "
                              "run method full on its own")
        validate(run)
        runs.append(run)
    labels = [row_label(r) for r in runs]
    if len(set(labels)) != len(labels):
        raise RecipeError(f"compare runs need distinct row labels, got {labels}: set row_label in each entry")
    return runs


def training_arguments(cfg: NLGConfig, out: Path):
    """transformers.TrainingArguments for one run of ``cfg`` writing checkpoints into ``out``."""
    return common_training_arguments(
        out,
        seed=cfg.seed,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        label_smoothing_factor=cfg.label_smoothing,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        report_to=cfg.report_to,
    )


def run_folder(cfg: NLGConfig, run: NLGConfig) -> Path:
    """Where a run writes its adapter (and checkpoints): output_dir, or output_dir/<row label slug> in a comparison."""
    out = Path(cfg.output_dir)
    return out if cfg.compare is None else out / re.sub(r"[^a-z0-9]+", "_", row_label(run).lower()).strip("_")


def decode_base(model, tokenizer, cfg: NLGConfig, test: Sequence[NLGExample], device, is_main: bool) -> dict:
    """The un-adapted model's predictions, scores (on the main process) and decode seconds; empty when
    ``evaluate_base`` is off."""
    if not cfg.evaluate_base:
        return {"predictions": [], "metrics": {}, "decode_time_s": None, "prediction_check": None}
    model.to(device)
    tick = time.time()
    predictions = generate_sharded(model, tokenizer, cfg, [ex.source for ex in test], desc="decoding base model")
    decode_s = round(time.time() - tick, 2)
    metrics = score(cfg.dataset, test, predictions, cfg.score_tokenize_lower) if is_main else {}
    check = check_predictions(predictions, "Base model (no training)") if is_main else None
    return {"predictions": predictions, "metrics": metrics, "decode_time_s": decode_s, "prediction_check": check}


def train_run(cfg: NLGConfig, run: NLGConfig, base, tokenizer, data: tuple, base_metrics: dict,
              is_main: bool) -> tuple[dict | None, list[str]]:
    """Adapt ``base`` for ``run``, train it with Trainer on ``data`` = (training pairs, validation pairs, test
    examples), measure the validation loss (when there are validation pairs), decode the test inputs and save the
    adapter; returns the run's record (None off the main process) and its predictions."""
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    pairs, validation, test = data

    folder = run_folder(cfg, run)
    set_seed(run.seed)
    adapted = apply_method(base, run)
    trainable = count_trainable_parameters(adapted)
    train_args = training_arguments(run, folder)
    trainer = Trainer(
        model=adapted,
        args=train_args,
        train_dataset=PairDataset(tokenizer, run, pairs),
        eval_dataset=PairDataset(tokenizer, run, validation) if validation else None,
        # The bound method hides the collator's .tokenizer, which Trainer would otherwise save into every
        # checkpoint (3.5 MB for GPT-2): a checkpoint holds only training state (adapter, optimizer, scheduler,
        # RNG).
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100).__call__,
    )
    use_console(trainer, f"training {row_label(run)}")
    tick = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_checkpoint(run.resume_from_checkpoint, folder))
    train_s = round(time.time() - tick, 2)
    validation_loss = float(trainer.evaluate()["eval_loss"]) if validation else None
    adapted = trainer.model
    tick = time.time()
    predictions = generate_sharded(adapted, tokenizer, run, [ex.source for ex in test],
                                   desc=f"decoding {row_label(run)}")
    decode_s = round(time.time() - tick, 2)
    if not is_main:
        return None, predictions
    adapter_bytes = save_adapter(adapted, folder / "adapter")
    metrics = score(cfg.dataset, test, predictions, cfg.score_tokenize_lower)
    check = check_predictions(predictions, row_label(run))
    record = {
        "recipe": "nlg",
        "config": config_to_dict(run),
        "method": run.method,
        "row_label": row_label(run),
        "dataset": cfg.dataset,
        "model": cfg.model_name_or_path if cfg.model_config is None
        else f"random-init {cfg.model_config.get('model_type', '?')}",
        "trainable_params": int(trainable),
        "adapter_bytes": int(adapter_bytes),
        "adapter_dir": str(folder / "adapter"),
        "metrics": metrics,
        "printed_metrics": printed_metrics(metrics, cfg.dataset),
        "metric_scales": METRIC_SCALES[cfg.dataset],
        # Empty or all-identical outputs: the scores then measure that failure (prediction_checks.py).
        "prediction_check": check,
        "base_metrics": base_metrics,
        "train_time_s": train_s,
        "decode_time_s": decode_s,
        "train_pairs": len(pairs),
        "test_inputs": len(test),
        "test_references": sum(len(ex.references) for ex in test),
        "train_steps": int(train_output.global_step),
        "train_loss": float(train_output.training_loss) if not math.isnan(train_output.training_loss) else None,
        "validation_loss": validation_loss,
        "validation_pairs": len(validation),
        "decoding": {k: getattr(run, k) for k in ("num_beams", "length_penalty", "no_repeat_ngram_size",
                                                   "max_new_tokens", "stop_at_newline")},
        "device": str(train_args.device),
        "processes": train_args.world_size,
    }
    return record, predictions


def write_predictions(path: Path, cfg: NLGConfig, test: Sequence[NLGExample], records: Sequence[dict],
                      predictions: Sequence[Sequence[str]], base_predictions: Sequence[str]) -> None:
    """``predictions.jsonl``: per test input its source, references, each run's prediction and the base model's."""
    with path.open("w", encoding="utf-8") as f:
        for i, ex in enumerate(test):
            record = {"source": ex.source, "references": ex.references}
            if cfg.compare is None:
                record["prediction"] = predictions[0][i]
            else:
                record["predictions"] = {r["row_label"]: p[i] for r, p in zip(records, predictions)}
            if base_predictions:
                record["base_prediction"] = base_predictions[i]
            if ex.category is not None:
                record["category"] = ex.category
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def summarise(cfg: NLGConfig, out: Path, records: list[dict], base: dict, started: float) -> tuple[dict, str]:
    """``(results, markdown)``: one run's record and its paper row under the base model's, or a comparison's runs,
    table and parameters-vs-BLEU plot (written into ``out``)."""
    base_metrics = base["metrics"]
    common = {"base_printed_metrics": printed_metrics(base_metrics, cfg.dataset) if base_metrics else {},
              "base_prediction_check": base["prediction_check"],
              "base_decode_time_s": base["decode_time_s"], "wall_time_s": round(time.time() - started, 2),
              "peak_memory_bytes": peak_memory_bytes()}
    heading = run_heading(cfg, records[0])
    checks = {"Base model (no training)": base["prediction_check"], **{r["row_label"]: r["prediction_check"]
                                                                      for r in records}}
    note = degenerate_note(checks)
    note = f"\n{note}\n" if note else ""
    if cfg.compare is None:
        results = {**records[0], **common}
        rows = [paper_row(results, cfg.dataset)]
        if base_metrics:
            base_row = dict(results, metrics=base_metrics, row_label="Base model (no training)", trainable_params=None,
                            prediction_check=base["prediction_check"])
            rows.insert(0, paper_row(base_row, cfg.dataset))
        return results, paper_markdown(rows, cfg.dataset) + note
    results = {"recipe": "nlg", "kind": "comparison", "config": config_to_dict(cfg), "dataset": cfg.dataset,
               "heading": heading, "runs": records, "base_metrics": base_metrics, **common}
    plot_params_vs_bleu(records, out / "params_vs_bleu.png", title=heading_short(cfg, records[0]))
    results["plot"] = str(out / "params_vs_bleu.png")
    return results, f"{heading}\n\n{comparison_markdown(results)}{note}"


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; returns the results dict (also written to ``output_dir/results.json``)."""
    started = time.time()
    cfg = load_config(NLGConfig, argv)
    validate(cfg)
    runs = run_configs(cfg)
    pairs, validation, test = load_data(cfg)
    # fp32 master weights even with bf16/fp16: Trainer autocasts, and NOLA's coefficients take 0.1-sized steps.
    model, tokenizer = load_model_and_tokenizer(cfg, torch_dtype="float32")
    layout_problem = chat_turn_end_warning(tokenizer, cfg)
    if layout_problem:
        warnings.warn(layout_problem, stacklevel=1)
    # Fail on bad target_modules / method before spending time on base decoding.
    for run in runs:
        build_peft_config(run, model)
        check_target_modules(model, run)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "right"
    train_args = training_arguments(cfg, out)
    is_main = train_args.process_index == 0
    base = decode_base(model, tokenizer, cfg, test, train_args.device, is_main)

    records, predictions = [], []
    for number, run in enumerate(runs):
        # Each run of a comparison starts from the same un-adapted weights; the last one may consume them.
        start_from = model if number == len(runs) - 1 else copy.deepcopy(model)
        record, run_predictions = train_run(cfg, run, start_from, tokenizer, (pairs, validation, test), base["metrics"],
                                            is_main)
        records.append(record)
        predictions.append(run_predictions)
        del start_from
    if not is_main:
        return {}

    write_predictions(out / "predictions.jsonl", cfg, test, records, predictions, base["predictions"])
    results, markdown = summarise(cfg, out, records, base, started)
    write_results(out, results, markdown)
    print(markdown)
    print(f"results written to {out / 'results.json'}" + (
        f", plot to {out / 'params_vs_bleu.png'}" if cfg.compare is not None else ""))
    return results


if __name__ == "__main__":
    run_cli(main)
