"""Seeded pseudo-random basis matrices that regenerate bit-identically anywhere.

NOLA stores an adapter as a seed plus coefficients, so the basis must come back exactly the same on CPU and CUDA, at
any thread count, in any process and with any torch release. torch's own seeded RNGs do not promise that (their
algorithms differ between devices and versions), which is why PEFT's VeRA stores its random matrices by default.
Here every number is a pure function of ``(seed, stream name, index)``:

* ``(seed, stream)`` is hashed with SHA-256 (Python's hashlib, identical everywhere) into three 32-bit keys;
* each element index is mixed with the keys through three rounds of a 32-bit integer hash ("lowbias32",
  C. Wellons), computed on the CPU with numpy's uint32 arithmetic (wrapping multiplication is defined for unsigned
  integers), on CUDA with Triton's uint32 arithmetic (:mod:`peft_nola.kernels`) and elsewhere with int64 torch ops
  whose intermediate values never exceed 2**49, so there is no overflow and nothing depends on the device
  (tests/test_basis.py and tests/test_kernels.py check each against a pure-Python reference);
* the top 24 bits become the odd integer ``2u + 1 - 2**24``, which times ``2**-24`` is an exactly representable
  float32 in (-1, 1): the distribution is uniform on (-1, 1), symmetric, mean 0, variance 1/3.

A basis for ``num_basis`` matrices of ``numel`` elements each is the ``(num_basis, numel)`` float32 tensor of
elements ``index = row * numel + col`` multiplied by ``1 / sqrt(num_basis)`` (one correctly rounded float32
multiply), the scale used by the NOLA authors' code. Any block of rows can be generated on its own and equals the
same rows of the whole basis bit for bit, which is what chunked on-the-fly generation relies on.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import torch

from . import kernels

#: Part of every key: changing the algorithm must change this, so old adapters fail their fingerprint check loudly.
GENERATOR_VERSION = "peft-nola-basis-v1"

_MASK32 = 0xFFFFFFFF
_MIX_CONSTANTS = (0x7FEB352D, 0x846CA68B)


def stream_keys(seed: int, stream: str) -> tuple[int, int, int]:
    """The three 32-bit keys of the stream ``(seed, stream)``."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}|{int(seed)}|{stream}".encode()).digest()
    return tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(3))


def _mul32_int64_(x: torch.Tensor, constant: int) -> torch.Tensor:
    """In place: ``x = (x * constant) mod 2**32`` for int64 ``x`` in [0, 2**32); no intermediate exceeds 2**49."""
    high_part = x * (constant >> 16)
    high_part &= 0xFFFF
    high_part <<= 16
    x *= constant & 0xFFFF
    x += high_part
    x &= _MASK32
    return x


def _mul32_uint32_(x: np.ndarray, constant: int) -> np.ndarray:
    """In place: ``x = (x * constant) mod 2**32`` for uint32 ``x`` (unsigned arithmetic wraps by definition)."""
    x *= np.uint32(constant)
    return x


def _mix32_(x, mul32_):
    """In place: the lowbias32 integer hash of each element (a bijection of [0, 2**32))."""
    x ^= x >> 16
    mul32_(x, _MIX_CONSTANTS[0])
    x ^= x >> 15
    mul32_(x, _MIX_CONSTANTS[1])
    x ^= x >> 16
    return x


def _hash(h, high_word, keys, mul32_):
    """In place on the low words ``h`` of the indices: the three keyed rounds, then the top 24 bits."""
    h ^= keys[0]
    _mix32_(h, mul32_)
    h ^= high_word
    _mix32_(h, mul32_)
    h ^= keys[2]
    _mix32_(h, mul32_)
    h >>= 8
    return h


def _unit_float_(top24):
    """In place on float32 ``u`` in [0, 2**24): ``(2u + 1 - 2**24) * 2**-24``, each step exact in float32."""
    top24 *= 2.0**-23
    top24 += 2.0**-24 - 1  # 1 - 2**-24 has 24 significant bits, and every sum is representable: no rounding
    return top24


def _uniform_numpy(keys: tuple[int, int, int], start: int, count: int) -> torch.Tensor:
    # On the CPU: numpy's uint32 arithmetic, several times faster than the int64 emulation (half the bytes, a native
    # multiply).
    # The high word of the index is constant within each 2**32 block of indices.
    out = np.empty(count, dtype=np.float32)
    pos = start
    while pos < start + count:
        end = min(start + count, ((pos >> 32) + 1) << 32)
        low = pos & _MASK32
        h = np.arange(low, low + (end - pos), dtype=np.uint32)
        high_word = np.uint32(((pos >> 32) + keys[1]) & _MASK32)
        _hash(h, high_word, tuple(np.uint32(k) for k in keys), _mul32_uint32_)
        out[pos - start : end - start] = h
        pos = end
    return torch.from_numpy(_unit_float_(out))


def _uniform_torch(keys: tuple[int, int, int], start: int, count: int, device) -> torch.Tensor:
    # Elsewhere (CUDA without Triton, other devices): int64 torch ops on values below 2**32, whose intermediates never
    # exceed 2**49.
    h = torch.arange(start, start + count, dtype=torch.int64, device=device)
    high_word = h >> 32
    high_word += keys[1]
    high_word &= _MASK32
    h &= _MASK32
    return _unit_float_(_hash(h, high_word, keys, _mul32_int64_).to(torch.float32))


def uniform_stream(
    seed: int, stream: str, start: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of the stream ``(seed, stream)``.

    Returns:
        float32 tensor of shape ``(count,)``, uniform on (-1, 1), on ``device``.
    """
    if start < 0 or count < 0 or start + count > 2**62:
        raise ValueError(f"stream indices must lie in [0, 2**62), got start={start}, count={count}")
    keys = stream_keys(seed, stream)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cpu":
        return _uniform_numpy(keys, start, count)
    if kernels.available(device):
        return kernels.uniform(keys, start, count, device)
    return _uniform_torch(keys, start, count, device)


def basis_rows(
    seed: int,
    stream: str,
    num_basis: int,
    numel: int,
    row_start: int = 0,
    row_end: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rows ``row_start:row_end`` of the ``(num_basis, numel)`` basis of stream ``(seed, stream)``.

    Each row is one basis matrix, flattened. Values are uniform on (-1, 1) times ``1 / sqrt(num_basis)``.

    Returns:
        float32 tensor of shape ``(row_end - row_start, numel)``.
    """
    row_end = num_basis if row_end is None else row_end
    if not 0 <= row_start <= row_end <= num_basis:
        raise ValueError(f"rows {row_start}:{row_end} are outside a basis of {num_basis} matrices")
    values = uniform_stream(seed, stream, row_start * numel, (row_end - row_start) * numel, device=device)
    return values.mul_(basis_scale(num_basis)).view(row_end - row_start, numel)


def basis_scale(num_basis: int) -> float:
    """``1 / sqrt(num_basis)`` rounded to float32 once, as a Python number.

    The same bits as a float32 tensor scale on any device, without creating a device tensor (a host-to-device copy
    that would synchronise a CUDA stream for every chunk).
    """
    return struct.unpack("f", struct.pack("f", 1.0 / math.sqrt(num_basis)))[0]


def generator_fingerprint(seed: int) -> str:
    """A short hash of a probe of the generator's output for ``seed``.

    Equal on every machine whose torch integer arithmetic behaves as specified; a mismatch on load means the basis
    would not be the one the adapter was trained with.
    """
    probe = uniform_stream(seed, "fingerprint-probe", 0, 4096, device="cpu")
    return hashlib.sha256(probe.numpy().tobytes()).hexdigest()[:16]


def layout_fingerprint(entries: list) -> str:
    """A short hash of the adapted layers' layout (names, shapes, slices), JSON-serialisable ``entries``."""
    text = json.dumps(sorted(entries), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
