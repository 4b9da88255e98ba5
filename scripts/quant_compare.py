"""Quantized NOLA vs quantized LoRA, side by side on a small E2E task (the NOLA paper's Table 4, in miniature).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python scripts/quant_compare.py --output_dir runs/quant_compare

1. A tiny GPT-2 (built from a config, vocabulary compacted to the tokens of the slices used) is pre-trained as a
   language model on E2E meaning representations and references as *separate* documents, so it knows both but not
   how a reference depends on its meaning representation.
2. NOLA and LoRA adapters on the q and v parts of ``c_attn`` (matched trainable-parameter counts by default) learn
   the task ``MR || reference`` with the Trainer (loss on reference tokens only); QAT runs train at 3 and 2 bits.
3. Post-training quantization at 16 (an fp16 cast), 8, 4, 3 and 2 bits is applied to the full-precision adapters
   (``peft_nola.quantize_coefficients`` / ``quantize_lora``, with both per-tensor schemes); every
   variant is scored on held-out validation pairs: loss and perplexity on reference tokens, next-token accuracy.
   The quantized NOLA adapters are also saved packed and reloaded (``reload_equal``: the reloaded model scores
   exactly the same), and their file size recorded.

Writes ``results.json`` and ``results.md`` in ``--output_dir``. About 6 minutes of one CPU core with the defaults (12 on a busy shared machine).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, Trainer, TrainingArguments

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import peft_nola  # noqa: E402
from peft_nola import GPT2_QV_SLICES, NolaConfig  # noqa: E402
from peft_nola import lora_quantization_aware, quantize_coefficients, quantize_lora  # noqa: E402
from peft_nola.quantization import SCHEMES  # noqa: E402
from recipes.config import parse_script_args  # noqa: E402
from recipes.paths import default_data_root  # noqa: E402
from recipes.results import markdown_table, write_results  # noqa: E402
from recipes.training import peak_memory_bytes  # noqa: E402

PTQ_BITS = (16, 8, 4, 3, 2)
QAT_BITS = (3, 2)


@dataclass
class Options:
    """python scripts/quant_compare.py options."""

    data_dir: Path = field(default_factory=default_data_root, metadata={"help": (
        "The data root holding e2e/ and gpt2_tokenizer/ ($PEFT_NOLA_DATA_DIR, else ../shared/data).")})
    output_dir: Path = field(default=REPO_ROOT / "runs" / "quant_compare", metadata={"help": (
        "Folder for results.json and results.md.")})
    pretrain_lines: int = field(default=3000, metadata={"help": "E2E train.txt lines the base LM is trained on."})
    adapt_lines: int = field(default=1500, metadata={"help": "Further train.txt lines the adapters are trained on."})
    eval_lines: int = field(default=400, metadata={"help": "valid.txt lines scored."})
    n_embd: int = field(default=64, metadata={"help": "Width of the small GPT-2 base LM."})
    n_layer: int = field(default=4, metadata={"help": "Layers of the small GPT-2 base LM."})
    pretrain_epochs: float = field(default=1.0, metadata={"help": "Epochs of base-LM training."})
    adapt_epochs: float = field(default=2.0, metadata={"help": "Epochs of adapter training."})
    batch_size: int = field(default=32, metadata={"help": "Training batch."})
    lora_r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_lr: float = field(default=3e-3, metadata={"help": "LoRA learning rate."})
    nola_r: int = field(default=4, metadata={"help": "NOLA rank."})
    num_basis: int = field(default=256, metadata={"help": "NOLA's k = l."})
    nola_lr: float = field(default=2e-2, metadata={"help": "NOLA learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of model init, data order and adapters."})
    threads: int = field(default_factory=lambda: int(os.environ.get("OMP_NUM_THREADS", "1")), metadata={"help": (
        "torch threads ($OMP_NUM_THREADS, else 1).")})


def parse_args(argv=None):
    return parse_script_args(Options, argv, "python scripts/quant_compare.py [--key value ...]", __doc__)


# ----------------------------------------------------------------------------------------------------------- data
def read_pairs(path: Path, start: int, count: int) -> list[tuple[str, str]]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(pairs) == count:
                break
            mr, _, ref = line.rstrip("\n").partition("||")
            pairs.append((mr.strip(), ref.strip()))
    return pairs


class Vocabulary:
    """GPT-2 BPE ids mapped onto the compact range of ids that occur in the data (keeps the tiny model tiny)."""

    def __init__(self, tokenizer, texts: list[str]):
        ids = {tokenizer.eos_token_id}
        for text in texts:
            ids.update(tokenizer(text)["input_ids"])
        self.tokenizer = tokenizer
        self.to_compact = {t: i for i, t in enumerate(sorted(ids))}
        self.eos = self.to_compact[tokenizer.eos_token_id]

    def encode(self, text: str) -> list[int]:
        return [self.to_compact[t] for t in self.tokenizer(text)["input_ids"]]

    def __len__(self):
        return len(self.to_compact)


def pretrain_examples(vocab: Vocabulary, pairs) -> list[dict]:
    examples = []
    for mr, ref in pairs:
        for ids in (vocab.encode(mr + " ||") + [vocab.eos], vocab.encode(" " + ref) + [vocab.eos]):
            examples.append({"input_ids": ids, "labels": ids})
    return examples


def task_examples(vocab: Vocabulary, pairs) -> list[dict]:
    examples = []
    for mr, ref in pairs:
        prompt, target = vocab.encode(mr + " ||"), vocab.encode(" " + ref) + [vocab.eos]
        examples.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    return examples


def collate(batch: list[dict], max_len: int = 128) -> dict:
    length = min(max_len, max(len(e["input_ids"]) for e in batch))
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, e in enumerate(batch):
        n = min(length, len(e["input_ids"]))
        ids[i, :n] = torch.tensor(e["input_ids"][:n])
        labels[i, :n] = torch.tensor(e["labels"][:n])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------------ training
def train(model, examples, epochs: float, lr: float, batch_size: int, seed: int, workdir: str) -> float:
    args = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.0, logging_steps=50, save_strategy="no",
        report_to=[], use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    return float(trainer.train().training_loss)


@torch.no_grad()
def evaluate(model, examples, batch_size: int = 64) -> dict:
    """Mean loss over reference tokens (nats), its perplexity, and greedy next-token accuracy on them."""
    model.eval()
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        losses = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
        total_loss += float(losses)
        total_correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
        total_tokens += int(keep.sum())
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": total_correct / total_tokens}


def adapter_bytes(model, directory: Path) -> int:
    model.save_pretrained(directory)
    return (directory / "adapter_model.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_file, valid_file = args.data_dir / "e2e" / "train.txt", args.data_dir / "e2e" / "valid.txt"
    tokenizer_file = args.data_dir / "gpt2_tokenizer" / "tokenizer.json"
    for path in (train_file, valid_file, tokenizer_file):
        if not path.exists():
            raise SystemExit(f"error: {path} not found; pass --data_dir (or set PEFT_NOLA_DATA_DIR) to the shared data")
    started = time.time()
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(tokenizer_file))
    pre_pairs = read_pairs(train_file, 0, args.pretrain_lines)
    adapt_pairs = read_pairs(train_file, args.pretrain_lines, args.adapt_lines)
    eval_pairs = read_pairs(valid_file, 0, args.eval_lines)
    vocab = Vocabulary(tokenizer, [f"{m} || {r}" for m, r in pre_pairs + adapt_pairs + eval_pairs])
    eval_set = task_examples(vocab, eval_pairs)
    workdir = tempfile.mkdtemp(prefix="quant_compare_")

    torch.manual_seed(args.seed)
    base = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(vocab), n_positions=128, n_embd=args.n_embd, n_layer=args.n_layer, n_head=4,
        bos_token_id=vocab.eos, eos_token_id=vocab.eos,
    ))
    pretrain_loss = train(base, pretrain_examples(vocab, pre_pairs), args.pretrain_epochs, 1e-3, args.batch_size,
                          args.seed, workdir)
    base_metrics = evaluate(base, eval_set)
    print(f"base: pretrain loss {pretrain_loss:.3f}, task {base_metrics}", flush=True)

    adapt_set = task_examples(vocab, adapt_pairs)
    methods = {
        "nola": (lambda **q: NolaConfig(r=args.nola_r, num_basis_A=args.num_basis, num_basis_B=args.num_basis,
                                        target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True,
                                        basis_seed=args.seed, task_type="CAUSAL_LM", **q), args.nola_lr),
        # peft's LoRA adapts all of c_attn; its q and v thirds are what the NOLA adapter covers.
        "lora": (lambda **q: LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, target_modules=["c_attn"],
                                        fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM"), args.lora_lr),
    }
    rows, runs = [], {}
    for method, (make_config, lr) in methods.items():
        model = get_peft_model(copy.deepcopy(base), make_config())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train_loss = train(model, adapt_set, args.adapt_epochs, lr, args.batch_size, args.seed, workdir)
        full = evaluate(model, eval_set)
        print(f"{method} fp32: {full}", flush=True)
        rows.append({"method": method, "mode": "none", "bits": 32, "scheme": "-", **full, "trainable": trainable,
                     "train_loss": train_loss})
        if method == "nola":
            rows[-1]["adapter_bytes"] = adapter_bytes(model, Path(workdir) / "nola_fp32")
        runs[method] = {"trainable_params": trainable, "train_loss": train_loss}
        for bits in PTQ_BITS:
            for scheme in SCHEMES if bits < 16 else ("fp16",):
                quantized = copy.deepcopy(model)
                if bits == 16:
                    with torch.no_grad():
                        for p in quantized.parameters():
                            if p.requires_grad:
                                p.copy_(p.half().float())
                elif method == "nola":
                    quantize_coefficients(quantized, bits, scheme=scheme)
                else:
                    quantize_lora(quantized, bits, scheme=scheme)
                metrics = evaluate(quantized, eval_set)
                row = {"method": method, "mode": "PTQ", "bits": bits, "scheme": scheme, **metrics}
                if method == "nola" and bits < 16:
                    directory = Path(workdir) / f"nola_ptq{bits}_{scheme}"
                    row["adapter_bytes"] = adapter_bytes(quantized, directory)
                    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), directory)
                    row["reload_equal"] = evaluate(reloaded, eval_set) == metrics
                rows.append(row)
                print(row, flush=True)
        for bits in QAT_BITS:
            if method == "nola":
                model = get_peft_model(copy.deepcopy(base), make_config(coefficient_bits=bits, quantization_aware=True))
            else:
                model = get_peft_model(copy.deepcopy(base), make_config())
                lora_quantization_aware(model, bits)
            train_loss = train(model, adapt_set, args.adapt_epochs, lr, args.batch_size, args.seed, workdir)
            metrics = evaluate(model, eval_set)
            row = {"method": method, "mode": "QAT", "bits": bits, "scheme": "affine", **metrics, "train_loss": train_loss}
            if method == "nola":
                directory = Path(workdir) / f"nola_qat{bits}"
                row["adapter_bytes"] = adapter_bytes(model, directory)
                reloaded = PeftModel.from_pretrained(copy.deepcopy(base), directory)
                row["reload_equal"] = evaluate(reloaded, eval_set) == metrics
            else:
                quantize_lora(model, bits)  # replaces the shadows by the quantized weights the forward pass used
                row["reload_equal"] = evaluate(model, eval_set) == metrics
            rows.append(row)
            print(row, flush=True)

    for row in rows:
        row["loss_increase"] = row["loss"] - next(
            r["loss"] for r in rows if r["method"] == row["method"] and r["mode"] == "none"
        )
    columns = ["method", "mode", "bits", "scheme", "loss", "loss_increase", "perplexity", "token_accuracy",
               "adapter_bytes", "reload_equal"]
    # Quantization moves the loss in the 3rd-4th decimal: print 4 decimals rather than the table's default.
    shown = [{**r, **{k: f"{r[k]:.4f}" for k in ("loss", "loss_increase", "perplexity", "token_accuracy")}}
             for r in rows]
    table = markdown_table(shown, columns)
    header = (f"# Quantized adapters on E2E (tiny GPT-2, n_embd={args.n_embd}, n_layer={args.n_layer})\n\n"
              f"Held-out: {len(eval_pairs)} valid.txt pairs, loss on reference tokens. Base (no adapter): "
              f"loss {base_metrics['loss']:.4f}, token accuracy {base_metrics['token_accuracy']:.4f}. Trainable: "
              f"NOLA {runs['nola']['trainable_params']}, LoRA {runs['lora']['trainable_params']}.\n\n")
    results = {
        "recipe": "scripts/quant_compare.py", "config": {k: str(v) for k, v in vars(args).items()},
        "method": "nola+lora", "trainable_params": runs["nola"]["trainable_params"],
        "adapter_bytes": next(r["adapter_bytes"] for r in rows if r.get("adapter_bytes")),
        "metrics": {f"{r['method']}/{r['mode']}/{r['bits']}/{r['scheme']}/loss": r["loss"] for r in rows},
        "base_metrics": base_metrics, "rows": rows, "runs": runs, "pretrain_loss": pretrain_loss,
        "wall_time_s": time.time() - started, "peak_memory_bytes": peak_memory_bytes(),
    }
    write_results(args.output_dir, results, header + table)
    print(header + table)
    return results


if __name__ == "__main__":
    main()
