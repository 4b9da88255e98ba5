"""Training-step time, peak memory, merge and adapter-switch cost of NOLA vs NoRA and peft's LoRA and VeRA.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --quick                     # ~2 minutes on 2 CPU cores
    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --shapes gpt2-medium-qv --reps 10
    python scripts/bench.py                                                     # every paper shape (for a GPU)

Models are built from configs in the papers' shapes (nothing is downloaded) and trained on a random batch with a
dummy loss: what is measured is the cost of the adapter, not a task.

Step time. Every method gets its own module tree over the same frozen base weights (shared, not copied, so the
largest shapes fit in memory); repetitions are interleaved (one step of each method per round, the order rotating
from round to round) so that machine noise hits all methods alike. A method's ratio is the median of its per-round
ratios to LoRA at the same rank (``--rank``), with the quartiles of those ratios beside it. A method whose steps
(warm-up included) exceed ``--budget_s`` on one shape leaves the remaining rounds after at least one measured step
(its ``n`` says how many it ran): on a CPU the on-the-fly per-layer basis is several times slower (it regenerates
every layer's basis twice a step), and the budget keeps the run finite. The ``--quick`` shape is small, so costs that grow with a layer's width rather
than its square (generating or reading a basis, Python overhead per layer) weigh more there than at the papers' shapes.

Peak training memory is measured per method apart from the timing runs: the script re-invokes itself (hidden
``--_memory_worker``). On CPU the worker imports the libraries once and then forks one child per (shape, method)
before it has run any torch operation, so one method's allocations cannot hide or inflate another's; on CUDA (where
a forked child cannot use the GPU) the worker runs the jobs one after another, freeing each before the next. The child builds the base model
and the adapter, resets the peak counter, and runs ``--mem_steps`` training steps (the first creates the optimizer
state, the rest are steady-state). Construction (e.g. NoRA's SVD) is thus excluded; the lazily generated NOLA basis
is included. The peak is
  * on CUDA: ``torch.cuda.max_memory_allocated`` (live tensors only, the allocator's cache excluded);
  * on CPU: the process's peak resident set (Linux ``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``).
    This is what the OS had to provide, and it is coarser than the CUDA figure: it includes the Python runtime and
    the libraries (the same few hundred MB for every method, as all children fork from one state), and memory the
    C allocator keeps after a tensor is freed. The worker runs with a fixed ``MALLOC_MMAP_THRESHOLD_`` (128 KiB), so
    every tensor above that size is mmap'ed and returned to the OS when freed (glibc's adaptive threshold would keep
    freed tensors of up to 32 MB resident), and the resident set follows live tensors; differences between methods
    are then meaningful to a few MB. The absolute value is not comparable with a GPU's.
The target column checks ``peak <= LoRA's peak * 1.01 + basis bytes`` against LoRA at the same rank, where "basis
bytes" is the frozen extra state the method holds (NOLA's basis store, NoRA's SVD factors, VeRA's projections). On
CPU the resident set before the first step already differs by tens of MB between identical processes (the allocator's
state after building the model), so there a method's peak is taken as LoRA's resident set before its steps plus the
method's own growth during its steps (the "training overhead" column); on CUDA the absolute peaks are compared.

Merge: the time to materialise every ΔW of a model from NOLA's coefficients (``get_delta_weight`` of every adapted
layer; "cold" on a fresh model includes generating the shared basis, "warm" reuses it) against loading a rank-1 LoRA
adapter of the same model from disk (``PeftModel.load_adapter`` of a saved ``save_pretrained`` directory onto a
model already in memory, the file warm in the page cache: this favours LoRA, so the comparison is conservative for
NOLA). Switch: among ``--num_adapters`` loaded adapters, ``set_adapter(name)`` plus one forward, and the merged
variant (unmerge, set, merge, forward), next to the plain forward.

Writes the tables (Markdown, also printed), JSON (``--out``) and a PNG chart beside the JSON.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import AutoModel, GPT2Config, LlamaConfig, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_nola  # noqa: E402
from peft_nola import GPT2_QV_SLICES, NolaConfig, NoraConfig  # noqa: E402
from recipes.config import parse_script_args  # noqa: E402

QUICK_SHAPES = ["gpt2-tiny-qv"]
FULL_SHAPES = ["gpt2-medium-qv", "gpt2-medium-mlp", "gpt2-large-qv", "gpt2-large-mlp", "llama-stack", "vit-b-mlp"]
# The targets for step time relative to LoRA at the same rank, per method and device type.
STEP_TARGETS = {
    "nola shared": {"cpu": 1.01, "cuda": 1.01},
    "nola per_layer": {"cpu": 1.05, "cuda": 1.02},
    "nola per_layer_cached": {"cpu": 1.05, "cuda": 1.02},
}
MEMORY_SLACK = 1.01
# Names of the frozen, non-weight state that adapters hold (basis, SVD factors, projections).
FROZEN_STATE = re.compile(r"(^|\.)(nola_basis|nora_U|nora_Vt|nora_core0|vera_A|vera_B)(\.|$)")


@dataclass
class Shape:
    """A base model built from a config, which modules are adapted, and the input batch."""

    config: object
    targets: list
    output_slices: dict | None
    batch: int
    seq: int | None


@dataclass
class Settings:
    """What every measurement of one run shares (also sent to the memory worker as JSON)."""

    rank: int = 8
    num_basis: int = 1000
    nora_inner_r: int = 4
    vera_r: int = 256
    device: str = "cpu"
    batch: int | None = None  # None: the shape's own batch size
    seq: int | None = None  # None: the shape's own sequence length (ViT: always its image's patches)


def shapes() -> dict[str, Shape]:
    """The benchmark shapes by name: the papers' models (GPT-2 medium/large, ViT-B, a LLaMA-7B-wide stack)."""
    gpt2 = dict(vocab_size=50257, n_positions=1024, bos_token_id=0, eos_token_id=0)
    llama = dict(vocab_size=32000, bos_token_id=0, eos_token_id=0)
    medium = GPT2Config(n_embd=1024, n_layer=24, n_head=16, **gpt2)
    large = GPT2Config(n_embd=1280, n_layer=36, n_head=20, **gpt2)
    qv, mlp = ["c_attn"], ["c_fc", "mlp.c_proj"]
    return {
        # Smoke-test size: seconds per method on a CPU.
        "gpt2-micro-qv": Shape(GPT2Config(n_embd=32, n_layer=2, n_head=2, **{**gpt2, "vocab_size": 96}), qv,
                               GPT2_QV_SLICES, 2, 16),
        "gpt2-tiny-qv": Shape(GPT2Config(n_embd=128, n_layer=4, n_head=4, **gpt2), qv, GPT2_QV_SLICES, 4, 64),
        "gpt2-medium-qv": Shape(medium, qv, GPT2_QV_SLICES, 4, 64),
        "gpt2-medium-mlp": Shape(medium, mlp, None, 4, 64),
        "gpt2-large-qv": Shape(large, qv, GPT2_QV_SLICES, 4, 64),
        "gpt2-large-mlp": Shape(large, mlp, None, 4, 64),
        "llama-stack": Shape(
            LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32, **llama),
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None, 2, 64),
        "vit-b-mlp": Shape(ViTConfig(), ["fc1", "fc2"], None, 8, None),
    }


def get_shape(name: str, settings: Settings) -> Shape:
    """``shapes()[name]`` with the batch size and sequence length of ``settings`` where those are set."""
    shape = shapes()[name]
    shape.batch = settings.batch or shape.batch
    shape.seq = shape.seq and (settings.seq or shape.seq)
    return shape


def baseline_name(settings: Settings) -> str:
    return f"lora r={settings.rank}"


def method_configs(shape: Shape, settings: Settings) -> dict[str, object]:
    """Each method's peft config for ``shape``, by method name (fresh objects: peft mutates configs)."""
    is_gpt2 = isinstance(shape.config, GPT2Config)
    common = dict(target_modules=list(shape.targets), fan_in_fan_out=is_gpt2)
    lowrank = dict(common, output_slices=shape.output_slices)
    nola = dict(lowrank, r=settings.rank, num_basis_A=settings.num_basis, num_basis_B=settings.num_basis)
    configs = {f"lora r={r}": LoraConfig(r=r, lora_alpha=r, **common) for r in sorted({1, 4, 8, settings.rank})}
    configs.update({
        "nola shared": NolaConfig(basis_mode="shared", **nola),
        "nola per_layer": NolaConfig(basis_mode="per_layer", **nola),
        "nola per_layer_cached": NolaConfig(basis_mode="per_layer_cached", **nola),
        f"nora r={settings.rank}/{settings.nora_inner_r}": NoraConfig(
            r=settings.rank, inner_r=settings.nora_inner_r, **lowrank),
        f"vera r={settings.vera_r}": VeraConfig(r=settings.vera_r, save_projection=False, **common),
    })
    return configs


def select_methods(shape: Shape, settings: Settings, wanted: list[str] | None) -> dict[str, object]:
    """``method_configs`` restricted to ``wanted`` (LoRA at the same rank always stays: it is the baseline)."""
    configs = method_configs(shape, settings)
    if wanted:
        unknown = sorted(set(wanted) - set(configs))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(configs)}")
        configs = {name: c for name, c in configs.items() if name in wanted or name == baseline_name(settings)}
    return configs


def build_base(shape: Shape, device: str) -> torch.nn.Module:
    """The seeded base model of ``shape``, initialised directly on ``device`` (minutes saved on the large shapes)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModel.from_config(shape.config)


def sharing_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base`` with its own modules but the very same parameter and buffer tensors.

    peft replaces modules in place, so each method needs its own module tree; the frozen weights need no copy.
    """
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def make_batch(shape: Shape, device: str) -> dict:
    """A seeded random input batch of ``shape.batch`` sequences of ``shape.seq`` tokens (or images)."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(shape.config, ViTConfig):
        size = shape.config.image_size
        return {"pixel_values": torch.randn(shape.batch, 3, size, size, generator=generator).to(device)}
    ids = torch.randint(0, shape.config.vocab_size, (shape.batch, shape.seq), generator=generator)
    return {"input_ids": ids.to(device)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch, device: str) -> float:
    """One forward/backward/AdamW step on a dummy loss; returns its wall time in seconds."""
    synchronize(device)
    start = time.perf_counter()
    out = model(**batch).last_hidden_state
    out.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def frozen_state_bytes(model) -> int:
    """Bytes of the adapters' frozen extra state (NOLA basis, NoRA SVD factors, VeRA projections), each tensor once."""
    seen = {}
    for name, buffer in model.named_buffers():
        if FROZEN_STATE.search(name):
            seen[buffer.data_ptr()] = buffer.numel() * buffer.element_size()
    for module in model.modules():  # NOLA's basis store: a plain dict on the tuner, kept out of Module._apply
        for tensor in (module.__dict__.get("nola_basis") or {}).values():
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def adapter_file_bytes(model) -> int:
    """Size of ``adapter_model.safetensors`` as written by ``save_pretrained``."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return os.path.getsize(Path(tmp) / "adapter_model.safetensors")


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ step time
def bench_steps(name: str, shape: Shape, settings: Settings, methods: list[str] | None, reps: int, warmup: int,
                budget_s: float, errors: list | None = None) -> list[dict]:
    """Interleaved training-step timing of every method on ``shape``; one row per method.

    A method that cannot be built (e.g. a stored basis larger than the memory peft-nola allows) is left out and
    reported in ``errors``; the LoRA baseline must build.
    """
    device = settings.device
    base = build_base(shape, device)
    batch = make_batch(shape, device)
    runs = {}
    for method, config in select_methods(shape, settings, methods).items():
        start = time.perf_counter()
        try:
            model = get_peft_model(sharing_copy(base), config).to(device)
        except Exception as error:
            if method == baseline_name(settings) or errors is None:
                raise
            errors.append({"shape": name, "method": method, "error": f"{type(error).__name__}: {error}"})
            log(f"{name}: {method} left out: {errors[-1]['error']}")
            continue
        model.train()
        runs[method] = (model, torch.optim.AdamW(trainable_params(model), lr=1e-4))
        log(f"{name}: built {method} in {time.perf_counter() - start:.1f} s")
    baseline = baseline_name(settings)
    times = {method: [] for method in runs}
    spent = dict.fromkeys(runs, 0.0)
    active = list(runs)
    for round_index in range(warmup + reps):
        shift = round_index % len(active)
        for method in active[shift:] + active[:shift]:
            elapsed = train_step(*runs[method], batch, device)
            spent[method] += elapsed
            if round_index >= warmup:
                times[method].append(elapsed)
        if round_index >= warmup:
            over = [m for m in active if m != baseline and spent[m] > budget_s]
            for method in over:
                log(f"{name}: {method} leaves after {len(times[method])} measured steps (budget {budget_s:.0f} s)")
            active = [m for m in active if m not in over]
        log(f"{name}: round {round_index + 1}/{warmup + reps}"
            + (" (warm-up)" if round_index < warmup else f", LoRA {1e3 * times[baseline][-1]:.0f} ms"))
    rows = []
    for method, (model, _) in runs.items():
        ratios = [t / ref for t, ref in zip(times[method], times[baseline])]
        q1, q3 = quartiles(ratios)
        rows.append({
            "shape": name, "method": method, "trainable_params": sum(p.numel() for p in trainable_params(model)),
            "n": len(times[method]), "step_ms": 1e3 * statistics.median(times[method]),
            "ratio_vs_lora": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3,
            "basis_bytes": frozen_state_bytes(model), "adapter_file_bytes": adapter_file_bytes(model),
        })
    return rows


# --------------------------------------------------------------------------------------------- peak memory
def _current_rss_and_reset_peak() -> tuple[int, bool]:
    """The resident set now, after resetting the kernel's peak counter (``VmHWM``) to it where that works."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        reset = True
    except OSError:
        reset = False
    return _proc_status_bytes("VmRSS"), reset


def _proc_status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return 1024 * int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def _release_free_memory() -> None:
    gc.collect()
    try:  # hand memory the C allocator keeps back to the OS, so the baseline holds live data only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(name: str, method: str, settings: Settings, steps: int) -> dict:
    """Build ``method`` on ``name`` and return the peak memory of ``steps`` training steps (see module docstring)."""
    shape = get_shape(name, settings)
    device = settings.device
    model = get_peft_model(build_base(shape, device), method_configs(shape, settings)[method]).to(device)
    model.train()
    optimizer = torch.optim.AdamW(trainable_params(model), lr=1e-4)
    batch = make_batch(shape, device)
    _release_free_memory()
    if device.startswith("cuda"):
        synchronize(device)
        baseline, reset = torch.cuda.memory_allocated(device), True
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline, reset = _current_rss_and_reset_peak()
    for _ in range(steps):
        train_step(model, optimizer, batch, device)
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, kind = _proc_status_bytes("VmHWM"), "peak RSS (VmHWM)" if reset else "peak RSS since start"
    result = {"shape": name, "method": method, "peak_bytes": peak, "before_steps_bytes": baseline,
              "peak_kind": kind, "basis_bytes": frozen_state_bytes(model)}
    del model, optimizer, batch  # on CUDA the next job runs in this process
    return result


def _memory_worker(payload: str) -> None:
    """Hidden entry point: measure each job (see module docstring) and print each result as a JSON line.

    On CPU each job runs in a child forked before any torch operation. On CUDA, where a forked child cannot use the
    GPU, the jobs run one after another in this process: ``max_memory_allocated`` counts live tensors only, so what
    an earlier job freed cannot inflate a later one (``leftover_bytes`` shows anything it did not free).
    """
    request = json.loads(payload)
    settings = Settings(**request["settings"])
    if settings.device.startswith("cuda"):
        # The first job once more, unreported, beforehand: the first CUDA work of a process allocates lasting state
        # (e.g. cuBLAS workspaces, tens of MB) that would otherwise count against the first job only.
        for index, (name, method) in enumerate(request["jobs"][:1] + request["jobs"]):
            gc.collect()
            torch.cuda.empty_cache()
            leftover = torch.cuda.memory_allocated(settings.device)
            try:
                result = dict(memory_child(name, method, settings, request["steps"]), leftover_bytes=leftover)
            except Exception as error:  # reported to the parent, which shows it in the table
                result = {"shape": name, "method": method, "error": f"{type(error).__name__}: {error}"}
            if index > 0:
                print("BENCH_MEMORY " + json.dumps(result), flush=True)
        return
    for name, method in request["jobs"]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                result = memory_child(name, method, settings, request["steps"])
            except Exception as error:  # reported to the parent, which shows it in the table
                result = {"shape": name, "method": method, "error": f"{type(error).__name__}: {error}"}
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 1 << 16):
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        text = b"".join(chunks).decode()
        result = json.loads(text) if text else {"shape": name, "method": method,
                                                 "error": f"child died (wait status {status}; out of memory?)"}
        print("BENCH_MEMORY " + json.dumps(result), flush=True)


def measure_memory(jobs: list[tuple[str, str]], settings: Settings, steps: int) -> list[dict]:
    """Peak training memory of each ``(shape, method)`` job, measured by one worker process (module docstring)."""
    if not hasattr(os, "fork"):
        log("no os.fork on this platform: peak memory not measured")
        return []
    payload = json.dumps({"jobs": jobs, "settings": asdict(settings), "steps": steps})
    command = [sys.executable, str(Path(__file__).resolve()), "--_memory_worker", payload]
    results = []
    # A fixed mmap threshold turns off glibc's adaptive one, which after the first large free serves later tensors
    # of that size from the heap and keeps them resident when freed: the resident set then tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17))
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as worker:
        for line in worker.stdout:
            if line.startswith("BENCH_MEMORY "):
                results.append(json.loads(line.removeprefix("BENCH_MEMORY ")))
                row = results[-1]
                log(f"{row['shape']}: memory of {row['method']}: "
                    + (f"{row['peak_bytes'] / 2**20:.0f} MB" if "peak_bytes" in row else row["error"]))
    if worker.returncode:
        log(f"memory worker exited with {worker.returncode}")
    return results


# ----------------------------------------------------------------------------------------- merge and switch
def _timed(function, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def materialize_all(model, adapter_name: str = "default") -> None:
    """Form every adapted layer's ΔW (each one discarded at once: time, not memory, is measured), the way
    ``merge_adapter`` does: for NOLA inside one combiner span, so each shared basis is read once for all layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    combiner = getattr(model.base_model, "nola_combiner", None)
    with torch.no_grad(), (combiner.span() if combiner is not None else contextlib.nullcontext()):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in module.scaling:
                module.get_delta_weight(adapter_name)


def _repeat(function, device: str, reps: int, budget_s: float) -> list[float]:
    """At least one timing of ``function``, up to ``reps`` while their sum stays under ``budget_s``."""
    times = []
    while len(times) < reps and (not times or sum(times) < budget_s):
        times.append(_timed(function, device))
    return times


def bench_merge(name: str, shape: Shape, settings: Settings, methods: list[str] | None, reps: int,
                budget_s: float) -> list[dict]:
    """Materialising every ΔW from NOLA's coefficients vs loading a rank-1 LoRA adapter from disk."""
    device = settings.device
    configs = method_configs(shape, settings)
    base = build_base(shape, device)
    rows = []

    def add(what: str, times: list[float]) -> None:
        rows.append({"shape": name, "what": what, "ms": 1e3 * statistics.median(times), "n": len(times)})
        log(f"{name}: {what}: {rows[-1]['ms']:.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        lora = get_peft_model(sharing_copy(base), configs["lora r=1"])
        lora.save_pretrained(f"{tmp}/lora")
        times = []
        for index in range(reps):
            times.append(_timed(lambda: lora.load_adapter(f"{tmp}/lora", adapter_name=f"loaded{index}"), device))
            lora.delete_adapter(f"loaded{index}")
        add("lora r=1: load adapter from disk", times)
        add("lora r=1: materialize every ΔW", _repeat(lambda: materialize_all(lora), device, reps, budget_s))
        del lora
        for method in ("nola shared", "nola per_layer"):
            if methods and method not in methods:
                continue
            # A fresh model each time: "cold" includes generating the basis, as after loading an adapter.
            model = get_peft_model(sharing_copy(base), copy.deepcopy(configs[method]))
            add(f"{method}: materialize every ΔW (cold)", [_timed(lambda: materialize_all(model), device)])
            add(f"{method}: materialize every ΔW (warm)",
                _repeat(lambda: materialize_all(model), device, reps, budget_s))
            model.save_pretrained(f"{tmp}/{method}")
            add(f"{method}: load adapter from disk",
                [_timed(lambda: model.load_adapter(f"{tmp}/{method}", adapter_name="loaded"), device)])
            del model
    return rows


def bench_switch(name: str, shape: Shape, settings: Settings, methods: list[str] | None, num_adapters: int,
                 reps: int, budget_s: float) -> list[dict]:
    """Switching among ``num_adapters`` loaded adapters: unmerged (set_adapter) and merged (unmerge/set/merge)."""
    device = settings.device
    base = build_base(shape, device)
    batch = {key: value[:1] for key, value in make_batch(shape, device).items()}
    configs = method_configs(shape, settings)
    rows = []
    # Not the on-the-fly per-layer basis: it regenerates its basis in every unmerged forward and every merge.
    for method in (baseline_name(settings), "nola shared"):
        if methods and method not in methods and method != baseline_name(settings):
            continue
        model = get_peft_model(sharing_copy(base), copy.deepcopy(configs[method]), adapter_name="a0")
        for index in range(1, num_adapters):
            model.add_adapter(f"a{index}", copy.deepcopy(configs[method]))
        model.eval()
        names = [f"a{index}" for index in range(num_adapters)]
        cycle = iter(range(10**9))

        def forward():
            with torch.no_grad():
                model(**batch)

        def switch():
            model.set_adapter(names[next(cycle) % num_adapters])
            forward()

        def switch_merged():
            model.unmerge_adapter()
            model.set_adapter(names[next(cycle) % num_adapters])
            model.merge_adapter()
            forward()

        forward()  # warm-up (and NOLA's basis)
        row = {"shape": name, "method": method, "num_adapters": num_adapters,
               "forward_ms": 1e3 * statistics.median(_repeat(forward, device, reps, budget_s)),
               "switch_forward_ms": 1e3 * statistics.median(_repeat(switch, device, reps, budget_s))}
        model.merge_adapter()
        row["merged_switch_forward_ms"] = 1e3 * statistics.median(_repeat(switch_merged, device, reps, budget_s))
        model.unmerge_adapter()  # the base weights are shared with the next method's model
        rows.append(row)
        log(f"{name}: switch {method}: forward {row['forward_ms']:.1f} ms, set_adapter+forward "
            f"{row['switch_forward_ms']:.1f} ms, unmerge/set/merge+forward {row['merged_switch_forward_ms']:.1f} ms")
        del model
    return rows


# ------------------------------------------------------------------------------------------------ reporting
def add_memory_and_targets(steps: list[dict], memory: list[dict], settings: Settings) -> None:
    """Fill each step row with its memory figures and the target verdicts (None where a target does not apply)."""
    device_type = "cuda" if settings.device.startswith("cuda") else "cpu"
    by_key = {(m["shape"], m["method"]): m for m in memory}
    for row in steps:
        target = STEP_TARGETS.get(row["method"], {}).get(device_type)
        row["step_target"] = target
        row["step_target_met"] = None if target is None else row["ratio_vs_lora"] <= target
        mem = by_key.get((row["shape"], row["method"]), {})
        lora = by_key.get((row["shape"], baseline_name(settings)), {})
        row["memory_error"] = mem.get("error")
        row["peak_bytes"] = mem.get("peak_bytes")
        row["peak_kind"] = mem.get("peak_kind")
        row["training_overhead_bytes"] = mem["peak_bytes"] - mem["before_steps_bytes"] if "peak_bytes" in mem else None
        if "peak_bytes" in mem and "peak_bytes" in lora:
            row["peak_minus_lora_bytes"] = mem["peak_bytes"] - lora["peak_bytes"]
            row["memory_target_bytes"] = lora["peak_bytes"] * MEMORY_SLACK + mem["basis_bytes"]
            # On CPU the resident set before the first step differs by tens of MB between identical processes
            # (allocator state after building the model), so the peaks are compared as LoRA's resident set before
            # its steps plus each method's own growth during them.
            peak = mem["peak_bytes"] if device_type == "cuda" else (
                lora["before_steps_bytes"] + mem["peak_bytes"] - mem["before_steps_bytes"])
            row["memory_target_met"] = peak <= row["memory_target_bytes"]
        else:
            row["peak_minus_lora_bytes"] = row["memory_target_bytes"] = row["memory_target_met"] = None


def _mb(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def _verdict(met) -> str:
    return "–" if met is None else ("yes" if met else "**no**")


def format_tables(result: dict) -> str:
    settings = result["settings"]
    lines = ["Shapes: " + "; ".join(
        f"{name} (batch {shape['batch']}" + (f" x {shape['seq']} tokens" if shape["seq"] else " images")
        + f", adapting {'+'.join(shape['targets'])})" for name, shape in result["shapes"].items()), "",
             f"Step time (median of {result['reps']} interleaved rounds after {result['warmup']} warm-up; "
             f"ratio = median of per-round ratios to LoRA r={settings['rank']}, [quartiles]; "
             f"NOLA k=l={settings['num_basis']}, r={settings['rank']})", "",
             "| shape | method | trainable params | n | step ms | ratio vs LoRA | target | met |", "|" + "---|" * 8]
    for row in result["steps"]:
        target = "–" if row["step_target"] is None else f"≤ {row['step_target']:.2f}"
        lines.append(f"| {row['shape']} | {row['method']} | {row['trainable_params']:,} | {row['n']} | "
                     f"{row['step_ms']:.1f} | {row['ratio_vs_lora']:.3f} [{row['ratio_q1']:.3f}–{row['ratio_q3']:.3f}]"
                     f" | {target} | {_verdict(row['step_target_met'])} |")
    lines += [f"- left out: {e['shape']} / {e['method']}: {e['error']}" for e in result.get("errors", [])]
    kind = next((row["peak_kind"] for row in result["steps"] if row.get("peak_kind")), "not measured")
    apart = "one method after another in one process" if kind.startswith("cuda") else "each method in its own process"
    measured = "peak not measured" if kind == "not measured" else (
        f"peak = {kind} over {result['mem_steps']} training steps, {apart}")
    lines += ["", f"Memory (MB; {measured}; target: peak ≤ LoRA's × {MEMORY_SLACK} + basis)", "",
              "| shape | method | peak | peak − LoRA | training overhead | basis / frozen state | adapter file (KB) "
              "| target met |", "|" + "---|" * 8]
    for row in result["steps"]:
        peak = _mb(row["peak_bytes"]) if row["memory_error"] is None else f"error: {row['memory_error'][:60]}"
        lines.append(f"| {row['shape']} | {row['method']} | {peak} | {_mb(row['peak_minus_lora_bytes'])} | "
                     f"{_mb(row['training_overhead_bytes'])} | {_mb(row['basis_bytes'])} | "
                     f"{row['adapter_file_bytes'] / 1024:,.1f} | {_verdict(row['memory_target_met'])} |")
    if result["merge"]:
        lines += ["", "Merge: materialising every ΔW vs loading a LoRA r=1 adapter from disk (median ms)", "",
                  "| shape | what | ms | n |", "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['what']} | {r['ms']:.1f} | {r['n']} |" for r in result["merge"]]
        lines += [""] + [f"- {verdict}" for verdict in result["merge_verdicts"]]
    if result["switch"]:
        lines += ["", "Switch among loaded adapters (median ms, batch of 1, no grad)", "",
                  "| shape | method | adapters | forward | set_adapter + forward | unmerge/set/merge + forward |",
                  "|" + "---|" * 6]
        lines += [f"| {r['shape']} | {r['method']} | {r['num_adapters']} | {r['forward_ms']:.1f} | "
                  f"{r['switch_forward_ms']:.1f} | {r['merged_switch_forward_ms']:.1f} |" for r in result["switch"]]
    return "\n".join(lines)


def merge_verdicts(merge: list[dict]) -> list[str]:
    """The issue's criterion per shape: materialising NOLA's ΔW takes less time than loading LoRA r=1 from disk."""
    verdicts = []
    for shape in dict.fromkeys(r["shape"] for r in merge):
        ms = {r["what"]: r["ms"] for r in merge if r["shape"] == shape}
        load = ms.get("lora r=1: load adapter from disk")
        for method in ("nola shared", "nola per_layer"):
            for state in ("cold", "warm"):
                value = ms.get(f"{method}: materialize every ΔW ({state})")
                if value is not None and load is not None:
                    verdicts.append(f"{shape}: {method} materialize ({state}) {value:.1f} ms vs LoRA r=1 load "
                                    f"{load:.1f} ms: {'faster' if value < load else 'SLOWER'}")
    return verdicts


def plot(result: dict, path: Path) -> None:
    """Step-time ratio, peak memory above LoRA, merge/load and switch times as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    shape_names = list(dict.fromkeys(r["shape"] for r in steps))
    method_names = list(dict.fromkeys(r["method"] for r in steps))
    figure, axes = plt.subplots(2, 2, figsize=(15, 10))
    width = 0.8 / max(1, len(method_names))
    for panel, key, label in ((axes[0][0], "ratio_vs_lora", "step time / LoRA (same rank)"),
                              (axes[0][1], "peak_minus_lora_bytes", "peak memory − LoRA's (MB)")):
        for index, method in enumerate(method_names):
            values = []
            for shape in shape_names:
                row = next((r for r in steps if r["shape"] == shape and r["method"] == method), None)
                value = None if row is None else row.get(key)
                values.append(float("nan") if value is None else (value / 2**20 if key.endswith("bytes") else value))
            panel.bar([s + index * width for s in range(len(shape_names))], values, width, label=method)
        panel.set_xticks([s + 0.4 - width / 2 for s in range(len(shape_names))], shape_names, fontsize=8)
        panel.set_ylabel(label)
    axes[0][0].set_yscale("log")
    axes[0][0].axhline(1.0, color="black", linewidth=0.8)
    for target in sorted({t for targets in STEP_TARGETS.values() for t in targets.values()}):
        axes[0][0].axhline(target, color="grey", linewidth=0.6, linestyle="--")
    axes[0][0].legend(fontsize=7)
    if result["merge"]:
        labels = [f"{r['shape']}\n{r['what']}" for r in result["merge"]]
        axes[1][0].barh(range(len(labels)), [r["ms"] for r in result["merge"]])
        axes[1][0].set_yticks(range(len(labels)), labels, fontsize=6)
        axes[1][0].set_xscale("log")
        axes[1][0].set_xlabel("ms (median)")
        axes[1][0].set_title("materialise every ΔW vs load LoRA r=1 from disk", fontsize=9)
    if result["switch"]:
        labels = [f"{r['shape']}\n{r['method']}" for r in result["switch"]]
        for index, (key, label) in enumerate((("forward_ms", "forward"), ("switch_forward_ms", "set_adapter+fwd"),
                                              ("merged_switch_forward_ms", "unmerge/set/merge+fwd"))):
            axes[1][1].bar([i + index * 0.27 for i in range(len(labels))], [r[key] for r in result["switch"]], 0.27,
                           label=label)
        axes[1][1].set_xticks([i + 0.27 for i in range(len(labels))], labels, fontsize=7)
        axes[1][1].set_yscale("log")
        axes[1][1].set_title(f"switch among {result['switch'][0]['num_adapters']} loaded adapters", fontsize=9)
        axes[1][1].set_ylabel("ms (median)")
        axes[1][1].legend(fontsize=7)
    figure.suptitle(f"peft-nola bench, {result['device']}, {result['date']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------- main
SHAPE_NAMES = sorted(shapes())


@dataclass
class Options:
    """python scripts/bench.py options."""

    quick: bool = field(default=False, metadata={"help": (
        f"Shapes {QUICK_SHAPES} and few repetitions (a few minutes on a CPU).")})
    shapes: list[str] | None = field(default=None, metadata={"choices": SHAPE_NAMES, "help": (
        f"Shapes to time; null: {FULL_SHAPES} (full) or {QUICK_SHAPES} (--quick).")})
    methods: list[str] | None = field(default=None, metadata={"help": (
        "Only these methods, e.g. nola shared (LoRA at --rank always runs: it is the baseline); null: all.")})
    rank: int = field(default=8, metadata={"help": "Rank of NOLA and NoRA, and of the LoRA baseline."})
    num_basis: int = field(default=1000, metadata={"help": "NOLA's k = l."})
    nora_inner_r: int = field(default=4, metadata={"help": "NoRA's inner trainable rank."})
    vera_r: int = field(default=256, metadata={"help": "VeRA's rank (its A and B are shared by all layers)."})
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu", metadata={"help": (
        "Device to time on (cuda when available, else cpu).")})
    batch: int | None = field(default=None, metadata={"help": "Batch size for every shape (null: each shape's)."})
    seq: int | None = field(default=None, metadata={"help": (
        "Sequence length of the text shapes (null: each shape's).")})
    reps: int | None = field(default=None, metadata={"help": "Measured rounds (null: 10 quick, 20 full)."})
    warmup: int | None = field(default=None, metadata={"help": "Warm-up rounds (null: 1 quick, 2 full)."})
    budget_s: float | None = field(default=None, metadata={"help": (
        "Seconds of steps (warm-up included) per method and shape after which it leaves the rounds (null: 10 "
        "quick, 300 full).")})
    mem_steps: int = field(default=2, metadata={"help": "Training steps per peak-memory measurement."})
    skip_memory: bool = field(default=False, metadata={"help": "Skip the peak-memory measurements."})
    merge_shapes: list[str] | None = field(default=None, metadata={"nargs": "*", "choices": SHAPE_NAMES, "help": (
        "Shapes for the merge and switch measurements (null: gpt2-medium-qv if selected, else the first shape; "
        "none with an empty list).")})
    num_adapters: int = field(default=8, metadata={"help": "Adapters loaded for the switch measurement."})
    out: Path = field(default=Path("runs/bench/bench.json"), metadata={"help": (
        "Where the JSON goes; the Markdown and the PNG chart go beside it.")})
    _memory_worker: str | None = field(default=None, metadata={"hidden": True, "help": "Internal: a memory child."})


def main(argv=None) -> dict:
    args = parse_script_args(Options, argv, "python scripts/bench.py [--quick] [--key value ...]", __doc__)
    if args._memory_worker is not None:
        _memory_worker(args._memory_worker)
        return {}
    selected = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    reps = args.reps or (10 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    budget_s = args.budget_s or (10.0 if args.quick else 300.0)
    if args.merge_shapes is None:
        args.merge_shapes = ["gpt2-medium-qv"] if "gpt2-medium-qv" in selected else selected[:1]
    settings = Settings(args.rank, args.num_basis, args.nora_inner_r, args.vera_r, args.device, args.batch, args.seq)
    started = time.perf_counter()
    torch.set_grad_enabled(True)

    memory = []
    if not args.skip_memory:  # first: the worker must not compete with the timing below for the CPU
        jobs = [(name, method) for name in selected for method in select_methods(get_shape(name, settings), settings, args.methods)]
        memory = measure_memory(jobs, settings, args.mem_steps)
    steps, errors = [], []
    for name in selected:
        steps += bench_steps(name, get_shape(name, settings), settings, args.methods, reps, warmup, budget_s, errors)
        gc.collect()
    add_memory_and_targets(steps, memory, settings)
    merge, switch = [], []
    for name in args.merge_shapes:
        merge += bench_merge(name, get_shape(name, settings), settings, args.methods, reps=min(reps, 5), budget_s=budget_s)
        switch += bench_switch(name, get_shape(name, settings), settings, args.methods, args.num_adapters, reps=min(reps, 10),
                               budget_s=budget_s)
        gc.collect()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": (torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda")
                   else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"),
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__, "peft_nola": peft_nola.__version__},
        "shapes": {name: {"batch": get_shape(name, settings).batch, "seq": get_shape(name, settings).seq,
                          "targets": get_shape(name, settings).targets} for name in selected + args.merge_shapes},
        "settings": asdict(settings), "reps": reps, "warmup": warmup, "budget_s": budget_s,
        "mem_steps": args.mem_steps, "steps": steps, "memory": memory, "merge": merge,
        "merge_verdicts": merge_verdicts(merge), "switch": switch, "errors": errors,
        "wall_s": time.perf_counter() - started,
    }
    tables = format_tables(result)
    print(tables)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(f"{result['date']}, {result['device']}\n\n`{result['command']}`\n\n{tables}\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')} "
          f"({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
