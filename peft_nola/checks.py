"""Checks on adapter files made before anything is loaded: a bad file is a clear error naming the file and what to do,
never a crash deep in torch, a hang, an allocation of terabytes or a silently different model.

:func:`check_adapter_dir` is the one entry point: every load path (``PeftModel.from_pretrained``, ``load_adapter``
onto a new or an existing adapter name, ``AutoPeftModel*``, ``Trainer`` resume) runs it before the first module of
the user's model is replaced or any weight is written. Adapters are safetensors only; pickle files are refused
without being opened.

The checksums here detect corruption and edits made without peft-nola; they are not signatures (anyone can recompute
them), so they do not make an adapter from an untrusted source trustworthy: they make it the adapter its files say.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

#: An adapter_config.json is a few KB; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20
#: safetensors headers hold a few hundred bytes per tensor (safetensors itself allows up to 100 MB).
MAX_HEADER_BYTES = 16 << 20
#: JSON nesting deeper than any config or header needs (and far below Python's recursion limit).
MAX_JSON_DEPTH = 32
#: Digits of a JSON integer (a tensor dimension or byte offset of 10**30 is already absurd).
MAX_INT_DIGITS = 30
#: Bytes read at a time when hashing and scanning tensor data: memory stays bounded whatever the file declares.
CHUNK_BYTES = 1 << 22

CHECKSUM_VERSION = "v2-"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_SIZES = {name: dtype.itemsize for name, dtype in _DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded as the adapter it claims to be. The message names the file, the field or
    tensor, and what to do."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it: dtype name (``"F32"``), shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass
class CheckedAdapter:
    """What :func:`check_adapter_dir` checked: the config built from ``adapter_config.json`` (validated), each tensor
    the weights file declares, and ``digest``: the checksum (this module's current version) of exactly the bytes
    checked, over every tensor and the config's pinned fields. ``tensors`` holds the tensors (file keys) when they
    were asked for."""

    path: Path
    config: Any
    entries: dict[str, TensorEntry]
    digest: str
    own_digest: str
    tensors: Optional[dict[str, torch.Tensor]] = None


# ------------------------------------------------------------------------------------------------ the entry point


def check_adapter_dir(
    path: str | os.PathLike,
    config_cls=None,
    *,
    class_kwargs: Optional[dict] = None,
    read_tensors: bool = False,
) -> CheckedAdapter:
    """Check every file of the adapter directory ``path`` and return what was checked.

    ``config_cls``: the config class the caller expects (``NolaConfig``/``NoraConfig``); ``None`` accepts any peft-nola
    method and picks the class from ``peft_type``. ``class_kwargs``: config fields the caller overrides (peft's
    ``from_pretrained(..., field=value)``). ``read_tensors``: also return the tensors (keys as in the file), read after
    the checks and verified to be the bytes checked.

    Checked, in this order, before anything is allocated in proportion to what the files declare:
    the directory and each file are regular files (no FIFO, device, dangling link or loop), readable, of bounded size;
    ``adapter_config.json`` is UTF-8 JSON of bounded depth and integer size holding an object whose ``peft_type`` is a
    peft-nola method and whose fields pass the config's validation (including regex safety and finite scales);
    the weights file is safetensors (a pickle file is refused unopened) whose header is well formed and whose tensors
    cover its data exactly; every tensor is one this adapter has a place for (its own, or a ``modules_to_save``
    module's), with the shape and dtype its config implies; the pinned config fields match ``config_fingerprint``;
    every tensor's bytes match ``weights_checksum``; no float tensor holds NaN or Inf.

    Raises :class:`AdapterFileError` (a ``ValueError``) naming the file and the problem. Memory stays bounded whatever
    the files declare: tensor data is read in pieces of :data:`CHUNK_BYTES` (all at once only with ``read_tensors``,
    after the checks).
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    path = Path(path)
    _require_directory(path)
    config_path = path / CONFIG_NAME
    raw = read_regular_file(config_path, MAX_CONFIG_BYTES, what="adapter config")
    if raw is None:
        raise AdapterFileError(f"{config_path} does not exist: {path} is not a saved adapter (save it with "
                               f"model.save_pretrained(dir))")
    config = build_config(config_path, raw, config_cls, class_kwargs)
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]

    weights_path = path / WEIGHTS_NAME
    if not _exists(weights_path):
        pickles = [name for name in PICKLE_NAMES if _exists(path / name)]
        if pickles:
            raise AdapterFileError(
                f"{path / pickles[0]} is a pickle file. peft-nola loads adapters from safetensors only and never "
                f"unpickles a file (unpickling can run arbitrary code). Re-save the adapter where it was made with "
                f"model.save_pretrained(dir), which writes {WEIGHTS_NAME}."
            )
        raise AdapterFileError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}: copy the adapter's weights file too")
    with open_regular_file(weights_path, what="adapter weights") as handle:
        check_config_fingerprint(config, config_path)
        entries = read_safetensors_header(weights_path, handle)
        tuner_cls.check_file_entries(config, entries, weights_path)
        pinned = config.pinned_fields()
        digest, legacy = stream_tensors(weights_path, handle, entries, pinned, config.prefix_for_checksum())
        tuner_cls.check_file_values(config, entries, partial(read_small_tensor, weights_path, handle, entries),
                                    weights_path)
    recorded = config.weights_checksum
    if recorded is None and config.config_fingerprint is not None:
        raise AdapterFileError(
            f"{config_path} has a config_fingerprint but no weights_checksum: this version records both on every "
            f"save, so the checksum was removed after saving and the tensors cannot be verified. Restore the saved "
            f"adapter_config.json, or save the adapter again."
        )
    if recorded is not None and recorded != (digest if recorded.startswith(CHECKSUM_VERSION) else legacy):
        raise AdapterFileError(
            f"the tensors of {weights_path} do not match the weights_checksum recorded in {config_path} "
            f"({recorded!r}): a tensor "
            f"of the file, or one of the config fields {sorted(pinned)}, was altered or corrupted after saving, or "
            f"the two files belong to different adapters. Save the adapter again (or copy both files from the same "
            f"save)."
        )
    checked = CheckedAdapter(path, config, entries, digest, legacy)
    if read_tensors:
        from safetensors.torch import load as load_safetensors

        with open_regular_file(weights_path, what="adapter weights") as handle:
            tensors = load_safetensors(handle.read())
        if tensors_checksum(tensors, pinned=pinned) != digest:
            raise AdapterFileError(f"{weights_path} changed while it was being loaded; load it again")
        checked.tensors = tensors
    return checked


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




def build_config(config_path: Path, raw: bytes, config_cls=None, class_kwargs: Optional[dict] = None):
    """The validated config from the bytes of ``adapter_config.json``; errors name the file."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    loaded = strict_json(raw, config_path, "adapter config")
    if not isinstance(loaded, dict):
        raise AdapterFileError(f"{config_path} does not hold a JSON object; save the adapter again")
    ours = {getattr(t, "value", t): c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if hasattr(c, "pinned_fields")}
    peft_type = loaded.get("peft_type")
    if peft_type is None:
        raise AdapterFileError(f"{config_path} has no 'peft_type' (one of {sorted(ours)}); save the adapter again")
    if not isinstance(peft_type, str) or peft_type not in ours:
        raise AdapterFileError(
            f"{config_path} says peft_type={peft_type!r}, which is not a peft-nola method ({sorted(ours)}): the config "
            f"was edited or does not belong to this adapter. Load it with the library that made it."
        )
    cls = ours[peft_type]
    if config_cls is not None and cls is not config_cls:
        raise AdapterFileError(
            f"{config_path} says peft_type={peft_type!r}, but a {config_cls.__name__} was expected: the adapter "
            f"belongs to another method than the one it is being loaded as"
        )
    loaded.pop("runtime_config", None)  # runtime-only, as peft drops it
    kwargs = {**loaded, **(class_kwargs or {})}
    try:
        kwargs = cls.check_kwargs(**kwargs)
        return cls(**kwargs)
    except (ValueError, TypeError, KeyError) as error:
        raise AdapterFileError(f"{config_path}: {error}") from None


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


def file_checksum(weights_path: Path, config, own_digest: str) -> Optional[str]:
    """The ``weights_checksum`` of the adapter file ``weights_path`` just written for ``config``: every tensor in it and
    the config's pinned fields. ``None`` if the file is missing or is not the one written (its own tensors do not
    hash to ``own_digest``, what the save hook saw)."""
    try:
        with open_regular_file(weights_path, what="adapter weights") as handle:
            entries = read_safetensors_header(weights_path, handle)
            digest, legacy = stream_tensors(weights_path, handle, entries, config.pinned_fields(),
                                            config.prefix_for_checksum(), check_finite=False)
    except AdapterFileError:
        return None
    return digest if legacy == own_digest else None


def stream_tensors(path: Path, handle, entries: dict[str, TensorEntry], pinned: dict, prefix: str,
                   check_finite: bool = True) -> tuple[str, str]:
    """Read every tensor's bytes in bounded chunks: refuse NaN/Inf in float tensors (``check_finite``), and return
    ``(digest, legacy)``: this version's checksum (every tensor and the pinned fields) and the first version's (the
    method's own tensors)."""
    data_start = 8 + int.from_bytes(_pread(handle, 0, 8), "little")
    digest, legacy = _new_digest(pinned), hashlib.sha256()
    for key in sorted(entries):
        entry = entries[key]
        dtype = _DTYPES[entry.dtype]
        heads = [_tensor_head(key, dtype, entry.shape)]
        digest.update(heads[0])
        own = f".{prefix}" in key
        if own:
            legacy.update(heads[0])
        step = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
        for offset in range(entry.start, entry.stop, step):
            chunk = _pread(handle, data_start + offset, min(step, entry.stop - offset))
            digest.update(chunk)
            if own:
                legacy.update(chunk)
            values = torch.frombuffer(bytearray(chunk), dtype=dtype) if check_finite else None
            if entry.dtype in FLOAT_DTYPES and values is not None and not torch.isfinite(values).all():
                raise AdapterFileError(
                    f"'{key}' in {path} contains NaN or Inf values; refusing to load it. Save the adapter again "
                    f"from a model whose training did not diverge."
                )
    return CHECKSUM_VERSION + digest.hexdigest()[:32], legacy.hexdigest()[:16]


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


# ------------------------------------------------------------------------------------------ checksums, fingerprints


def _tensor_head(key: str, dtype: torch.dtype, shape) -> bytes:
    return f"{key}|{dtype}|{tuple(int(d) for d in shape)}|".encode()


def _new_digest(pinned: dict):
    digest = hashlib.sha256()
    digest.update(json.dumps(pinned, sort_keys=True).encode())
    return digest


def tensors_checksum(
    tensors: dict[str, torch.Tensor], prefix: Optional[str] = None, pinned: Optional[dict] = None
) -> str:
    """A hash of the tensors as stored in the adapter file (keys, dtypes, shapes and bytes), recorded in the config
    as ``weights_checksum`` on save and checked on load.

    With ``pinned`` (the config's :meth:`pinned_fields`) it is this version's checksum: every tensor of the file and the
    pinned fields, prefixed ``"v2-"``. With ``prefix`` instead it is the first version's, which covered only the
    method's own tensors (keys containing ``.<prefix>``) and is still verified for adapters saved with it.
    """
    if pinned is None:
        digest = hashlib.sha256()
        keys = sorted(k for k in tensors if f".{prefix}" in k)
    else:
        digest = _new_digest(pinned)
        keys = sorted(tensors)
    for key in keys:
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(_tensor_head(key, tensor.dtype, tensor.shape))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16] if pinned is None else CHECKSUM_VERSION + digest.hexdigest()[:32]


def field_fingerprints(pinned: dict) -> dict[str, str]:
    """``{field: short hash of its value}`` for the pinned fields, recorded as ``config_fingerprint`` so that an edit
    of one of them is an error naming the field."""
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
            for name, value in sorted(pinned.items())}


def check_config_fingerprint(config, config_path: Path) -> None:
    """Raise naming the field if a pinned field's value differs from the one recorded in ``config_fingerprint``."""
    recorded = config.config_fingerprint
    if recorded is None:
        return
    pinned = config.pinned_fields()
    current = field_fingerprints(pinned)
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            value = repr(pinned[name]) if name in pinned else "left out"
            raise AdapterFileError(
                f"{config_path}: the field {name!r} is {value}, not the value the adapter was trained with (its "
                f"config_fingerprint differs). {name!r} determines what the adapter computes and cannot be changed "
                f"after training: restore the saved adapter_config.json, or train a new adapter with the new value."
            )


# ------------------------------------------------------------------------------------- tensors against the model


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


def check_declared_tensors(entries: dict[str, TensorEntry], expected: dict[str, tuple], weights_path: Path) -> None:
    """Compare what the weights file declares with ``expected`` (``{file key: (shape, allowed dtype names)}``), before
    any of it is read: every expected tensor present with its shape and an allowed dtype, and nothing else."""
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise AdapterFileError(
            f"{weights_path} lacks {len(missing)} tensor(s) this adapter needs, e.g. '{missing[0]}': the file does "
            f"not belong to its adapter_config.json (or to this model)."
        )
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise AdapterFileError(
            f"{weights_path} holds {len(unexpected)} tensor(s) this adapter has no place for, e.g. '{unexpected[0]}' "
            f"(neither one of the adapter's own tensors for this model nor a module in modules_to_save): refusing "
            f"to write it into the model. The file does not belong to its adapter_config.json (or to this model)."
        )
    for key, (shape, dtypes) in expected.items():
        entry = entries[key]
        if entry.shape != tuple(shape):
            raise AdapterFileError(
                f"'{key}' in {weights_path} has shape {entry.shape}, but this model expects {tuple(shape)}: the file "
                f"does not belong to its adapter_config.json (or to this model)."
            )
        if entry.dtype not in dtypes:
            raise AdapterFileError(
                f"'{key}' in {weights_path} is stored as {entry.dtype}; this adapter stores it as one of "
                f"{list(dtypes)}. Save the adapter again with peft-nola."
            )


# -------------------------------------------------------------------------------------------------------- regexes

#: Unbounded repetitions a target_modules regex may hold in sequence: matching time grows like n**count in the length
#: n of a module name (about 100 characters), so three keep the worst case near a million steps per name.
MAX_REGEX_REPEATS = 3
MAX_REGEX_LENGTH = 512


def check_regex(name: str, pattern: str) -> None:
    """Raise ``ValueError`` naming the field unless ``pattern`` matches in time polynomial (and small) in the length of
    a module name. peft matches ``target_modules``/``exclude_modules`` strings with ``re.fullmatch`` against every
    module name, and Python's backtracking matcher cannot be interrupted: a pattern with nested quantifiers
    (``(a+)+``), a quantified alternation (``(a|a)*``) or a backreference can take time exponential in the name's
    length, which hangs loading. Such patterns are refused with the reason; lists of names are not regexes."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
        from re._constants import MAXREPEAT
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse
        from sre_constants import MAXREPEAT

    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"{name} is a regex of {len(pattern)} characters, more than {MAX_REGEX_LENGTH}; "
                         f"list the module names instead")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(f"{name} is not a valid regex ({error}): {pattern!r}") from None

    def refuse(reason: str):
        raise ValueError(
            f"{name}={pattern!r} contains {reason}, which can make matching take time exponential in the length of a "
            f"module name (loading would hang). Write the regex without it, or list the module names."
        )

    repeats = 0

    def walk(items, in_repeat: bool) -> None:
        nonlocal repeats
        for op, av in items:
            op = str(op)
            if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = av
                if high > 1 and in_repeat:
                    refuse("nested quantifiers")
                if high > 1 and any(str(o) == "BRANCH" for o, _ in _flatten(sub)):
                    refuse("a quantified alternation")
                if high == MAXREPEAT or high > 64:
                    repeats += 1
                walk(sub, in_repeat or high > 1)
            elif op in ("GROUPREF", "GROUPREF_EXISTS"):
                refuse("a backreference")
            elif op == "SUBPATTERN":
                walk(av[-1], in_repeat)
            elif op == "BRANCH":
                for branch in av[1]:
                    walk(branch, in_repeat)
            elif op in ("ASSERT", "ASSERT_NOT"):
                walk(av[1], in_repeat)
            elif op == "ATOMIC_GROUP":
                walk(av, in_repeat)

    walk(parsed, False)
    if repeats > MAX_REGEX_REPEATS:
        raise ValueError(
            f"{name}={pattern!r} has {repeats} unbounded repetitions (more than {MAX_REGEX_REPEATS}): matching time "
            f"grows like the name length to that power. Simplify the regex, or list the module names."
        )


def _flatten(items):
    """Every ``(op, av)`` in a parsed regex, recursively."""
    for op, av in items:
        yield op, av
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            yield from _flatten(av[2])
        elif name == "SUBPATTERN":
            yield from _flatten(av[-1])
        elif name == "BRANCH":
            for branch in av[1]:
                yield from _flatten(branch)
        elif name in ("ASSERT", "ASSERT_NOT"):
            yield from _flatten(av[1])
        elif name == "ATOMIC_GROUP":
            yield from _flatten(av)
