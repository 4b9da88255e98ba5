"""The seeded basis generator: pinned values, an independent pure-Python reference, and its invariances."""

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from peft_nola.basis import (
    GENERATOR_VERSION,
    stream_keys,
    _uniform_torch,
    basis_rows,
    generator_fingerprint,
    uniform_stream,
)


def reference_uniform(seed: int, stream: str, index: int) -> float:
    """The generator's specification, written with Python integers (no torch)."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}|{seed}|{stream}".encode()).digest()
    keys = [int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(3)]

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    h = mix((index & 0xFFFFFFFF) ^ keys[0])
    h = mix(h ^ (((index >> 32) + keys[1]) & 0xFFFFFFFF))
    h = mix(h ^ keys[2])
    return (2 * (h >> 8) + 1 - 2**24) / 2**24


@pytest.mark.parametrize(
    "seed, stream, start",
    [(0, "A/8x1024", 0), (7, "B/h.0.attn.c_attn/2", 123_456), (2**40 + 3, "x", 2**33 - 5), (1, "ü", 2**61)],
)
@pytest.mark.parametrize("backend", ["cpu-numpy", "torch-int64"])
def test_matches_pure_python_reference(seed, stream, start, backend):
    # The CPU generates with numpy's uint32 arithmetic, other devices with torch's int64 ops: both run here.
    if backend == "cpu-numpy":
        values = uniform_stream(seed, stream, start, 64)
    else:
        values = _uniform_torch(stream_keys(seed, stream), start, 64, "cpu")
    expected = torch.tensor([reference_uniform(seed, stream, start + i) for i in range(64)], dtype=torch.float32)
    assert torch.equal(values, expected)


def test_backends_agree_across_the_high_word_boundary():
    # A range that crosses index 2**32 (the high word changes mid-range) and a long one: numpy vs int64 torch.
    for start, count in [(2**32 - 100_000, 300_000), (0, 1_000_000), (5 * 2**32 + 7, 70_000)]:
        keys = stream_keys(9, "boundary")
        assert torch.equal(uniform_stream(9, "boundary", start, count), _uniform_torch(keys, start, count, "cpu"))


def test_pinned_golden_values():
    # Pinned once from the specification; a change here means every saved adapter would silently change.
    values = uniform_stream(0, "golden", 0, 4).tolist()
    assert values == [reference_uniform(0, "golden", i) for i in range(4)]
    assert [v.hex() for v in values] == [
        "-0x1.1005b80000000p-3",
        "-0x1.2a7df80000000p-3",
        "-0x1.a4bb6a0000000p-1",
        "-0x1.29f3de0000000p-1",
    ]
    assert generator_fingerprint(0) == "7c43078084d4e59c"


def test_distribution_is_uniform_on_open_interval():
    values = uniform_stream(3, "stats", 0, 1_000_000).double()
    assert -1 < values.min() and values.max() < 1
    assert abs(values.mean().item()) < 3e-3  # standard error of the mean: sqrt(1/3 / 1e6) = 5.8e-4
    assert abs(values.var().item() - 1 / 3) < 3e-3
    # Each tenth of the interval gets its tenth of the values (binomial sd ~ 300).
    counts = torch.histc(values.float(), bins=10, min=-1, max=1)
    assert (counts - 100_000).abs().max() < 2_000


def test_basis_rows_scale_and_chunks_are_exact():
    full = basis_rows(5, "A/4x16", num_basis=30, numel=64)
    assert full.shape == (30, 64)
    raw = uniform_stream(5, "A/4x16", 0, 30 * 64).view(30, 64)
    assert torch.equal(full, raw * torch.tensor(1 / math.sqrt(30), dtype=torch.float32))
    chunks = torch.cat([basis_rows(5, "A/4x16", 30, 64, start, min(30, start + 7)) for start in range(0, 30, 7)])
    assert torch.equal(chunks, full)


def test_streams_and_seeds_are_independent():
    a = uniform_stream(0, "A", 0, 10_000)
    assert not torch.equal(a, uniform_stream(1, "A", 0, 10_000))
    assert not torch.equal(a, uniform_stream(0, "B", 0, 10_000))
    assert abs(torch.corrcoef(torch.stack([a, uniform_stream(0, "B", 0, 10_000)]))[0, 1]) < 0.05


def test_same_values_in_another_process_at_other_thread_counts():
    here = uniform_stream(11, "threads", 0, 300_000)
    code = (
        "import sys, torch; from peft_nola.basis import uniform_stream\n"
        "for threads in (1, 2):\n"
        "    torch.set_num_threads(threads)\n"
        "    sys.stdout.buffer.write(uniform_stream(11, 'threads', 0, 300_000).numpy().tobytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out == here.numpy().tobytes() * 2


def test_rejects_bad_ranges():
    with pytest.raises(ValueError, match="rows 3:2"):
        basis_rows(0, "A", 5, 4, 3, 2)
    with pytest.raises(ValueError, match="stream indices"):
        uniform_stream(0, "A", -1, 4)
