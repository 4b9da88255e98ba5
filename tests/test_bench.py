"""Smoke tests of scripts/bench.py on its smallest shape: output structure and the invariants that can go wrong
(parameter counts and basis sizes against their formulas, file sizes against the files, the target arithmetic)."""

import importlib.util
import json
import struct
import sys

import pytest
from peft import get_peft_model

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench  # dataclasses look their module up by name
spec.loader.exec_module(bench)

SHAPE = "gpt2-micro-qv"
K = L = 16  # basis size: small, and different from every dimension of the shape so no formula passes by accident
RANK, INNER_R = 8, 4


def micro_dimensions() -> tuple[int, int]:
    config = bench.shapes()[SHAPE].config
    return config.n_embd, config.n_layer


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    return bench.main(["--shapes", SHAPE, "--num_basis", str(K), "--rank", str(RANK), "--nora_inner_r", str(INNER_R),
                       "--reps", "2", "--warmup", "0", "--num_adapters", "2", "--skip_memory", "--out", str(out)]), out


def test_step_rows_follow_the_parameter_and_basis_formulas(result):
    result, _ = result
    n, layers = micro_dimensions()
    slices = 2 * layers  # q and v blocks of every c_attn
    rows = {row["method"]: row for row in result["steps"]}
    assert set(rows) == {"lora r=1", "lora r=4", "lora r=8", "nola shared", "nola per_layer", "nola per_layer_cached",
                         f"nora r={RANK}/{INNER_R}", "vera r=256"}
    assert rows[f"lora r={RANK}"]["ratio_vs_lora"] == 1.0  # each round's ratio to itself
    for r in (1, 4, 8):  # LoRA on the whole c_attn: A (r x n) and B (3n x r) per layer
        assert rows[f"lora r={r}"]["trainable_params"] == layers * r * (n + 3 * n)
    for mode in ("shared", "per_layer", "per_layer_cached"):
        assert rows[f"nola {mode}"]["trainable_params"] == slices * (K + L)
    assert rows[f"nora r={RANK}/{INNER_R}"]["trainable_params"] == slices * 2 * RANK * INNER_R
    # One distinct A shape (r x n) and one B shape (n x r) shared by every block; float32.
    assert rows["nola shared"]["basis_bytes"] == 4 * (K * RANK * n + L * n * RANK)
    assert rows["nola per_layer"]["basis_bytes"] == 0
    assert rows["nola per_layer_cached"]["basis_bytes"] == slices * 4 * (K * RANK * n + L * n * RANK)
    # NoRA keeps U (n x r), V^T (r x n) and C0 (r x r) per block.
    assert rows[f"nora r={RANK}/{INNER_R}"]["basis_bytes"] == slices * 4 * (n * RANK + RANK * n + RANK * RANK)
    for row in rows.values():
        assert row["n"] == 2 and row["step_ms"] > 0 and row["ratio_q1"] <= row["ratio_vs_lora"] <= row["ratio_q3"]
        # Every method saves its trainable tensors in float32 and nothing else (VeRA without its projections,
        # NoRA without its outer factors): the file is those bytes plus a header.
        assert 4 * row["trainable_params"] < row["adapter_file_bytes"] < 4 * row["trainable_params"] + 16384


def test_adapter_file_bytes_are_the_saved_file(tmp_path):
    shape = bench.shapes()[SHAPE]
    settings = bench.Settings(rank=RANK, num_basis=K)
    model = get_peft_model(bench.build_base(shape, "cpu"), bench.method_configs(shape, settings)["nola shared"])
    model.save_pretrained(tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_length])
    assert bench.adapter_file_bytes(model) == len(data)
    coefficient_bytes = sum(end - start for key, entry in header.items() if key != "__metadata__"
                            for start, end in [entry["data_offsets"]])
    assert coefficient_bytes == len(data) - 8 - header_length == 4 * 2 * micro_dimensions()[1] * (K + L)


def test_merge_and_switch_rows(result):
    result, _ = result
    merge = {row["what"]: row for row in result["merge"]}
    assert set(merge) == {"lora r=1: load adapter from disk", "lora r=1: materialize every ΔW"} | {
        f"nola {mode}: {what}" for mode in ("shared", "per_layer")
        for what in ("materialize every ΔW (cold)", "materialize every ΔW (warm)", "load adapter from disk")}
    assert all(row["ms"] > 0 and row["n"] >= 1 for row in merge.values())
    assert len(result["merge_verdicts"]) == 4
    assert [(row["method"], row["num_adapters"]) for row in result["switch"]] == [(f"lora r={RANK}", 2),
                                                                                 ("nola shared", 2)]
    assert all(row[key] > 0 for row in result["switch"] for key in
               ("forward_ms", "switch_forward_ms", "merged_switch_forward_ms"))


def test_outputs_written(result):
    result, out = result
    assert json.loads(out.read_text())["steps"] == result["steps"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.with_suffix(".md").read_text()
    assert f"| {SHAPE} | nola shared | {2 * micro_dimensions()[1] * (K + L)} |" in table


def test_memory_child_and_target_arithmetic():
    settings = bench.Settings(rank=RANK, num_basis=K)
    measured = [bench.memory_child(SHAPE, method, settings, steps=1) for method in (f"lora r={RANK}", "nola shared")]
    for row in measured:
        assert row["peak_bytes"] >= row["before_steps_bytes"] > 0
    n, _ = micro_dimensions()
    assert measured[1]["basis_bytes"] == 4 * (K * RANK * n + L * n * RANK)
    # The target is peak <= LoRA's peak * 1.01 + basis: check the verdicts on figures placed either side of it.
    lora_peak, basis = 1000 * 2**20, measured[1]["basis_bytes"]
    limit = int(lora_peak * 1.01) + basis
    rows = [{"shape": SHAPE, "method": m, "ratio_vs_lora": 1.0} for m in (f"lora r={RANK}", "nola shared")]
    memory = [{"shape": SHAPE, "method": f"lora r={RANK}", "peak_bytes": lora_peak, "before_steps_bytes": 0,
               "basis_bytes": 0},
              {"shape": SHAPE, "method": "nola shared", "peak_bytes": limit, "before_steps_bytes": 0,
               "basis_bytes": basis}]
    bench.add_memory_and_targets(rows, memory, settings)
    assert rows[1]["memory_target_met"] is True and rows[1]["peak_minus_lora_bytes"] == limit - lora_peak
    memory[1]["peak_bytes"] = limit + 1
    bench.add_memory_and_targets(rows, memory, settings)
    assert rows[1]["memory_target_met"] is False
    assert rows[1]["step_target_met"] is True and rows[0]["step_target"] is None


@pytest.mark.slow
def test_quick_cli_with_memory_worker(tmp_path):
    """The whole pipeline, including the forked per-method memory processes, on the smallest shape."""
    result = bench.main(["--shapes", SHAPE, "--num_basis", str(K), "--reps", "1", "--warmup", "0",
                         "--merge_shapes", "--mem_steps", "1", "--out", str(tmp_path / "b.json")])
    assert all(row["peak_bytes"] > 0 and row["memory_error"] is None for row in result["steps"])
    assert {row["method"] for row in result["memory"]} == {row["method"] for row in result["steps"]}
