"""Training-step time of NOLA vs peft's LoRA and VeRA, measured side by side in one process.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --quick            # ~2 minutes on 2 CPU cores
    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --shapes gpt2-medium-qv --reps 10

Every method gets its own copy of the same base model; repetitions are interleaved (one step of each method per
round) so that machine noise hits all methods alike, and each method's ratio to LoRA at the same rank is the median
of the per-round ratios. Prints a Markdown table and writes it as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import AutoModel, GPT2Config, LlamaConfig, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_nola  # noqa: E402
from peft_nola import GPT2_QV_SLICES, NolaConfig  # noqa: E402


@dataclass
class Shape:
    """A base model built from a config, which modules are adapted, and the input batch."""

    config: object
    targets: list
    output_slices: dict | None
    batch: int
    seq: int


def shapes() -> dict[str, Shape]:
    gpt2 = dict(vocab_size=50257, n_positions=1024, bos_token_id=0, eos_token_id=0)
    llama = dict(vocab_size=32000, bos_token_id=0, eos_token_id=0)
    return {
        "gpt2-tiny-qv": Shape(GPT2Config(n_embd=128, n_layer=4, n_head=4, **gpt2), ["c_attn"], GPT2_QV_SLICES, 4, 64),
        "gpt2-medium-qv": Shape(GPT2Config(n_embd=1024, n_layer=24, n_head=16, **gpt2), ["c_attn"], GPT2_QV_SLICES, 4, 64),
        "gpt2-medium-mlp": Shape(GPT2Config(n_embd=1024, n_layer=24, n_head=16, **gpt2), ["c_fc", "mlp.c_proj"], None, 4, 64),
        "gpt2-large-qv": Shape(GPT2Config(n_embd=1280, n_layer=36, n_head=20, **gpt2), ["c_attn"], GPT2_QV_SLICES, 4, 64),
        "llama-stack": Shape(
            LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16, **llama),
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None, 2, 64),
        "vit-b-mlp": Shape(ViTConfig(), ["fc1", "fc2"], None, 8, None),
    }


def method_configs(shape: Shape, rank: int, num_basis: int) -> dict[str, object]:
    is_gpt2 = isinstance(shape.config, GPT2Config)
    nola = dict(r=rank, num_basis_A=num_basis, num_basis_B=num_basis, target_modules=shape.targets,
                output_slices=shape.output_slices, fan_in_fan_out=is_gpt2)
    return {
        f"lora r={rank}": LoraConfig(r=rank, lora_alpha=rank, target_modules=shape.targets, fan_in_fan_out=is_gpt2),
        "nola shared": NolaConfig(basis_mode="shared", **nola),
        "nola per_layer": NolaConfig(basis_mode="per_layer", **nola),
        "nola per_layer_cached": NolaConfig(basis_mode="per_layer_cached", **nola),
        f"vera r={4 * rank}": VeraConfig(r=4 * rank, target_modules=shape.targets, save_projection=False),
    }


def make_batch(shape: Shape, generator: torch.Generator) -> dict:
    if isinstance(shape.config, ViTConfig):
        return {"pixel_values": torch.randn(shape.batch, 3, 224, 224, generator=generator)}
    vocab = shape.config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (shape.batch, shape.seq), generator=generator)}


def train_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    out = model(**batch).last_hidden_state
    out.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_shape(name: str, shape: Shape, rank: int, num_basis: int, reps: int, warmup: int, methods=None) -> list[dict]:
    torch.manual_seed(0)
    base = AutoModel.from_config(shape.config)
    batch = make_batch(shape, torch.Generator().manual_seed(0))
    runs = {}
    for method, config in method_configs(shape, rank, num_basis).items():
        if methods and method not in methods and not method.startswith("lora"):
            continue
        model = get_peft_model(copy.deepcopy(base), config)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[method] = (model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))
    del base
    times = {method: [] for method in runs}
    for rep in range(warmup + reps):
        for method, (model, optimizer, _) in runs.items():
            elapsed = train_step(model, optimizer, batch)
            if rep >= warmup:
                times[method].append(elapsed)
    lora = times[f"lora r={rank}"]
    rows = []
    for method, (model, _, trainable) in runs.items():
        basis = getattr(model.base_model, "nola_basis", None)
        rows.append({
            "shape": name, "method": method, "trainable_params": trainable,
            "step_ms": 1e3 * statistics.median(times[method]),
            "ratio_vs_lora": statistics.median(t / ref for t, ref in zip(times[method], lora)),
            "basis_bytes": sum(b.numel() * b.element_size() for b in basis.values()) if basis is not None else 0,
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions (~2 min on CPU)")
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(shapes()))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num_basis", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (LoRA at the same rank always runs: it is the baseline)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench.json"))
    args = parser.parse_args(argv)
    selected = args.shapes or (["gpt2-tiny-qv"] if args.quick else ["gpt2-medium-qv", "gpt2-large-qv"])
    reps = args.reps or (10 if args.quick else 20)
    torch.set_grad_enabled(True)
    rows = []
    for name in selected:
        rows += bench_shape(name, shapes()[name], args.rank, args.num_basis, reps, args.warmup, args.methods)
    header = "| shape | method | trainable params | step (ms, median) | ratio vs LoRA (median of paired) | basis MB |"
    print(header + "\n|" + "---|" * 6)
    for row in rows:
        print(f"| {row['shape']} | {row['method']} | {row['trainable_params']:,} | {row['step_ms']:.1f} | "
              f"{row['ratio_vs_lora']:.3f} | {row['basis_bytes'] / 2**20:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "reps": reps, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
