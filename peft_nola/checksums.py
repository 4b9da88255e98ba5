"""Checksums and fingerprints of adapter files: ``weights_checksum`` (every tensor's bytes and the pinned config
fields), the first version's checksum (the method's own tensors) still verified for adapters saved with it, and
``config_fingerprint`` (a short hash per pinned field, so an edited field is an error naming it).

They detect corruption and edits made without peft-nola; they are not signatures (anyone can recompute them), so
they do not make an adapter from an untrusted source trustworthy: they make it the adapter its files say.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from .adapter_files import (
    _DTYPES,
    CHUNK_BYTES,
    FLOAT_DTYPES,
    AdapterFileError,
    TensorEntry,
    _pread,
    open_regular_file,
    read_safetensors_header,
)

CHECKSUM_VERSION = "v2-"


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
