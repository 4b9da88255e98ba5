"""Reading adapter files without trusting them: regular files only (no FIFO, device or dangling link), bounded
sizes, strict JSON, and safetensors headers validated against the file's size before any tensor data is read.

Everything here raises :class:`AdapterFileError` naming the file and what to do; memory stays bounded whatever a
file declares. :func:`peft_nola.checks.check_adapter_dir` is the entry point that uses it.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import AdapterFileError

#: An adapter_config.json is a few KB; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20
#: safetensors headers hold a few hundred bytes per tensor (safetensors itself allows up to 100 MB).
MAX_HEADER_BYTES = 16 << 20
#: JSON nesting deeper than any config or header needs (and far below Python's recursion limit).
MAX_JSON_DEPTH = 32
#: Digits of a JSON integer (a tensor dimension or byte offset of 10**30 is already absurd).
MAX_INT_DIGITS = 30


def check_config_writable(config_dict: dict) -> None:
    """Raise ``ValueError`` naming the field when ``config_dict`` (what ``adapter_config.json`` would hold) breaks a
    bound the loader enforces (:data:`MAX_CONFIG_BYTES`, :data:`MAX_INT_DIGITS`): run before a save writes anything,
    so that no save produces a directory the loader refuses."""

    def walk(name, value):
        if isinstance(value, int) and not isinstance(value, bool) and len(str(abs(value))) > MAX_INT_DIGITS:
            raise ValueError(f"{name} = {value} has more than {MAX_INT_DIGITS} digits, which adapter loading refuses "
                             f"(a JSON integer that large is not a real setting); use a smaller value")
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{name}[{key!r}]", item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(f"{name}[...]", item)

    for key, value in config_dict.items():
        walk(key, value)
    import json

    size = len(json.dumps(config_dict, default=str).encode())
    if size > MAX_CONFIG_BYTES:
        largest = max(config_dict, key=lambda k: len(json.dumps(config_dict[k], default=str)))
        raise ValueError(
            f"adapter_config.json would take {size} bytes, more than the {MAX_CONFIG_BYTES} that adapter loading "
            f"accepts; its largest field is {largest!r}. Shorten it (e.g. set model.name_or_path / "
            f"config.base_model_name_or_path to a short name or path) before saving."
        )


#: Bytes read at a time when hashing and scanning tensor data: memory stays bounded whatever the file declares.
CHUNK_BYTES = 1 << 22

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_SIZES = {name: dtype.itemsize for name, dtype in _DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it: dtype name (``"F32"``), shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


# ------------------------------------------------------------------------------------------- files and JSON


def _require_directory(path: Path) -> None:
    try:
        info = os.stat(path)
    except OSError as error:
        raise AdapterFileError(f"{path} cannot be opened as an adapter directory ({error.strerror or error})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise AdapterFileError(f"{path} is not a directory: pass the folder that model.save_pretrained(dir) wrote")


def _exists(path: Path) -> bool:
    """Whether anything, even a dangling link or an unreadable entry, is at ``path``."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def open_regular_file(path: Path, what: str):
    """Open ``path`` for reading if it is a regular file (symbolic links to one are fine), else raise
    :class:`AdapterFileError` saying what it is. Never blocks: a FIFO is refused before it is opened, and the open
    itself is non-blocking in case one is swapped in meanwhile."""
    try:
        info = os.stat(path)
    except OSError as error:
        reason = "a dangling symbolic link" if os.path.islink(path) and isinstance(error, FileNotFoundError) else (
            error.strerror or str(error))
        raise AdapterFileError(f"the {what} {path} cannot be read ({reason}); restore the file") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise AdapterFileError(f"the {what} {path} is {kind}, not a regular file; put the saved file there")
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise AdapterFileError(f"the {what} {path} cannot be opened ({error.strerror or error}); check its "
                               f"permissions") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise AdapterFileError(f"the {what} {path} was replaced by something that is not a regular file")
    return os.fdopen(descriptor, "rb")


def read_regular_file(path: Path, max_bytes: int, what: str) -> Optional[bytes]:
    """The bytes of the regular file ``path`` (``None`` if nothing is there), refusing files over ``max_bytes``."""
    if not _exists(path):
        return None
    with open_regular_file(path, what) as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as error:
            raise AdapterFileError(f"the {what} {path} cannot be read ({error.strerror or error})") from None
    if len(data) > max_bytes:
        raise AdapterFileError(f"the {what} {path} is larger than {max_bytes} bytes; it is not a saved adapter file")
    return data


class _JsonLimit(Exception):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _JsonLimit(f"an integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonLimit(f"the number {text[:40]} (not finite in float64)")
    return value


def _parse_constant(text: str):
    raise _JsonLimit(f"{text}, which is not JSON")


def strict_json(data: bytes, path: Path, what: str) -> Any:
    """Parse ``data`` as UTF-8 JSON with bounded nesting, integer length and only finite numbers (Python's ``json``
    accepts ``NaN``/``Infinity`` and integers of any length, and crashes with ``RecursionError`` on deep nesting)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterFileError(f"the {what} {path} is not UTF-8 text (byte {error.start}); save the adapter again") \
            from None
    depth = 0
    for char in re.sub(r"[^\[\]{}]+", "", text):  # an upper bound on nesting (brackets in strings count too)
        depth = depth + 1 if char in "[{" else depth - 1
        if depth > MAX_JSON_DEPTH:
            raise AdapterFileError(f"the {what} {path} is nested more than {MAX_JSON_DEPTH} levels deep; it is not "
                                   f"a saved adapter file")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _JsonLimit as error:
        raise AdapterFileError(f"the {what} {path} holds {error}; save the adapter again") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as error:
        raise AdapterFileError(f"the {what} {path} is not valid JSON ({error}); save the adapter again") from None


# -------------------------------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path, handle) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header against its size before any tensor data is read: well-formed JSON of
    bounded size; string metadata; every tensor's dtype known, dimensions non-negative integers, byte range matching
    dtype and shape; tensors covering the data exactly, back to back (as safetensors writes them)."""
    size = os.fstat(handle.fileno()).st_size

    def corrupt(reason: str) -> AdapterFileError:
        return AdapterFileError(f"{path} is truncated or corrupted ({reason}); save the adapter again")

    prefix = handle.read(8)
    if len(prefix) < 8:
        raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
    header_length = int.from_bytes(prefix, "little")
    if header_length > size - 8:
        raise corrupt(f"header of {header_length} bytes announced in a {size}-byte file")
    if header_length > MAX_HEADER_BYTES:
        raise corrupt(f"header of {header_length} bytes, more than {MAX_HEADER_BYTES}")
    try:
        header = strict_json(handle.read(header_length), path, "safetensors header")
    except AdapterFileError as error:
        raise corrupt(f"unreadable header: {error}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise corrupt("__metadata__ is not a mapping of strings")
    data_size, entries = size - 8 - header_length, {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"malformed entry for tensor '{name}'")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if (
            not isinstance(dtype, str) or dtype not in _DTYPE_SIZES
            or not isinstance(shape, list) or not all(_is_count(d) for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
        ):
            raise corrupt(f"malformed entry for tensor '{name}': dtype {dtype!r}, shape {shape!r}, offsets {offsets!r}")
        start, stop = offsets
        if stop - start != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise corrupt(f"tensor '{name}' claims bytes {start}:{stop} for shape {shape}")
        entries[name] = TensorEntry(dtype, tuple(shape), start, stop)
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].stop)):
        if entry.start != position:
            raise corrupt(f"tensor '{name}' starts at byte {entry.start}, expected {position}")
        position = entry.stop
    if position != data_size:
        raise corrupt(f"the tensors cover {position} of {data_size} data bytes")
    return entries


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_small_tensor(path: Path, handle, entries: dict[str, TensorEntry], key: str) -> torch.Tensor:
    """One tensor of at most 1 MiB (a method's header or scale tensors), read from the open weights file."""
    entry = entries[key]
    if entry.stop - entry.start > 1 << 20:
        raise AdapterFileError(f"'{key}' in {path} holds {entry.stop - entry.start} bytes, more than such a tensor has")
    data_start = 8 + int.from_bytes(_pread(handle, 0, 8), "little")
    data = bytearray(_pread(handle, data_start + entry.start, entry.stop - entry.start))
    return torch.frombuffer(data, dtype=_DTYPES[entry.dtype]).reshape(entry.shape) if data else torch.zeros(entry.shape)


def _pread(handle, offset: int, length: int) -> bytes:
    data = os.pread(handle.fileno(), length, offset)
    if len(data) != length:
        raise AdapterFileError(f"{handle.name} changed size while being read; load it again")
    return data
