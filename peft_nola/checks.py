"""Checks on adapter files made before anything is loaded: a bad file is a clear error, never a crash deep in torch or
a silently different model. Adapters are safetensors only; pickle files are refused without being opened."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def check_adapter_dir(path: Path) -> None:
    """Raise ``ValueError`` if the adapter directory's config is not a JSON object, or it holds only a pickle file or a
    truncated/corrupt safetensors file."""
    config = path / "adapter_config.json"
    if config.exists():
        try:
            loaded = json.loads(config.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config} is not valid JSON ({error}); save the adapter again") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config} does not hold a JSON object; save the adapter again")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        pickles = [name for name in PICKLE_NAMES if (path / name).exists()]
        if pickles:
            raise ValueError(
                f"{path / pickles[0]} is a pickle file. peft-nola loads adapters from safetensors only and never "
                f"unpickles a file (unpickling can run arbitrary code). Re-save the adapter where it was made with "
                f"model.save_pretrained(dir), which writes {WEIGHTS_NAME}."
            )
        return
    check_safetensors(weights)


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header against its size: every tensor's byte range must lie in the file and
    match its dtype and shape, and the data must end where the file ends."""
    size = path.stat().st_size

    def corrupt(reason: str) -> ValueError:
        return ValueError(f"{path} is truncated or corrupted ({reason}); save the adapter again")

    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise corrupt(f"header of {header_length} bytes announced in a {size}-byte file")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise corrupt(f"unreadable header: {error}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_size, ranges = size - 8 - header_length, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            itemsize = _DTYPE_SIZES[info["dtype"]]
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"malformed entry for tensor '{name}'") from None
        if not isinstance(start, int) or not isinstance(stop, int) or stop - start != numel * itemsize:
            raise corrupt(f"tensor '{name}' claims bytes {start}:{stop} for shape {info['shape']}")
        ranges.append((start, stop, name))
    position = 0  # safetensors lays tensors out back to back, covering the data exactly
    for start, stop, name in sorted(ranges):
        if start != position:
            raise corrupt(f"tensor '{name}' starts at byte {start}, expected {position}")
        position = stop
    if position != data_size:
        raise corrupt(f"the tensors cover {position} of {data_size} data bytes")


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def check_loaded_tensors(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], prefix: str) -> None:
    """Compare the adapter tensors a checkpoint provides (``loaded``, model keys) with what the model expects.

    Raises ``ValueError`` naming the tensor for: an expected tensor the file lacks (it would silently keep its
    initial value), a tensor of another shape, a tensor with NaN or Inf, or a file tensor of this method that the
    model has no place for (a config that does not belong to the file).
    """
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(
            f"The adapter file lacks {len(missing)} tensor(s) this adapter needs, e.g. '{missing[0]}': the file does "
            f"not belong to its adapter_config.json (or to this model)."
        )
    unexpected = sorted(key for key in loaded if key not in expected and f".{prefix}" in key)
    if unexpected:
        raise ValueError(
            f"The adapter file holds {len(unexpected)} tensor(s) this adapter has no place for, e.g. "
            f"'{unexpected[0]}': the file does not belong to its adapter_config.json (or to this model)."
        )
    for key, target in expected.items():
        tensor = loaded[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"'{key}' in the adapter file has shape {tuple(tensor.shape)}, but this model expects "
                f"{tuple(target.shape)}: the file does not belong to its adapter_config.json (or to this model)."
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"'{key}' in the adapter file contains NaN or Inf values; refusing to load it.")


def tensors_checksum(tensors: dict[str, torch.Tensor], prefix: str) -> str:
    """A short hash of a method's tensors (keys containing ``.<prefix>``) as stored in the adapter file: keys, dtypes,
    shapes and bytes. Recorded in the adapter config on save and checked on load, so that a file whose bytes changed
    is an error rather than a silently different model."""
    digest = hashlib.sha256()
    for key in sorted(k for k in tensors if f".{prefix}" in k):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
