"""Property-based tests: random sequences of what users do to a NOLA / NoRA ``PeftModel``, checked at every step.

A hypothesis ``RuleBasedStateMachine`` (one per NOLA basis mode, and NoRA) drives a tiny LLaMA (``q_proj``/``v_proj``)
or GPT-2 (the QV thirds of ``c_attn``) through optimizer steps, in-place edits and replacement of the trainable
tensors, saving and ``load_adapter`` (new and existing name), ``peft_nola.hotswap_adapter``, ``set_adapter`` /
``delete_adapter`` / ``disable_adapter``, ``.half()`` / ``.float()`` / ``.double()``, ``train()`` / ``eval()``, a
forward interrupted by ``KeyboardInterrupt``, ``peft_nola.quantize_coefficients``, merge/unmerge, forwards with and
without gradients and under ``torch.inference_mode()``, mixed batches with any ``adapter_names`` layout and
``generate`` with beams.

The machine keeps a mirror of what the model should be: which adapters exist, which is active, the dtype, what is
merged, the base weights, and every adapter tensor as a float64 copy, updated by each rule independently of the
library (an edit is applied to the copy in float64 and rounded to the model's dtype; a cast rounds the copy). The
REFERENCE is a plain transformers model in float64 whose adapted weights are ``W + ΔW`` with ``ΔW`` computed here by
the papers' formulas from the mirrored tensors (NOLA: ``nola_alpha / r · (Σ β_j B_j)(Σ α_i A_i)`` with the basis from
``peft_nola.basis.basis_rows``; NoRA: ``nora_alpha / inner_r · U (A B − C₀) Vᵀ``). It shares none of the code under
test: not the factor cache, the basis combiner, the mixed-batch kernels, merging or loading. Only NoRA's frozen SVD
factors are taken from the model when an adapter is created (their computation is tested in tests/test_nora.py).

After every step an invariant checks that the adapter tensors equal the mirror and that a forward pass equals the
reference within :data:`OUTPUT_RTOL`. That forward runs with gradients enabled, which neither reads nor fills the
inference factor cache, so checking does not hide a stale cache: the rules' own no-grad, inference-mode, mixed-batch
and generate forwards exercise the cache (and are compared with the reference too).

Bugs already known (issue 23) are gated by :data:`KNOWN_BUGS`: while a name is in the set, the rules that would hit
that bug avoid it (each gate says how); the fix removes the name. Each known bug has a fixed sequence below, marked
``xfail(strict=True)`` while its name is in the set, that reproduces it with the gate removed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import peft_nola
from peft_nola import GPT2_QV_SLICES, NolaConfig, NoraConfig
from peft_nola.basis import basis_rows
from peft_nola.quantization import HEADER_SUFFIX, unpack_tensor
from peft_nola.tuners import lowrank
from peft_nola.tuners.lowrank import LowRankLayer

from .conftest import tiny_gpt2, tiny_llama

#: Bugs of issue 23 the machine steers around until they are fixed (remove a name when its fix lands):
#: - "dtype_roundtrip": ``.half()`` then ``.float()`` (or any cast back) with no forward between serves cached factors
#:   of the old values (storage reused, version counter and dtype equal again). Gate: every cast is followed by
#:   ``train()`` + the previous mode, which drops every cached factor. (Not reproduced here: it needs the allocator to
#:   hand the freed storage back; the gate stays so that a reuse cannot make CI flaky.)
KNOWN_BUGS = {"dtype_roundtrip"}

#: Largest allowed ``max |model output - reference output|`` as a fraction of ``max |reference output|``, by the
#: model's dtype. Measured over the fast and slow profiles (printed as "worst_relative_error"): float64 <= 6e-16,
#: float32 <= 1.3e-6, float16 <= 3.9e-3 (its eps is 1e-3); the bounds keep a >= 5x margin. The bugs found here moved the
#: logits by 2e-4 (a float16-rounded basis) to 0.6 (another sample's adapter) of their scale.
OUTPUT_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2}
#: Gradients of the loss with respect to the trainable tensors, as a fraction of the largest reference gradient
#: entry of that tensor (measured: float32 <= 1.9e-6, float64 <= 2e-15).
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 5e-5}
#: Merged weights and base weights after unmerge, as a fraction of ``max |W| + max |ΔW|``: one rounding of W + ΔW and
#: one of the difference in the model's dtype, plus ΔW rounded differently when the dtype changed while merged: 8 unit
#: roundoffs (measured: float32 <= 1.6e-7 = 2.7 units, float16 <= 6.2e-4 = 1.3 units).
UNMERGE_RTOL = {torch.float64: 1e-13, torch.float32: 8 * 2**-24, torch.float16: 8 * 2**-11}

DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
VOCAB = 96
BASE = "__base__"

def clear_layout_cache() -> None:
    """Empty the per-process cache of mixed-batch layouts (an lru_cache: ``lowrank._sample_layout``, or
    ``lowrank.mixed_batch.sample_layout`` since lowrank became a package)."""
    mixed_batch = getattr(lowrank, "mixed_batch", None)
    cached = getattr(mixed_batch, "sample_layout", None) or getattr(lowrank, "_sample_layout")
    cached.cache_clear()


#: What ran, for the report (printed by the profile tests): sequences, steps and rule counts per machine.
RUN_COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


# ------------------------------------------------------------------------------------------------------ reference
@functools.lru_cache(maxsize=256)
def reference_basis(seed: int, stream: str, num_basis: int, numel: int) -> torch.Tensor:
    """The ``(num_basis, numel)`` basis of a stream, float64 (exactly the float32 values the generator defines)."""
    return basis_rows(seed, stream, num_basis, numel).double()


def fresh_base(kind: str):
    """The tiny base model (tests/conftest.py) in float64 with dropout off."""
    model = tiny_llama() if kind == "llama" else tiny_gpt2()
    _no_dropout(model)
    return model.double().eval()


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)


def all_tensors(model) -> dict:
    """Parameters and buffers (also non-persistent ones such as LLaMA's rotary ``inv_freq``, which casts round too);
    a tied weight once."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assign(model, state: dict) -> None:
    """Copy ``state`` (parameters and buffers by name) into ``model``'s own tensors."""
    tensors = all_tensors(model)
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


def round_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` rounded to ``dtype``, back in float64 (what a model in ``dtype`` holds)."""
    return tensor.to(dtype).double()


class Reference:
    """Outputs of the float64 base model with each adapted weight ``W`` replaced by ``W + ΔW`` (formulas above)."""

    def __init__(self, kind: str, method: str, targets: dict[str, tuple[int, int]], model):
        self.kind, self.method, self.model = kind, method, model
        self.targets = targets  # module key -> (rows, cols) of W viewed as y = W x
        self.slices = (3, (0, 2)) if kind == "gpt2" else (1, (0,))

    def delta(self, spec: dict, tensors: dict, key: str) -> torch.Tensor:
        """``ΔW`` of one layer, ``(rows, cols)``, differentiable in ``tensors``."""
        rows, cols = self.targets[key]
        splits, adapt = self.slices
        block_rows = rows // splits
        blocks = []
        for block in range(splits):
            if block not in adapt:
                blocks.append(torch.zeros(block_rows, cols, dtype=torch.float64))
                continue
            i = adapt.index(block)
            t = tensors[key]
            if self.method == "nola":
                r, k, l, seed = spec["r"], spec["num_basis_A"], spec["num_basis_B"], spec["basis_seed"]
                if spec["basis_mode"] == "shared":
                    stream_A, stream_B = f"A/{r}x{cols}", f"B/{block_rows}x{r}"
                else:
                    stream_A, stream_B = f"A/{key}/{block}", f"B/{key}/{block}"
                down = (t["A"][i] @ reference_basis(seed, stream_A, k, r * cols)).view(r, cols)
                up = (t["B"][i] @ reference_basis(seed, stream_B, l, block_rows * r)).view(block_rows, r)
                blocks.append(spec["nola_alpha"] / r * up @ down)
            else:
                core = t["A"][i] @ t["B"][i] - t["C0"][i]
                blocks.append(spec["nora_alpha"] / spec["inner_r"] * t["U"][i] @ core @ t["Vt"][i])
        return torch.cat(blocks)

    def state(self, base_state: dict, adapter) -> dict:
        """The float64 state of the base model with ``adapter``'s updates added (``None``: the base model)."""
        state = dict(base_state)
        if adapter is not None:
            for key in self.targets:
                delta = self.delta(adapter.spec, adapter.tensors, key)
                state[f"{key}.weight"] = state[f"{key}.weight"] + (delta.T if self.kind == "gpt2" else delta)
        return state

    def logits(self, base_state: dict, adapter, ids: torch.Tensor, labels=None):
        out = torch.func.functional_call(self.model, self.state(base_state, adapter), (ids,),
                                         {"labels": labels} if labels is not None else {}, tie_weights=True)
        return out if labels is not None else out.logits

    def generate(self, base_state: dict, adapter, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            assign(self.model, self.state(base_state, adapter))
            return self.model.generate(ids, **kwargs)


#: The largest ``error / scale`` seen per check and dtype (printed with the run counts; the bounds above come from it).
WORST: dict[str, float] = collections.defaultdict(float)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, kind: str = "") -> None:
    """``max |actual - expected| <= rtol * max |expected|``, with the figures in the message."""
    error = float((actual.detach().double() - expected.detach().double()).abs().max())
    scale = float(expected.detach().double().abs().max())
    if kind:
        WORST[kind] = max(WORST[kind], error / max(scale, 1e-30))
    assert error <= rtol * max(scale, 1e-30), (
        f"{what}: max |model - reference| = {error:.3e}, {error / max(scale, 1e-30):.2e} of the output scale "
        f"{scale:.3e}; allowed {rtol:.1e}"
    )


class Adapter:
    """The mirror of one adapter: its config values and a float64 copy of each tensor, per module key."""

    def __init__(self, spec: dict, tensors: dict, bits=None, on_grid: bool = True, dtype=torch.float32):
        self.spec, self.tensors, self.bits, self.on_grid, self.dtype = spec, tensors, bits, on_grid, dtype

    def copy(self) -> "Adapter":
        return Adapter(dict(self.spec), {k: dict(v) for k, v in self.tensors.items()}, self.bits, self.on_grid,
                       self.dtype)


MERGED = "merged"  # check_logits: the merged weights, no adapter on top

TENSOR_NAMES = {"nola": {"A": "nola_coef_A", "B": "nola_coef_B"},
                "nora": {"A": "nora_inner_A", "B": "nora_inner_B", "U": "nora_U", "Vt": "nora_Vt", "C0": "nora_core0"}}
TRAINABLE = ("A", "B")


# --------------------------------------------------------------------------------------------------- the machine
class PeftMachine(RuleBasedStateMachine):
    """Random user sessions on one NOLA basis mode or NoRA; subclasses set ``method`` and ``basis_mode``."""

    method = "nola"
    basis_mode = "shared"
    known_bugs = KNOWN_BUGS
    counts_key = "nola-shared"

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="peft-nola-stateful-"))
        self.saved: list[tuple[Path, Adapter, str]] = []  # (directory, mirror at save, method-level base version)
        self.counts = RUN_COUNTS[self.counts_key]

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ set-up
    def config(self, other: bool):
        if self.method == "nola":
            # "other": another basis seed and scale, so that loading it into "default" or hotswapping it is refused.
            return NolaConfig(r=2, num_basis_A=6, num_basis_B=5, nola_alpha=3.0 if other else 2.0,
                              basis_seed=1 if other else 0, basis_mode=self.basis_mode, init_weights=False,
                              **self.targeting)
        return NoraConfig(r=4, inner_r=2, nora_alpha=6.0 if other else 4.0, init_weights=False, **self.targeting)

    def spec_of(self, config) -> dict:
        if self.method == "nola":
            return {name: getattr(config, name)
                    for name in ("r", "num_basis_A", "num_basis_B", "nola_alpha", "basis_seed", "basis_mode")}
        return {name: getattr(config, name) for name in ("r", "inner_r", "nora_alpha")}

    @initialize(kind=st.sampled_from(["llama", "gpt2"]))
    def build(self, kind):
        self.kind = kind
        self.counts["sequences"] += 1
        self.targeting = (
            {"target_modules": ["c_attn"], "output_slices": GPT2_QV_SLICES, "fan_in_fan_out": True}
            if kind == "gpt2" else {"target_modules": ["q_proj", "v_proj"]}
        )
        base = tiny_gpt2() if kind == "gpt2" else tiny_llama()
        _no_dropout(base)
        # eval() explicitly: a new PeftModel (and its tuner) is a new module in training mode whatever the base's mode.
        self.model = get_peft_model(base, self.config(other=False)).eval()
        self.model.add_adapter("other", self.config(other=True))
        ref_model = fresh_base(kind)
        suffixes = ("c_attn",) if kind == "gpt2" else ("q_proj", "v_proj")
        targets = {}
        for name, module in ref_model.named_modules():
            if name.endswith(suffixes):
                shape = tuple(module.weight.shape)
                targets[name] = shape[::-1] if kind == "gpt2" else shape
        layer_keys = sorted(layer.module_key for layer in self.layers())
        assert layer_keys == sorted(targets), f"adapted {layer_keys}, expected {sorted(targets)}"
        self.reference = Reference(kind, self.method, targets, ref_model)
        self.base_state = {k: v.detach().clone() for k, v in all_tensors(ref_model).items()}
        self.original_base = dict(self.base_state)
        self.dtype = torch.float32
        self.active, self.merged, self.training = "default", False, False
        self.adapters = {name: Adapter(self.spec_of(self.model.peft_config[name]), self.read(name))
                         for name in ("default", "other")}
        # The "other" adapter's trainable tensors are moved away from "default"'s (they start equal for NoRA).
        noise = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for key, tensors in self.adapters["other"].tensors.items():
                for short in TRAINABLE:
                    step = 0.1 * torch.randn(tensors[short].shape, generator=noise, dtype=torch.float64)
                    new = round_to(tensors[short] + step * tensors[short].abs().max(), self.dtype)
                    self.param("other", key, short).copy_(new)
                    tensors[short] = new
        self.ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
        self.new_names = (f"loaded{i}" for i in range(1000))

    # ----------------------------------------------------------------------------------------------- model access
    def layers(self):
        return [m for m in self.model.modules() if isinstance(m, LowRankLayer)]

    def param(self, name: str, key: str, short: str) -> torch.Tensor:
        layer = next(layer for layer in self.layers() if layer.module_key == key)
        container = getattr(layer, TENSOR_NAMES[self.method][short])
        return container[name]

    def read(self, name: str) -> dict:
        """Every tensor of adapter ``name`` as it is in the model, float64."""
        return {layer.module_key: {short: getattr(layer, attr)[name].detach().double().clone()
                                   for short, attr in TENSOR_NAMES[self.method].items()}
                for layer in self.layers()}

    def trainable_tensors(self, name: str) -> list[tuple[str, str, torch.Tensor]]:
        return [(key, short, self.param(name, key, short)) for key in self.reference.targets for short in TRAINABLE]

    # ------------------------------------------------------------------------------------------------ checking
    def expected_adapter(self):
        """The adapter the model's plain forward applies: the active one, or (merged) the merged weights."""
        return MERGED if self.merged else self.adapters[self.active]

    def check_logits(self, logits, adapter, ids, what):
        state = self.base_state
        if adapter is MERGED:  # the merged weights as merging made them (and casts since rounded them)
            state, adapter = {**self.base_state, **self.merged_weights}, None
        with torch.no_grad():
            expected = self.reference.logits(state, adapter, ids)
        assert_close(logits, expected, OUTPUT_RTOL[self.dtype], f"{what} ({self.describe()})",
                     kind=f"logits {str(self.dtype).removeprefix('torch.')}")

    def describe(self) -> str:
        return (f"{self.counts_key}, {self.kind}, {self.dtype}, active={self.active}, merged={self.merged}, "
                f"training={self.training}, adapters={sorted(self.adapters)}")

    @invariant()
    def outputs_match_reference(self):
        # Checked with gradients enabled: that forward neither reads nor fills the factor cache (see the docstring).
        if not hasattr(self, "model"):
            return
        self.counts["steps"] += 1
        assert sorted(self.model.peft_config) == sorted(self.adapters)
        assert self.model.active_adapter == self.active
        assert self.model.training == self.training
        for name, adapter in self.adapters.items():
            actual = self.read(name)
            for key, tensors in adapter.tensors.items():
                for short, expected in tensors.items():
                    assert actual[key][short].dtype == torch.float64
                    assert self.param(name, key, short).dtype == adapter.dtype, (
                        f"{name} {key} {short} is {self.param(name, key, short).dtype}, expected {adapter.dtype}")
                    assert torch.equal(actual[key][short], expected), (
                        f"adapter {name!r} tensor {short} of {key} differs from what the steps made it "
                        f"(max diff {float((actual[key][short] - expected).abs().max()):.3e}; {self.describe()})")
        with torch.enable_grad():
            logits = self.model(self.ids).logits
        self.check_logits(logits, self.expected_adapter(), self.ids, "forward with gradients")

    # ---------------------------------------------------------------------------------------------- helpers
    def stored_basis_gated(self) -> bool:
        """Whether the "basis_store_dtype" gate holds the model as it is (a float16 NOLA model with a stored basis)."""
        return ("basis_store_dtype" in self.known_bugs and self.method == "nola" and self.basis_mode != "per_layer"
                and self.dtype == torch.float16)

    def drop_cached_factors(self):
        """``train()`` and back: every layer forgets its cached factors (the workaround for the gated bugs)."""
        self.model.train()
        self.model.train(self.training)

    def pick(self, index: int, names=None) -> str:
        names = sorted(self.adapters) if names is None else sorted(names)
        return names[index % len(names)]

    def after_unmerge(self):
        """The base weights are back to what they were within :data:`UNMERGE_RTOL`; the mirror then takes the
        model's weights (the rounding of merge + unmerge is documented, not an error)."""
        self.merged = False
        state = self.model.get_base_model().state_dict()
        for key in self.reference.targets:
            actual = state[f"{key}.base_layer.weight"].double()
            adapter = self.adapters[self.merged_name]
            delta = self.reference.delta(adapter.spec, adapter.tensors, key)
            # W + ΔW - ΔW, with the merged weight as casts left it
            expected = self.merged_weights[f"{key}.weight"] - (delta.T if self.kind == "gpt2" else delta)
            error = float((actual - expected).abs().max())
            scale = float(expected.abs().max() + delta.abs().max())
            WORST[f"unmerge {str(self.dtype).removeprefix('torch.')}"] = max(
                WORST[f"unmerge {str(self.dtype).removeprefix('torch.')}"], error / scale)
            assert error <= UNMERGE_RTOL[self.dtype] * scale, (
                f"base weight of {key} after unmerge is off by {error:.3e}, {error / scale:.2e} of max |W| + max |ΔW| "
                f"= {scale:.3e}; allowed {UNMERGE_RTOL[self.dtype]:.1e} ({self.describe()})")
            self.base_state[f"{key}.weight"] = actual.clone()

    @contextlib.contextmanager
    def grad_mode(self, mode: str):
        with {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]():
            yield

    # ----------------------------------------------------------------------------------------------------- rules
    @rule(mode=st.sampled_from(["grad", "no_grad", "inference"]), rows=st.integers(1, 3))
    def forward(self, mode, rows):
        self.counts["forward"] += 1
        with self.grad_mode(mode):
            logits = self.model(self.ids[:rows]).logits
        self.check_logits(logits, self.expected_adapter(), self.ids[:rows], f"forward under {mode}")

    @precondition(lambda self: not self.merged and self.dtype != torch.float16)
    @rule(optimizer=st.sampled_from(["sgd", "adam"]), lr=st.sampled_from([1e-2, 1e-1]))
    def optimizer_step(self, optimizer, lr):
        self.counts["optimizer_step"] += 1
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        adapter_params = {id(p) for name in self.adapters for *_, p in self.trainable_tensors(name)}
        assert all(id(p) in adapter_params for p in trainable), "a base-model parameter is trainable"
        if not trainable:
            return
        self.model.zero_grad(set_to_none=True)
        loss = self.model(self.ids, labels=self.ids).loss
        loss.backward()
        # The reference gradient: the same loss through the formula, with the active adapter's tensors as leaves.
        adapter = self.adapters[self.active].copy()
        leaves = {}
        for key, tensors in adapter.tensors.items():
            for short in TRAINABLE:
                leaves[key, short] = tensors[short] = tensors[short].clone().requires_grad_(True)
        ref_loss = self.reference.logits(self.base_state, adapter, self.ids, labels=self.ids).loss
        assert_close(loss.detach(), ref_loss.detach(), OUTPUT_RTOL[self.dtype], "training loss")
        ref_grads = torch.autograd.grad(ref_loss, list(leaves.values()))
        ref_grad = dict(zip(leaves, ref_grads))
        for name in self.adapters:
            for key, short, p in self.trainable_tensors(name):
                if not p.requires_grad:
                    assert p.grad is None
                    continue
                expected = ref_grad[key, short] if name == self.active else torch.zeros(p.shape, dtype=torch.float64)
                actual = p.grad if p.grad is not None else torch.zeros_like(p)
                assert_close(actual, expected, GRAD_RTOL[self.dtype] if name == self.active else 0.0,
                             f"gradient of {name} {key} {short} ({self.describe()})",
                             kind=f"gradient {str(self.dtype).removeprefix('torch.')}")
        before = {id(p): p.detach().clone() for p in trainable}
        opt = torch.optim.SGD(trainable, lr=lr) if optimizer == "sgd" else torch.optim.Adam(trainable, lr=lr)
        opt.step()
        self.model.zero_grad(set_to_none=True)
        for name, adapter in self.adapters.items():
            for key, short, p in self.trainable_tensors(name):
                if id(p) in before:
                    if optimizer == "sgd" and name == self.active:
                        want = before[id(p)].double() - lr * ref_grad[key, short]
                        assert_close(p.detach(), want, 1e-4, f"SGD step of {key} {short}")
                    adapter.tensors[key][short] = p.detach().double().clone()
                    adapter.on_grid = False

    @precondition(lambda self: not self.merged)
    @rule(which=st.integers(0, 5), op=st.sampled_from(["double", "halve", "negate", "noise", "zero"]),
          seed=st.integers(0, 99))
    def edit_in_place(self, which, op, seed):
        """What a user does by hand: ``param.mul_()``, ``add_()``, ``zero_()`` under ``no_grad``."""
        self.counts["edit_in_place"] += 1
        name = self.pick(which)
        adapter = self.adapters[name]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, short, p in self.trainable_tensors(name):
                old = adapter.tensors[key][short]
                if op in ("double", "halve"):
                    factor = 2.0 if op == "double" else 0.5
                    p.mul_(factor)  # exact unless it overflows or underflows (float16)
                    new = round_to(old * factor, adapter.dtype)
                elif op == "negate":
                    p.neg_()
                    new = -old
                elif op == "zero":
                    if short != "B":
                        continue
                    p.zero_()
                    new = torch.zeros_like(old)
                else:
                    step = round_to(0.2 * old.abs().max() * torch.randn(old.shape, generator=gen, dtype=torch.float64),
                                    adapter.dtype)
                    p.add_(step.to(adapter.dtype))
                    new = round_to(old + step, adapter.dtype)  # one correctly rounded sum, as the model's add
                adapter.tensors[key][short] = new
        adapter.on_grid = False

    @precondition(lambda self: not self.merged)
    @rule(which=st.integers(0, 5), seed=st.integers(0, 99))
    def replace_parameters(self, which, seed):
        """``torch.nn.utils.vector_to_parameters``: each parameter's ``.data`` becomes a view of a new vector."""
        self.counts["replace_parameters"] += 1
        name = self.pick(which)
        adapter = self.adapters[name]
        entries = self.trainable_tensors(name)
        params = [p for *_, p in entries]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            vec = parameters_to_vector(params).double()
            vec = round_to(vec + 0.1 * vec.abs().max() * torch.randn(vec.shape, generator=gen, dtype=torch.float64),
                           adapter.dtype)
            vector_to_parameters(vec.to(adapter.dtype), params)
        start = 0
        for key, short, p in entries:
            adapter.tensors[key][short] = vec[start:start + p.numel()].view(p.shape).clone()
            start += p.numel()
        adapter.on_grid = False
        if "param_replacement" in self.known_bugs:
            self.drop_cached_factors()

    @rule(which=st.integers(0, 5))
    def set_adapter(self, which):
        self.counts["set_adapter"] += 1
        name = self.pick(which)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.set_adapter(name)  # merged: peft unmerges first (with a warning)
        if self.merged:
            self.after_unmerge()
        self.active = name

    @precondition(lambda self: not self.merged and len(self.adapters) > 1)
    @rule(which=st.integers(0, 5))
    def delete_adapter(self, which):
        names = [name for name in self.adapters if name != self.active]
        if not names:
            return
        self.counts["delete_adapter"] += 1
        name = self.pick(which, names)
        self.model.delete_adapter(name)
        del self.adapters[name]

    @rule(mode=st.sampled_from(["grad", "no_grad", "inference"]))
    def disabled_forward(self, mode):
        self.counts["disabled_forward"] += 1
        with self.model.disable_adapter(), self.grad_mode(mode):
            logits = self.model(self.ids).logits
        if self.merged:  # a disabled layer unmerges before its forward (peft's LoRA does the same)
            self.after_unmerge()
        self.check_logits(logits, None, self.ids, f"forward in disable_adapter() under {mode}")

    @rule(dtype=st.sampled_from(sorted(DTYPES)))
    def cast(self, dtype):
        target = DTYPES[dtype]
        if self.stored_basis_gated() and target != torch.float16:
            return
        self.counts[f"cast_{dtype}"] += 1
        getattr(self.model, {"float16": "half", "float32": "float", "float64": "double"}[dtype])()
        self.dtype = target
        self.base_state = {k: round_to(v, target) for k, v in self.base_state.items()}
        if self.merged:
            self.merged_weights = {k: round_to(v, target) for k, v in self.merged_weights.items()}
        for adapter in self.adapters.values():
            adapter.dtype = target
            adapter.on_grid = adapter.on_grid and target != torch.float16
            for tensors in adapter.tensors.values():
                for short in tensors:
                    tensors[short] = round_to(tensors[short], target)
        if "dtype_roundtrip" in self.known_bugs:
            self.drop_cached_factors()

    @rule(training=st.booleans())
    def train_or_eval(self, training):
        self.counts["train_or_eval"] += 1
        self.model.train(training)
        self.training = training

    @rule(mode=st.sampled_from(["grad", "no_grad", "inference"]), layer=st.integers(0, 3), mixed=st.booleans())
    def interrupted_forward(self, mode, layer, mixed):
        """Ctrl-C during a forward: a hook raises ``KeyboardInterrupt`` in an adapted layer; the session goes on."""
        self.counts["interrupted_forward"] += 1
        target = self.layers()[layer % len(self.layers())]

        def interrupt(*args):
            raise KeyboardInterrupt

        handle = target.register_forward_hook(interrupt)
        ids, kwargs = self.ids, {}
        if mixed and not self.training and not self.merged and not (
                mode == "grad" and "inference_layout_cache" in self.known_bugs):
            kwargs["adapter_names"] = self.layout([0, 1, 2], 1)
            ids = torch.randint(1, VOCAB, (len(kwargs["adapter_names"]), 5), generator=torch.Generator().manual_seed(5))
        try:
            with self.grad_mode(mode), pytest.raises(KeyboardInterrupt):
                self.model(ids, **kwargs)
        finally:
            handle.remove()

    @precondition(lambda self: not self.merged and self.method == "nola")
    @rule(which=st.integers(0, 5), bits=st.integers(2, 8))
    def quantize(self, which, bits):
        self.counts["quantize"] += 1
        name = self.pick(which)
        adapter = self.adapters[name]
        report = peft_nola.quantize_coefficients(self.model, bits, adapter_name=name)
        assert report["bits"] == bits
        for key, short, p in self.trainable_tensors(name):
            old, new = adapter.tensors[key][short], p.detach().double()
            assert len(torch.unique(new)) <= 2**bits, f"{key} {short}: more than 2**{bits} values after quantizing"
            step = (old.max().clamp(min=0) - old.min().clamp(max=0)) / (2**bits - 1)
            slack = 2 * float(old.abs().max()) * torch.finfo(adapter.dtype).eps
            assert float((new - old).abs().max()) <= float(step) / 2 * (1 + 2**-14) + slack, f"{key} {short} moved"
            adapter.tensors[key][short] = new.clone()
        adapter.bits, adapter.on_grid = bits, adapter.dtype != torch.float16  # float16 rounds the grid values again

    @precondition(lambda self: not self.merged)
    @rule()
    def merge(self):
        self.counts["merge"] += 1
        self.model.merge_adapter()
        self.merged, self.merged_name = True, self.active
        adapter = self.adapters[self.active]
        # The merged weights are W + ΔW up to one rounding in the model's dtype; the mirror then holds them as they
        # are, so that casts round the same values.
        state = self.model.get_base_model().state_dict()
        self.merged_weights = {}
        with torch.no_grad():
            for key in self.reference.targets:
                delta = self.reference.delta(adapter.spec, adapter.tensors, key)
                expected = self.base_state[f"{key}.weight"] + (delta.T if self.kind == "gpt2" else delta)
                actual = state[f"{key}.base_layer.weight"].double()
                error, scale = float((actual - expected).abs().max()), float(expected.abs().max() + delta.abs().max())
                kind = f"merge {str(self.dtype).removeprefix('torch.')}"
                WORST[kind] = max(WORST[kind], error / scale)
                assert error <= UNMERGE_RTOL[self.dtype] * scale, (
                    f"merged weight of {key} is off by {error:.3e}, {error / scale:.2e} of max |W| + max |ΔW| "
                    f"({self.describe()})")
                self.merged_weights[f"{key}.weight"] = actual.clone()

    @precondition(lambda self: self.merged)
    @rule()
    def unmerge(self):
        self.counts["unmerge"] += 1
        self.model.unmerge_adapter()
        self.after_unmerge()

    # ------------------------------------------------------------------------------------ saving and loading
    @rule(which=st.integers(0, 5), check_load=st.booleans(), inference=st.booleans())
    def save(self, which, check_load, inference):
        """``save_pretrained``; the file holds the mirrored tensors (re-quantized where ``coefficient_bits`` is set),
        and ``PeftModel.from_pretrained`` onto a fresh float64 base reproduces the reference."""
        self.counts["save"] += 1
        name = self.pick(which)
        adapter = self.adapters[name]
        directory = self.tmp / f"save{len(self.saved)}"
        self.model.save_pretrained(directory, selected_adapters=[name])
        directory = directory if name == "default" else directory / name
        saved = adapter.copy()
        file = load_file(directory / "adapter_model.safetensors")
        for key, tensors in saved.tensors.items():
            for short in TRAINABLE:
                stored_key = f"base_model.model.{key}.{TENSOR_NAMES[self.method][short]}"
                if adapter.bits is None:
                    value = file[stored_key].double()
                    assert torch.equal(value, tensors[short]), f"saved {key} {short} differs from the model's"
                else:
                    value = unpack_tensor(file[stored_key], file[stored_key + HEADER_SUFFIX], stored_key).double()
                    if adapter.on_grid:
                        assert torch.equal(value, tensors[short]), f"re-quantized {key} {short} is not the same"
                    tensors[short] = value
        saved.on_grid = True
        self.saved.append((directory, saved, self.base_signature()))
        if check_load:
            self.counts["save_from_pretrained"] += 1
            base = tiny_gpt2() if self.kind == "gpt2" else tiny_llama()
            _no_dropout(base)
            base.double()
            assign(base, self.base_state)
            if self.method == "nora" and self.base_signature() != "original":
                return  # the frozen factors are recomputed from other base weights (see load_adapter)
            # The serving pattern: load and run under inference_mode (gated: "inference_mode_load").
            inference = inference and "inference_mode_load" not in self.known_bugs
            with self.loading(inference):
                loaded = PeftModel.from_pretrained(base, directory).eval()
                with torch.no_grad():
                    logits = loaded(self.ids).logits
                expected = self.reference.logits(self.base_state, saved, self.ids)
            assert_close(logits, expected, OUTPUT_RTOL[torch.float64],
                         "PeftModel.from_pretrained of the saved adapter, float64")

    def base_signature(self) -> str:
        """Whether the adapted base weights are still the original ones (NoRA's frozen factors come from them)."""
        same = all(torch.equal(self.base_state[f"{key}.weight"], self.original_base[f"{key}.weight"])
                   for key in self.reference.targets)
        return "original" if same else f"changed-{self.dtype}"

    def expect_load_outcome(self, saved: Adapter, target: str | None, hotswap: bool = False):
        """``None`` if loading ``saved`` into ``target`` (None: a new name) must succeed, else the error type."""
        if target is not None and self.method == "nola" and saved.spec["basis_seed"] != self.adapters[target].spec[
                "basis_seed"]:
            return ValueError  # another basis: the pinned basis_seed differs
        if target is not None and not hotswap and saved.bits != self.adapters[target].bits:
            return ValueError  # coefficient_bits is pinned: a checkpoint of another configuration
        if self.method == "nora" and self.base_signature() != "original":
            return "maybe"  # NoRA recomputes U, V from the current base weights: refused unless a rounded copy
        return None

    def loading(self, inference: bool):
        return torch.inference_mode() if inference else contextlib.nullcontext()

    @precondition(lambda self: not self.merged)
    @rule(which=st.integers(0, 50), new_name=st.booleans(), into=st.integers(0, 5), trainable=st.booleans(),
          inference=st.booleans())
    def load_adapter(self, which, new_name, into, trainable, inference):
        if not self.saved or (new_name and len(self.adapters) >= 4) or self.stored_basis_gated():
            return
        inference = inference and "inference_mode_load" not in self.known_bugs
        directory, saved, _ = self.saved[which % len(self.saved)]
        if ("pinned_field_missing" in self.known_bugs and not new_name and self.method == "nola"
                and saved.bits is not None and self.adapters[self.pick(into)].bits is None):
            return
        name = next(self.new_names) if new_name else self.pick(into)
        self.counts["load_adapter_new" if new_name else "load_adapter_existing"] += 1
        outcome = self.expect_load_outcome(saved, None if new_name else name)
        try:
            with self.loading(inference), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model.load_adapter(directory, adapter_name=name, is_trainable=trainable)
        except ValueError as error:
            assert outcome is not None, f"load_adapter refused a loadable adapter: {error}"
            self.counts["load_refused"] += 1
            return
        assert outcome in (None, "maybe"), f"load_adapter accepted an adapter it must refuse ({outcome})"
        if not trainable:
            self.training = False  # peft's load_adapter(is_trainable=False) puts the whole model in eval mode
        mirror = saved.copy()
        if self.method == "nora":
            # The frozen factors: recomputed from this model's base weights (a new name), kept (an existing name).
            actual = self.read(name)
            for key, tensors in mirror.tensors.items():
                for short in ("U", "Vt", "C0"):
                    tensors[short] = actual[key][short] if new_name else self.adapters[name].tensors[key][short]
        if not new_name:
            mirror.spec = dict(self.adapters[name].spec)  # the loaded adapter keeps its own config (scale)
            mirror.bits = self.adapters[name].bits
        # peft's load_adapter upcasts the loaded adapter of a float16/bfloat16 model to float32
        # (autocast_adapter_dtype=True), a new one or an existing one
        # (after loading: the values of an existing adapter are first written into its float16 tensors, then upcast)
        via = self.adapters[name].dtype if not new_name else torch.float64
        mirror.dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        for tensors in mirror.tensors.values():
            for short in tensors:
                tensors[short] = round_to(round_to(tensors[short], via), mirror.dtype)
        self.adapters[name] = mirror

    @rule(which=st.integers(0, 50), into=st.integers(0, 5), inference=st.booleans())
    def hotswap(self, which, into, inference):
        if not self.saved:
            return
        inference = inference and "inference_mode_load" not in self.known_bugs
        directory, saved, _ = self.saved[which % len(self.saved)]
        name = self.pick(into)
        self.counts["hotswap"] += 1
        # the merged adapter (the active one) is refused; another may be hotswapped while it is merged
        merged = self.merged and name == self.active
        outcome = ValueError if merged else self.expect_load_outcome(saved, name, hotswap=True)
        before = self.read(name)
        try:
            with self.loading(inference), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_nola.hotswap_adapter(self.model, str(directory), adapter_name=name)
        except ValueError as error:
            assert outcome is not None, f"hotswap_adapter refused a compatible adapter: {error}"
            self.counts["hotswap_refused"] += 1
            after = self.read(name)
            assert all(torch.equal(after[k][s], before[k][s]) for k in after for s in after[k]), (
                "a refused hotswap changed the adapter")
            return
        assert outcome in (None, "maybe"), f"hotswap_adapter accepted an adapter it must refuse ({outcome})"
        mirror = self.adapters[name].copy()
        mirror.spec = dict(saved.spec)  # the saved adapter's scale
        for key, tensors in mirror.tensors.items():
            for short in TRAINABLE:
                tensors[short] = round_to(saved.tensors[key][short], mirror.dtype)
        mirror.bits, mirror.on_grid = saved.bits, saved.on_grid and mirror.dtype != torch.float16
        self.adapters[name] = mirror

    # ------------------------------------------------------------------------------------------- mixed batches
    def layout(self, picks: list[int], base_count: int) -> list[str]:
        return [BASE] * base_count + [self.pick(i) for i in picks]

    def order(self, names: list[str], permutation: list[int]) -> list[str]:
        keyed = sorted(range(len(names)), key=lambda i: permutation[i % len(permutation)] * 100 + i)
        return [names[i] for i in keyed]

    @rule(picks=st.lists(st.integers(0, 5), max_size=7), base_count=st.integers(0, 2),
          permutation=st.lists(st.integers(0, 9), min_size=1, max_size=9),
          mode=st.sampled_from(["grad", "no_grad", "inference"]))
    def mixed_batch(self, picks, base_count, permutation, mode):
        names = self.order(self.layout(picks, base_count), permutation)
        if not names:
            return
        if mode == "grad" and "inference_layout_cache" in self.known_bugs:
            mode = "no_grad"
        self.counts["mixed_batch"] += 1
        ids = torch.randint(1, VOCAB, (len(names), 6), generator=torch.Generator().manual_seed(len(names)))
        if self.training or self.merged:
            with pytest.raises(ValueError), self.grad_mode(mode):
                self.model(ids, adapter_names=names)
            return
        with self.grad_mode(mode):
            logits = self.model(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            self.check_logits(logits[i : i + 1], None if name == BASE else self.adapters[name], ids[i : i + 1],
                              f"mixed batch {names} under {mode}, sample {i}")

    @precondition(lambda self: not self.training and not self.merged)
    @rule(picks=st.lists(st.integers(0, 5), max_size=3), base_count=st.integers(0, 1),
          num_beams=st.sampled_from([1, 2]))
    def generate(self, picks, base_count, num_beams):
        names = self.layout(picks, base_count)
        if not names:
            return
        self.counts["generate"] += 1
        ids = torch.randint(1, VOCAB, (len(names), 4), generator=torch.Generator().manual_seed(11))
        kwargs = dict(max_new_tokens=3, min_new_tokens=3, num_beams=num_beams, do_sample=False, pad_token_id=0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                      **kwargs)
        for i, name in enumerate(names):
            adapter = None if name == BASE else self.adapters[name]
            want = self.reference.generate(self.base_state, adapter, ids[i : i + 1], **kwargs)
            got = out[i : i + 1]
            if not torch.equal(got, want):
                # Only a near tie under the reference may pick another token: the two continuations must have equal
                # reference log-probabilities within the output bound.
                score = [self.sequence_logprob(adapter, seq) for seq in (got, want)]
                assert abs(score[0] - score[1]) <= 10 * OUTPUT_RTOL[self.dtype] * max(1.0, abs(score[1])), (
                    f"generate with adapter_names={names}, num_beams={num_beams}: sample {i} gave {got.tolist()}, "
                    f"the reference {want.tolist()} ({self.describe()})")

    def sequence_logprob(self, adapter, seq: torch.Tensor) -> float:
        with torch.no_grad():
            logits = self.reference.logits(self.base_state, adapter, seq[:, :-1])
        logprobs = F.log_softmax(logits[:, 3:], -1).gather(-1, seq[:, 4:, None])
        return float(logprobs.sum())


def machine_for(method: str, basis_mode: str = "shared", known_bugs=KNOWN_BUGS):
    name = f"{method}-{basis_mode}" if method == "nola" else method
    return type(f"Machine_{name.replace('-', '_')}", (PeftMachine,),
                {"method": method, "basis_mode": basis_mode, "known_bugs": frozenset(known_bugs), "counts_key": name})


MACHINES = [("nola", "shared"), ("nola", "per_layer"), ("nola", "per_layer_cached"), ("nora", "shared")]

#: CI's profile: derandomized (the same sequences on every run), no example database.
#: No shrinking: a failure prints its (at most 20-step) sequence at once; shrinking one took minutes.
FAST = settings(max_examples=10, stateful_step_count=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate])
#: The long profile (-m slow): 10x the sequences, random (a new sample of sessions each run).
SLOW = settings(max_examples=100, stateful_step_count=20, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


def _run(method, basis_mode, profile, label):
    machine = machine_for(method, basis_mode)
    counts = RUN_COUNTS[machine.counts_key]
    counts.clear()
    start = time.perf_counter()
    run_state_machine_as_test(machine, settings=profile)
    report = {"profile": label, "machine": machine.counts_key, "seconds": round(time.perf_counter() - start, 1),
              **dict(sorted(counts.items())), "worst_relative_error": {k: float(f"{v:.2e}") for k, v in WORST.items()}}
    WORST.clear()
    print(json.dumps(report))
    assert counts["sequences"] >= 1 and counts["steps"] >= counts["sequences"]


@pytest.mark.parametrize("method, basis_mode", MACHINES)
def test_random_sessions_match_the_reference(method, basis_mode):
    _run(method, basis_mode, FAST, "fast")


@pytest.mark.slow
@pytest.mark.parametrize("method, basis_mode", MACHINES)
def test_random_sessions_match_the_reference_long(method, basis_mode):
    _run(method, basis_mode, SLOW, "slow")


# ------------------------------------------------------------------------------------------------ the known bugs
# One fixed session per known bug, run with its gate removed. Each fails today (xfail, strict: a fix makes it XPASS
# and fail, as a reminder to remove the name from KNOWN_BUGS, after which the test runs as a plain regression test).


@contextlib.contextmanager
def ungated(bug: str, method: str = "nola", basis_mode: str = "shared", kind: str = "llama"):
    machine = machine_for(method, basis_mode, KNOWN_BUGS - {bug})()
    try:
        machine.build(kind=kind)
        machine.outputs_match_reference()
        yield machine
    finally:
        machine.teardown()


def test_interrupt_of_issue_23_leaves_no_stale_factors():
    with ungated("interrupt") as machine:
        machine.interrupted_forward(mode="no_grad", layer=0, mixed=False)
        machine.outputs_match_reference()  # factors of this forward stay cached: the span never ended
        machine.edit_in_place(which=0, op="double", seed=0)
        machine.outputs_match_reference()


@pytest.mark.parametrize("method, basis_mode", MACHINES)
def test_dtype_roundtrip_sequence_of_issue_23(method, basis_mode):
    # The issue's sequence for "dtype_roundtrip" (cached float32 factors, .half(), .float(), a forward): it depends on
    # the allocator reusing the freed storage, which did not happen here in 10 of 10 tries, so it is a plain test
    # (the gate stays while the cache's validity rule is storage addresses: a reuse in CI would be a flaky failure).
    # Run on the per-layer basis, without the stored-basis bug below.
    with ungated("dtype_roundtrip", method, "per_layer" if method == "nola" else basis_mode) as machine:
        machine.forward(mode="no_grad", rows=3)  # caches the float32 factors
        machine.cast(dtype="float16")
        machine.cast(dtype="float32")
        machine.forward(mode="no_grad", rows=3)


@pytest.mark.xfail("basis_store_dtype" in KNOWN_BUGS, strict=True, raises=AssertionError,
                   reason="found here: NOLA's stored basis keeps its float16 rounding after .half().float()")
@pytest.mark.parametrize("basis_mode", ["shared", "per_layer_cached"])
def test_known_bug_stored_basis_keeps_float16_rounding(basis_mode):
    with ungated("basis_store_dtype", "nola", basis_mode) as machine:
        machine.forward(mode="grad", rows=1)  # generates and stores the float32 basis
        machine.cast(dtype="float16")
        machine.cast(dtype="float32")
        machine.outputs_match_reference()  # no factor cache involved: a forward with gradients


@pytest.mark.xfail("param_replacement" in KNOWN_BUGS, strict=True, raises=AssertionError,
                   reason="issue 23: parameters replaced twice with no forward between serve stale cached factors")
def test_known_bug_parameters_replaced_twice_serve_stale_factors():
    with ungated("param_replacement") as machine:
        # Storage reuse is up to the allocator: the issue saw it in 6 of 20 tries, so the sequence is repeated.
        for seed in range(0, 40, 2):
            machine.forward(mode="no_grad", rows=3)
            machine.replace_parameters(which=0, seed=seed)
            machine.replace_parameters(which=0, seed=seed + 1)
            machine.forward(mode="no_grad", rows=3)


@pytest.mark.xfail("inference_mode_load" in KNOWN_BUGS, strict=True, raises=RuntimeError,
                   reason="issue 23: an adapter loaded under torch.inference_mode() breaks the next forward")
def test_known_bug_loading_under_inference_mode():
    with ungated("inference_mode_load") as machine:
        machine.save(which=0, check_load=True, inference=True)


def test_mixed_batch_with_unequal_segments_of_issue_23():
    with ungated("unequal_segments") as machine:
        machine.mixed_batch(picks=[0] * 5 + [1] * 4, base_count=0, permutation=[0], mode="no_grad")


@pytest.mark.xfail("basis_store_dtype" in KNOWN_BUGS, strict=True, raises=RuntimeError,
                   reason="found here: a float32 adapter loaded into a float16 NOLA model meets a float16 stored basis")
@pytest.mark.parametrize("basis_mode", ["shared", "per_layer_cached"])
def test_known_bug_adapter_loaded_into_a_float16_model_crashes(basis_mode):
    with ungated("basis_store_dtype", "nola", basis_mode) as machine:
        machine.forward(mode="grad", rows=1)  # generates and stores the float32 basis
        machine.save(which=0, check_load=False, inference=False)
        machine.cast(dtype="float16")
        machine.load_adapter(which=0, new_name=True, into=0, trainable=False, inference=False)
        machine.set_adapter(which=1)  # "default", "loaded0", "other": the new adapter
        machine.outputs_match_reference()


@pytest.mark.xfail("inference_layout_cache" in KNOWN_BUGS, strict=True, raises=RuntimeError,
                   reason="found here: a mixed batch under inference_mode caches inference index tensors per process")
def test_known_bug_mixed_batch_layout_cached_under_inference_mode():
    clear_layout_cache()  # a layout cached earlier (outside inference mode) would hide the bug
    try:
        with ungated("inference_layout_cache") as machine:
            # "__base__", "other", "default": a layout whose index tensors are not identities
            machine.mixed_batch(picks=[1, 0], base_count=1, permutation=[0], mode="inference")
            machine.mixed_batch(picks=[1, 0], base_count=1, permutation=[0], mode="grad")
    finally:
        clear_layout_cache()  # the inference tensors cached here would break other tests' mixed batches


@pytest.mark.xfail("pinned_field_missing" in KNOWN_BUGS, strict=True, raises=KeyError,
                   reason="found here: load_adapter onto an existing name with coefficient_bits on one side only")
def test_known_bug_load_into_existing_adapter_with_other_quantization():
    with ungated("pinned_field_missing") as machine:
        machine.save(which=0, check_load=False, inference=False)  # "default", unquantized
        machine.load_adapter(which=0, new_name=True, into=0, trainable=False, inference=False)  # as "loaded0"
        machine.quantize(which=0, bits=4)  # "default" now has coefficient_bits=4
        machine.save(which=0, check_load=False, inference=False)
        # the quantized checkpoint into the unquantized "loaded0": must be refused (coefficient_bits is pinned)
        machine.load_adapter(which=1, new_name=False, into=1, trainable=False, inference=False)
