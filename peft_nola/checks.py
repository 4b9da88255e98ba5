"""Checks on adapter files made before anything is loaded: a bad file is a clear error naming the file and what to do,
never a crash deep in torch, a hang, an allocation of terabytes or a silently different model.

:func:`check_adapter_dir` is the one entry point: every load path (``PeftModel.from_pretrained``, ``load_adapter``
onto a new or an existing adapter name, ``AutoPeftModel*``, ``Trainer`` resume) runs it before the first module of
the user's model is replaced or any weight is written. Adapters are safetensors only; pickle files are refused
without being opened.

The files are read by :mod:`peft_nola.adapter_files` and hashed by :mod:`peft_nola.checksums`; this module says
what a directory must hold and compares the tensors it declares with what a model expects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .adapter_files import (
    MAX_CONFIG_BYTES,
    AdapterFileError,
    TensorEntry,
    _exists,
    _require_directory,
    open_regular_file,
    read_regular_file,
    read_safetensors_header,
    read_small_tensor,
    strict_json,
)
from .constants import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME
from .checksums import (
    CHECKSUM_VERSION,
    check_config_fingerprint,
    stream_tensors,
    tensors_checksum,
)


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
    peft_methods = {getattr(t, "value", t) for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    if isinstance(peft_type, str) and peft_type in peft_methods - set(ours):
        # A method of peft itself (most often a LoRA adapter picked by mistake): say what it is and what loads it.
        hotswap = (" To replace a loaded LoRA adapter's weights in place, use peft's own "
                   "peft.utils.hotswap.hotswap_adapter on a model holding a LoRA adapter."
                   if peft_type == "LORA" else "")
        raise AdapterFileError(
            f"{config_path} describes a {peft_type} adapter (peft_type={peft_type!r}), which is not a peft-nola method "
            f"({sorted(ours)}), so peft-nola cannot load or hotswap it. peft loads it as an adapter of its own: "
            f"PeftModel.from_pretrained(base_model, {str(config_path.parent)!r}) on a model without NOLA/NoRA "
            f"adapters (one PeftModel holds adapters of one method).{hotswap}"
        )
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


# ------------------------------------------------------------------------------------- tensors against the model


_NOT_ITS_FILE = "does not belong to its adapter_config.json (or to this model)."


def _compare_with_expected(found: dict[str, tuple], expected: dict[str, tuple], subject: str, in_file: str,
                           error: type, check_value: Callable[[str], None], unexpected_detail: str = ": the file") -> None:
    """The rule both tensor comparisons share, in order: every expected tensor present, no unexpected one, then per
    expected tensor its shape and ``check_value(key)``. ``found``/``expected``: ``{key: shape}`` (``found`` already
    restricted to the keys that must be expected); ``subject``/``in_file`` name the file in the messages."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise error(f"{subject} lacks {len(missing)} tensor(s) this adapter needs, e.g. '{missing[0]}': the file "
                    f"{_NOT_ITS_FILE}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise error(f"{subject} holds {len(unexpected)} tensor(s) this adapter has no place for, e.g. "
                    f"'{unexpected[0]}'{unexpected_detail} {_NOT_ITS_FILE}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise error(f"'{key}' in {in_file} has shape {tuple(found[key])}, but this model expects {tuple(shape)}: "
                        f"the file {_NOT_ITS_FILE}")
        check_value(key)


def check_loaded_tensors(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], prefix: str) -> None:
    """Compare the adapter tensors a checkpoint provides (``loaded``, model keys) with what the model expects.

    Raises ``ValueError`` naming the tensor for: an expected tensor the file lacks (it would silently keep its
    initial value), a tensor of another shape, a tensor with NaN or Inf, or a file tensor of this method that the
    model has no place for (a config that does not belong to the file).
    """

    def finite(key: str) -> None:
        tensor = loaded[key]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"'{key}' in the adapter file contains NaN or Inf values; refusing to load it.")

    found = {key: tuple(tensor.shape) for key, tensor in loaded.items() if key in expected or f".{prefix}" in key}
    _compare_with_expected(found, {key: tuple(t.shape) for key, t in expected.items()}, "The adapter file",
                           "the adapter file", ValueError, finite)


def check_declared_tensors(entries: dict[str, TensorEntry], expected: dict[str, tuple], weights_path: Path) -> None:
    """Compare what the weights file declares with ``expected`` (``{file key: (shape, allowed dtype names)}``), before
    any of it is read: every expected tensor present with its shape and an allowed dtype, and nothing else."""

    def allowed_dtype(key: str) -> None:
        dtypes = expected[key][1]
        if entries[key].dtype not in dtypes:
            raise AdapterFileError(
                f"'{key}' in {weights_path} is stored as {entries[key].dtype}; this adapter stores it as one of "
                f"{list(dtypes)}. Save the adapter again with peft-nola."
            )

    _compare_with_expected(
        {key: entry.shape for key, entry in entries.items()}, {key: shape for key, (shape, _) in expected.items()},
        str(weights_path), str(weights_path), AdapterFileError, allowed_dtype,
        " (neither one of the adapter's own tensors for this model nor a module in modules_to_save): refusing to "
        "write it into the model. The file",
    )
