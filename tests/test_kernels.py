"""The Triton kernels (peft_nola.kernels) against the generator's definition and the torch path.

With a GPU they run on CUDA. Without one, tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports
Triton, and they run in Triton's interpreter on CPU tensors: the same kernel code, types and integer semantics, with
numpy doing the arithmetic.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

pytest.importorskip("triton", reason="Triton is not installed (pip install triton; CUDA builds of torch bring it)")

from peft_nola import GPT2_QV_SLICES, NolaConfig, NolaLayer, kernels  # noqa: E402
from peft_nola.basis import basis_rows, basis_scale, stream_keys, uniform_stream  # noqa: E402

from .conftest import tiny_gpt2  # noqa: E402
from .test_basis import reference_uniform  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

# Sizes that are not multiples of the kernels' tiles (32 basis rows, 128 columns), so that every edge is masked.
NUM_BASIS, NUMEL, STREAMS = 70, 300, ("A/h.0/0", "A/h.0/2", "B/h.1/0")


def keys_on_device(seed, streams):
    return kernels.keys_tensor([stream_keys(seed, stream) for stream in streams], DEVICE)


def bases(seed):
    return [basis_rows(seed, stream, NUM_BASIS, NUMEL) for stream in STREAMS]


@pytest.mark.parametrize("start, count", [(0, 5_000), (2**32 - 300, 1_000), (7 * 2**32 + 5, 3_000), (2**61, 64)])
def test_generated_values_equal_the_reference_exactly(start, count):
    # Ranges below, across and far above the index's 2**32 boundary, where the high word of the index changes.
    values = kernels.uniform(stream_keys(3, "s"), start, count, DEVICE).cpu()
    assert torch.equal(values, uniform_stream(3, "s", start, count))  # numpy on the CPU
    picks = [0, count // 2, count - 1]
    assert values[picks].tolist() == [reference_uniform(3, "s", start + i) for i in picks]


def test_one_hot_coefficients_give_the_basis_rows_exactly():
    # Σ_i coef_i · basis_i with a single 1 is that basis row: every generated value and its scale are bit-identical.
    coef = torch.zeros(len(STREAMS), NUM_BASIS)
    picks = [4, 69, 0]  # the first, a middle and the last (masked) tile of basis rows
    for s, i in enumerate(picks):
        coef[s, i] = 1
    out = kernels.combine(coef.to(DEVICE), keys_on_device(5, STREAMS), NUMEL, basis_scale(NUM_BASIS)).cpu()
    for s, (basis, i) in enumerate(zip(bases(5), picks)):
        assert torch.equal(out[s], basis[i])


def test_one_hot_gradients_give_the_basis_columns_exactly():
    grad = torch.zeros(len(STREAMS), NUMEL)
    picks = [7, 299, 128]
    for s, j in enumerate(picks):
        grad[s, j] = 1
    out = kernels.combine_grad(grad.to(DEVICE), keys_on_device(5, STREAMS), NUM_BASIS, basis_scale(NUM_BASIS)).cpu()
    for s, (basis, j) in enumerate(zip(bases(5), picks)):
        assert torch.equal(out[s], basis[:, j])


def test_combinations_match_the_definition():
    generator = torch.Generator().manual_seed(0)
    coef = torch.randn(len(STREAMS), NUM_BASIS, generator=generator)
    grad = torch.randn(len(STREAMS), NUMEL, generator=generator)
    keys = keys_on_device(9, STREAMS)
    out = kernels.combine(coef.to(DEVICE), keys, NUMEL, basis_scale(NUM_BASIS)).cpu()
    grad_coef = kernels.combine_grad(grad.to(DEVICE), keys, NUM_BASIS, basis_scale(NUM_BASIS)).cpu()
    for s, basis in enumerate(bases(9)):
        basis = basis.double()
        torch.testing.assert_close(out[s].double(), coef[s].double() @ basis, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_coef[s].double(), basis @ grad[s].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE.type == "cpu", reason="Triton's interpreter truncates float32 -> bfloat16 casts (a GPU "
                    "rounds to nearest, as torch does), so it cannot reproduce the torch path's bfloat16 basis")
def test_bfloat16_coefficients_use_the_basis_in_bfloat16():
    coef = torch.randn(len(STREAMS), NUM_BASIS, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = kernels.combine(coef.to(DEVICE), keys_on_device(2, STREAMS), NUMEL, basis_scale(NUM_BASIS)).cpu()
    assert out.dtype == torch.bfloat16
    for s, basis in enumerate(bases(2)):
        # what the torch path computes: the basis cast to bfloat16, products summed in float32
        expected = coef[s].double() @ basis.bfloat16().double()
        torch.testing.assert_close(out[s].double(), expected, rtol=2**-8, atol=1e-4)  # one bfloat16 rounding


def test_on_the_fly_mode_through_the_kernels_equals_the_torch_path(monkeypatch):
    # The whole model: every per-layer basis stream of a step in one fused launch (forward) and one (backward),
    # against the chunked torch path, outputs and coefficient gradients.
    config = dict(r=4, num_basis_A=48, num_basis_B=40, init_weights=False, basis_mode="per_layer",
                  target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True)
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(3), device=DEVICE)
    results = []
    launches = []
    combine = kernels.combine
    monkeypatch.setattr(kernels, "combine", lambda *args: launches.append(tuple(args[0].shape)) or combine(*args))
    for fused in (False, True):
        monkeypatch.setattr(kernels, "available", lambda device: fused)
        model = get_peft_model(tiny_gpt2(n_embd=64).to(DEVICE), NolaConfig(**config))
        out = model(ids, labels=ids)
        out.loss.backward()
        layers = [m for m in model.modules() if isinstance(m, NolaLayer)]
        grads = [torch.cat([layer.nola_coef_A["default"].grad.flatten(), layer.nola_coef_B["default"].grad.flatten()])
                 for layer in layers]
        results.append((out.logits.detach().cpu(), torch.cat(grads).cpu()))
    assert launches == [(4, 48), (4, 40)]  # 2 layers x q, v: one launch for every A, one for every B
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_the_kernels_serve_cuda_only_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("PEFT_NOLA_DISABLE_TRITON", raising=False)
    assert kernels.available(torch.device("cuda")) and not kernels.available(torch.device("cpu"))
    monkeypatch.setenv("PEFT_NOLA_DISABLE_TRITON", "1")
    assert not kernels.available(torch.device("cuda"))


# Compiles the kernels with Triton's CUDA backend for an H100 (sm_90), which needs no GPU: Triton lowers them to PTX
# and its bundled ptxas assembles the cubin. Run without TRITON_INTERPRET, in a process of its own.
COMPILE_FOR_H100 = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peft_nola import kernels

def compile(fn, signature, constants):
    # every kernel takes its compile-time constants last
    source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs={(len(signature) + i,): v for i, v in enumerate(constants.values())})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm

keys = {"keys_ptr": "*i64"}
jobs = {
    "uniform": (kernels._uniform_kernel, {"out_ptr": "*fp32", "start": "i64", "count": "i32", "key0": "u32",
                                          "key1": "i32", "key2": "u32"}, {"BLOCK": 1024}),
    "combine fp32": (kernels._combine_kernel, {"coef_ptr": "*fp32", **keys, "out_ptr": "*fp32", "numel": "i32",
                                               "scale": "fp32"}, {"NUM_BASIS": 1000, "BLOCK_K": 32, "BLOCK_N": 128}),
    "combine bf16": (kernels._combine_kernel, {"coef_ptr": "*bf16", **keys, "out_ptr": "*bf16", "numel": "i32",
                                               "scale": "fp32"}, {"NUM_BASIS": 1000, "BLOCK_K": 32, "BLOCK_N": 128}),
    "combine_grad": (kernels._combine_grad_kernel, {"grad_ptr": "*fp32", **keys, "partial_ptr": "*fp32",
                                                    "numel": "i32", "scale": "fp32"},
                     {"NUM_BASIS": 1000, "COLS_PER_SPLIT": 2048, "BLOCK_K": 32, "BLOCK_N": 128}),
}
report = {}
for name, (fn, signature, constants) in jobs.items():
    asm = compile(fn, signature, constants)
    ir = asm["ttir"]
    report[name] = {"cubin_bytes": len(asm["cubin"]),
                    "i32_multiplies": sum("arith.muli" in l and "xi32>" in l for l in ir.splitlines()),
                    "i32_logical_shifts": sum("arith.shrui" in l and "xi32>" in l for l in ir.splitlines()),
                    "i32_arithmetic_shifts": sum("arith.shrsi" in l and "xi32>" in l for l in ir.splitlines())}
print(json.dumps(report))
"""


def test_the_kernels_compile_for_an_h100_with_unsigned_32_bit_hashing():
    # What the interpreter cannot show: the kernels pass Triton's CUDA lowering, and the compiled hash multiplies in
    # 32 bits (wrapping) with logical shifts, as uint32 arithmetic must.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for name, row in report.items():
        assert row["cubin_bytes"] > 0, name
        # three lowbias32 rounds: 2 multiplies and 3 shifts each, and the final >> 8 to the top 24 bits
        assert row["i32_multiplies"] >= 6 and row["i32_logical_shifts"] >= 10, (name, row)
        assert row["i32_arithmetic_shifts"] == 0, (name, row)
