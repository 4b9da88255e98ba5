"""Every check an adapter passes on its way into a model, in one home: what a file may hold for a config (from the
header alone) and for a model (before injection), the checks before injection, and peft's save/load hooks, which
record and verify the checksum. :class:`AdapterLoadChecks` is the half of :class:`~.model.LowRankTuner` that does
this; :func:`check_adapter_for_model` and :meth:`AdapterLoadChecks.read_checked_adapter` are its public doors for
loading into an existing adapter and for hotswapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from ..._peft_compat import (
    AuxiliaryTrainingWrapper,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    keep_transformers_from_loading,
    peft_call_locals,
    refuse_pickled_save,
    transformers_load_adapter_call,
)
from ...adapter_files import _DTYPES, FLOAT_DTYPES, AdapterFileError, check_config_writable
from ...basis import layout_fingerprint
from ...checks import CheckedAdapter, check_adapter_dir, check_declared_tensors, check_loaded_tensors
from ...checksums import field_fingerprints, tensors_checksum
from ...constants import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from .geometry import SUPPORTED_LAYERS, is_supported, matrix_shape, resolve_slices


class AdapterLoadChecks:
    """The load checks of :class:`~.model.LowRankTuner` (which subclasses it before peft's ``BaseTuner``); methods
    override ``_file_tensor_specs``, ``check_file_values``, ``_check_layer``, ``_layout_fields``,
    ``hotswap_signature`` and ``_encode_for_file``/``_decode_from_file``."""

    # ----------------------------------------------------------------------------------- what a file may hold
    @classmethod
    def _file_tensor_specs(cls, config: PeftConfig, num_blocks: int, block_rows, cols) -> dict[str, tuple]:
        """``{parameter name: (shape, allowed safetensors dtypes)}`` that the adapter file holds for one adapted module
        with ``num_blocks`` adapted blocks of shape ``(block_rows, cols)``; ``None`` for a size not known without the
        model (``block_rows``/``cols`` are ``None`` then)."""
        raise NotImplementedError

    @classmethod
    def check_file_entries(cls, config: PeftConfig, entries: dict, weights_path: Path) -> None:
        """Refuse, from the header alone, any tensor that is neither one of this adapter's own (with the shape and
        dtype the config implies, as far as known without the model) nor a parameter of a ``modules_to_save`` module
        (or a bias, when ``bias`` says biases train); run by :func:`peft_nola.checks.check_adapter_dir`."""
        root = KEY_PREFIX
        names = list(config.modules_to_save or [])
        for key, entry in entries.items():
            module_key, _, param = key.removeprefix(root).rpartition(".")
            if key.startswith(root) and param.startswith(cls.prefix) and module_key:
                splits, adapt = resolve_slices(config.output_slices, module_key)
                specs = cls._file_tensor_specs(config, len(adapt), None, None)
                if param not in specs:
                    raise AdapterFileError(f"'{key}' in {weights_path} is not a tensor {cls.method_name} adapters have "
                                           f"(they have {sorted(specs)}); the file was edited or is not this adapter's")
                shape, dtypes = specs[param]
                if len(entry.shape) != len(shape) or any(
                    want is not None and got != want for got, want in zip(entry.shape, shape)
                ):
                    raise AdapterFileError(
                        f"'{key}' in {weights_path} has shape {entry.shape}, but its adapter_config.json implies "
                        f"{tuple('?' if d is None else d for d in shape)}: the file does not belong to its config."
                    )
                if entry.dtype not in dtypes:
                    raise AdapterFileError(
                        f"'{key}' in {weights_path} is stored as {entry.dtype}; {cls.method_name} stores it as one of "
                        f"{list(dtypes)}. Save the adapter again with peft-nola."
                    )
                continue
            if key.startswith(root) and any(module_key.endswith(name) for name in names):
                continue
            if key.startswith(root) and config.bias != "none" and param == "bias":
                continue
            raise AdapterFileError(
                f"{weights_path} holds the tensor '{key}', which is neither one of this adapter's own tensors nor a "
                f"parameter of a module in modules_to_save ({names}): loading it would overwrite the base model. "
                f"Refusing to load; the file was edited or does not belong to its adapter_config.json."
            )

    @classmethod
    def check_file_values(cls, config: PeftConfig, entries: dict, read, weights_path: Path) -> None:
        """Method-specific checks of the values of small tensors (``read(key)`` returns one), run by
        :func:`~peft_nola.checks.check_adapter_dir` after the header and checksum checks; nothing by default."""

    def _expected_file_tensors(self, model: nn.Module, config: PeftConfig, targets) -> dict[str, tuple]:
        """``{file key: (shape, allowed dtypes)}`` of everything the adapter file must hold for ``model``."""
        root = KEY_PREFIX
        expected = {}
        for key, base_layer in targets:
            rows, cols = matrix_shape(base_layer)
            splits, adapt = resolve_slices(config.output_slices, key)
            for param, spec in self._file_tensor_specs(config, len(adapt), rows // splits, cols).items():
                expected[f"{root}{key}.{param}"] = spec
        names = list(config.modules_to_save or [])
        target_keys = {key for key, _ in targets}
        for name, module in model.named_modules():
            if names and any(name.endswith(n) for n in names) and not isinstance(module, BaseTunerLayer):
                # Already wrapped by another adapter's modules_to_save: the file holds the original module's keys.
                module = getattr(module, "original_module", module) if isinstance(
                    module, AuxiliaryTrainingWrapper) else module
                for param, tensor in module.state_dict().items():
                    expected[f"{root}{name}.{param}"] = (tuple(tensor.shape), _dtype_names(tensor.dtype))
            # A save writes an adapted layer's bias under its wrapper's base_layer ("...c_attn.base_layer.bias");
            # before injection the layer is still unwrapped here, so its key gets the base_layer it will have.
            adapted = name in target_keys or (name.endswith(".base_layer") and name[: -len(".base_layer")]
                                               in target_keys)
            if config.bias == "all" or (config.bias != "none" and adapted):
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor) and not isinstance(module, BaseTunerLayer):
                    key = f"{name}.base_layer" if name in target_keys else name
                    expected[f"{root}{key}.bias"] = (tuple(bias.shape), _dtype_names(bias.dtype))
        return expected

    def _check_targets(self, peft_config: PeftConfig, targets: list[tuple[str, nn.Module]]) -> None:
        """Validate the matched ``(key, base layer)`` pairs before injection, and fill in or verify the layout
        fingerprint, so that an adapter loaded onto a model with other layers is an error naming one of them."""
        for key, base_layer in targets:
            if not is_supported(base_layer):
                raise TypeError(
                    f"{self.method_name} cannot adapt module '{key}' of type {type(base_layer).__name__}. "
                    f"Supported layer types: {SUPPORTED_LAYERS}. Remove it from target_modules."
                )
        if not targets:
            return  # peft raises its own "target modules not found" error
        entries = []
        for key, base_layer in targets:
            rows, cols = matrix_shape(base_layer)
            splits, adapt = resolve_slices(peft_config.output_slices, key)
            self._check_layer(peft_config, key, rows // splits, cols)
            entries.append([key, rows, cols, splits, list(adapt), *self._layout_fields(peft_config)])
        layout = layout_fingerprint(entries)
        if peft_config.layout_fingerprint is not None and peft_config.layout_fingerprint != layout:
            key, rows, cols = entries[0][:3]
            raise ValueError(
                f"This {self.method_name} adapter was made for a different model: its layout_fingerprint is "
                f"{peft_config.layout_fingerprint!r}, but the {len(entries)} layers it targets here (e.g. '{key}' with "
                f"a {rows}x{cols} weight) give {layout!r}. Load it onto the base model it was trained on "
                f"(base_model_name_or_path={peft_config.base_model_name_or_path!r}); to start a new adapter from this "
                f"config, set its fingerprints to None."
            )
        peft_config.layout_fingerprint = layout

    def _check_layer(self, peft_config: PeftConfig, key: str, block_rows: int, cols: int) -> None:
        """Method-specific checks of one targeted weight block of shape ``(block_rows, cols)``."""

    def hotswap_signature(self, peft_config: PeftConfig) -> dict:
        """What must be equal for one adapter's values to replace another's in place (``peft_nola.hotswap_adapter``);
        fingerprints are those ``_check_targets`` filled in for this model."""
        return {"peft_type": peft_config.peft_type, "layout_fingerprint": peft_config.layout_fingerprint,
                "r": peft_config.r}

    def _layout_fields(self, peft_config: PeftConfig) -> list:
        """Config values that change the adapter's tensor shapes, recorded in the layout fingerprint."""
        return [peft_config.r]

    def check_config_fits(self, peft_config: PeftConfig) -> None:
        """The checks injection runs, for the modules ``peft_config`` adapts in this tuner's model: :meth:`_check_targets`
        (fingerprints filled in or verified) and, for a config built by a checked load, every tensor its file declares
        against what a save of it on this model writes. The model is not changed."""
        targets = self._targeted_modules(self.model, peft_config)
        self._check_targets(peft_config, targets)
        self.check_file_against_model(self.model, peft_config, targets)

    def check_file_against_model(self, model: nn.Module, peft_config: PeftConfig, targets) -> None:
        """Loading: every tensor the checked file declares against what ``model`` has a place for (shapes and
        dtypes), before the model is changed; nothing when ``peft_config`` was not built by a checked load."""
        checked = getattr(peft_config, "_checked", None)
        if checked is not None:
            expected = self._expected_file_tensors(model, peft_config, targets)
            check_declared_tensors(checked.entries, expected, checked.path / WEIGHTS_NAME)

    # transformers' loaders (model.load_adapter(dir), AutoModel*.from_pretrained(adapter_dir)) build the config with
    # PeftConfig.from_pretrained (no hook of ours runs), call inject_adapter_in_model, then copy the file's raw tensors
    # into the model. Our door is inject_adapter: the directory is checked there as PeftModel.from_pretrained checks
    # it, and the checked tensors are loaded through peft's set_peft_model_state_dict (our load hook: decoding,
    # checksum of the bytes read, NaN/shape checks) instead of transformers' raw copy.

    def check_transformers_load(self, peft_config: PeftConfig) -> Optional[dict]:
        """When transformers' ``load_adapter`` is injecting ``peft_config`` from a local directory: run
        :func:`~peft_nola.checks.check_adapter_dir` on it (tensors read once, after the checks), require the config
        transformers built to be the checked one, and return the call's locals (``None`` otherwise)."""
        caller = transformers_load_adapter_call()
        if caller is None or caller.get("adapter_state_dict") is not None:
            return None  # a state dict passed in memory: inject_adapter's model checks still run
        model_id = caller.get("peft_model_id")
        load_config = caller.get("load_config")
        subfolder = ((getattr(load_config, "download_kwargs", None) or caller.get("adapter_kwargs") or {})
                     .get("subfolder"))
        source = Path(model_id) / (subfolder or "") if model_id is not None else None
        if source is None or not os.path.lexists(source):
            raise ValueError(
                f"peft-nola checks every adapter before loading it and cannot check {model_id!r} (not a local "
                f"directory) through transformers' load_adapter. Download it first (huggingface_hub.snapshot_download) "
                f"and pass the local directory."
            )
        checked = check_adapter_dir(source, type(peft_config), read_tensors=True)
        if checked.config.pinned_fields() != peft_config.pinned_fields():
            raise AdapterFileError(f"{source / CONFIG_NAME} changed while it was being loaded; load it again")
        for name in ("layout_fingerprint", "basis_fingerprint", "weight_fingerprint"):
            if getattr(checked.config, name, None) != getattr(peft_config, name, None):
                raise AdapterFileError(f"{source / CONFIG_NAME} changed while it was being loaded; load it again")
        if self._packed_key_pattern(peft_config) is not None:
            keep_transformers_from_loading(caller, None, "")  # refuses now, before injection, if it cannot later
        peft_config._checked = checked
        return caller

    def load_for_transformers(self, model: nn.Module, adapter_name: str, peft_config: PeftConfig,
                              caller: dict) -> None:
        """Load the tensors :meth:`check_transformers_load` checked into the freshly injected adapter, and keep
        transformers from copying the file's raw tensors over them."""
        from peft.utils import set_peft_model_state_dict

        checked = peft_config._checked
        model.peft_config = self.peft_config  # as peft's BaseTuner sets it right after injection
        # peft finds a modules_to_save tensor by the module's name in the model it is given (here the transformers
        # model, whose names lack the file's "base_model.model." root); the adapter's own tensors keep the file's keys,
        # which the load hook verifies against the checked bytes.
        tensors = {key if f".{self.prefix}" in key else key.removeprefix(KEY_PREFIX): value
                   for key, value in checked.tensors.items()}
        set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        checked.tensors = None
        # transformers then copies the file's raw tensors over the same parameters: the same values for a float
        # file (read again); a packed (quantized) one must not be copied.
        packed = self._packed_key_pattern(peft_config)
        if packed is not None:
            keep_transformers_from_loading(caller, packed, adapter_name)

    def _packed_key_pattern(self, peft_config: PeftConfig) -> Optional[str]:
        """A regular expression for the file keys :meth:`_decode_from_file` turns into other tensors (``None``: the
        file holds the parameters as they are)."""
        return None

    # peft's save/load hooks (see BaseTuner._get_adapter_state_dict). Methods change how their tensors are stored with
    # _encode_for_file/_decode_from_file; the checksum covers exactly what the file holds.

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        refuse_pickled_save(cls.method_name)
        check_config_writable(config.to_dict())  # before any file is written: the loader's bounds
        tensors = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tensors = cls._encode_for_file(config, adapter_name, tensors)
        as_written = {cls._remove_adapter_name_from_key(key, adapter_name): value for key, value in tensors.items()}
        # peft adds the modules_to_save tensors (and may add others) after this hook, so the checksum of every tensor
        # is taken from the file itself when the config is written next to it (LowRankConfig.save_pretrained); what
        # this hook saw identifies that file as this save's.
        config.config_fingerprint = field_fingerprints(config.pinned_fields())
        config.weights_checksum = None
        config._pending_own_digest = tensors_checksum(as_written, cls.prefix)
        return tensors

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Runs inside peft's set_peft_model_state_dict before any weight is written. A new adapter's files were
        # checked when its config was loaded; load_adapter onto an existing name (Trainer's resume) reads no config,
        # so its directory is checked here, against the adapter already in the model.
        checked = getattr(config, "_checked", None)
        source = _load_adapter_source()
        if source is not None and (checked is None or checked.path != source):
            checked = cls._check_existing_adapter(config, source)
        own = {key: value for key, value in state_dict.items() if f".{cls.prefix}" in key}
        if checked is not None:
            # peft read the file again after the check: it must have read the bytes that were checked.
            if tensors_checksum(own, cls.prefix) != checked.own_digest:
                raise ValueError(f"{checked.path} changed while it was being loaded; load it again")
        elif config.weights_checksum is not None and not config.weights_checksum.startswith("v2-"):
            if tensors_checksum(own, cls.prefix) != config.weights_checksum:
                raise ValueError(
                    f"The adapter file's {cls.method_name} tensors do not match the weights_checksum recorded in its "
                    f"adapter_config.json ({config.weights_checksum!r}): the file was altered or corrupted, or "
                    f"belongs to another adapter. Save the adapter again."
                )
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, cls._decode_from_file(config, state_dict)
        )
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        check_loaded_tensors(expected, remapped, cls.prefix)
        config.__dict__.pop("_checked", None)  # a later load_adapter onto this name checks its own directory
        return remapped

    @classmethod
    def _check_existing_adapter(cls, config: PeftConfig, source: Path) -> CheckedAdapter:
        """Check the directory ``load_adapter`` reads into the existing adapter whose config is ``config``: all of
        :func:`~peft_nola.checks.check_adapter_dir`, and the file's pinned fields and fingerprints equal the adapter's
        (a checkpoint of another configuration would load into this one's layers as a different model)."""
        checked = check_adapter_dir(source, type(config))
        saved, ours = checked.config.pinned_fields(), config.pinned_fields()
        for name in ("layout_fingerprint", "basis_fingerprint"):
            if getattr(config, name, None) is not None and getattr(checked.config, name, None) is not None:
                saved[name], ours[name] = getattr(checked.config, name), getattr(config, name)
        for name in [*saved, *(n for n in ours if n not in saved)]:  # a field on one side only (coefficient_bits)
            if saved.get(name) != ours.get(name):
                raise AdapterFileError(
                    f"{source / CONFIG_NAME} has {name}={saved.get(name)!r}, but the adapter it is being loaded "
                    f"into has {name}={ours.get(name)!r}: the checkpoint belongs to another adapter configuration. Resume "
                    f"with the configuration it was saved with, or load it as a new adapter "
                    f"(PeftModel.from_pretrained)."
                )
        return checked

    @classmethod
    def _encode_for_file(cls, config: PeftConfig, adapter_name: str, tensors: dict) -> dict:
        """How the method's tensors are written (keys still carry the adapter name); identity by default."""
        return tensors

    @classmethod
    def _decode_from_file(cls, config: PeftConfig, tensors: dict) -> dict:
        """The inverse of :meth:`_encode_for_file`, on the file's keys."""
        return tensors

    def read_checked_adapter(self, model, path: Path, adapter_name: str, torch_device: Optional[str] = None):
        """``(config, [(model tensor, saved value), ...])`` of the saved adapter, after every check; nothing of the model
        changes.

        ``model`` is the ``PeftModel`` holding this tuner and the adapter ``adapter_name`` whose values are to be
        replaced. Runs every load check (``from_pretrained``'s file checks, :meth:`check_config_fits`, the load hook
        ``_remap_adapter_state_dict_for_load``) and requires the saved adapter to have the loaded one's
        :meth:`hotswap_signature`; used by :func:`peft_nola.hotswap_adapter`.
        """
        old = model.peft_config[adapter_name]
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds no adapter_config.json: pass a directory written by save_pretrained")
        config = type(old).from_pretrained(str(path))  # checks the directory's files first (checks.check_adapter_dir)
        if not (path / WEIGHTS_NAME).is_file():
            raise ValueError(f"{path} holds no {WEIGHTS_NAME}: pass a directory written by save_pretrained")
        if config.modules_to_save or old.modules_to_save:
            raise ValueError("hotswap_adapter does not swap modules_to_save; load the adapter with load_adapter instead")
        # As on load: the fingerprints the saved config records are checked against this base model and filled in,
        # and every tensor the file declares must be one a save of this adapter on this model writes.
        self.check_config_fits(config)
        new_signature, old_signature = self.hotswap_signature(config), self.hotswap_signature(old)
        differences = [key for key in old_signature if new_signature[key] != old_signature[key]]
        if differences:
            key = differences[0]
            raise ValueError(
                f"Cannot hotswap {adapter_name!r} with the adapter in {path}: its {key} is {new_signature[key]!r}, the "
                f"loaded adapter's is {old_signature[key]!r} (differing: {differences}). Hotswapping replaces values in "
                f"place and needs the same structure; load it as another adapter with load_adapter instead."
            )
        device = torch_device or next(iter(model.parameters())).device.type
        state = load_file(str(path / WEIGHTS_NAME), device=str(device))
        remapped = self._remap_adapter_state_dict_for_load(model, config, adapter_name, state)
        targets = model.state_dict(keep_vars=True)
        unplaced = sorted(key for key in remapped if key not in targets)
        if unplaced:
            raise ValueError(f"The adapter in {path} holds tensors this model has no place for, e.g. '{unplaced[0]}'")
        return config, [(targets[key], value.to(targets[key].dtype)) for key, value in remapped.items()]


def _dtype_names(dtype: torch.dtype) -> tuple[str, ...]:
    """safetensors dtype names a tensor stored for a parameter of ``dtype`` may have: any float for a float one."""
    if dtype.is_floating_point:
        return FLOAT_DTYPES
    return tuple(name for name, value in _DTYPES.items() if value == dtype)


def _load_adapter_source() -> Optional[Path]:
    """The local directory ``PeftModel.load_adapter`` is loading from, if this call runs inside it (else ``None``).
    Without it (another caller) the state-dict checks of the load hook still run."""
    from peft import PeftModel

    caller = peft_call_locals(PeftModel.load_adapter)
    return None if caller is None else _source(caller)


def _source(load_adapter_locals: dict) -> Optional[Path]:
    """The local directory of a ``load_adapter`` call (from its local variables), ``None`` for a Hub id."""
    model_id = load_adapter_locals.get("model_id")
    if model_id is None:
        return None
    subfolder = (load_adapter_locals.get("hf_hub_download_kwargs") or {}).get("subfolder")
    path = Path(model_id) / (subfolder or "")
    return path if os.path.lexists(path) else None


class _AdapterConfigs(dict):
    """A tuner's ``{adapter name: config}``. ``name in configs``, asked by ``PeftModel.load_adapter`` for a name that
    exists, checks the directory being loaded against that adapter (every file, the pinned fields, each declared
    tensor against the model) before peft reads any of it."""

    def __contains__(self, name) -> bool:
        from peft import PeftModel

        present = super().__contains__(name)
        caller = peft_call_locals(PeftModel.load_adapter, depth=0) if present else None  # asked by load_adapter
        if caller is not None:
            source, peft_model = _source(caller), caller.get("self")
            checked = getattr(self[name], "_checked", None)
            # (PeftModel.from_pretrained's own load_adapter call: checked when its config was loaded and on injection)
            if source is not None and peft_model is not None and (checked is None or checked.path != source):
                self[name]._checked = check_adapter_for_model(peft_model, source, name)
        return present


    def keys(self):
        from peft import PeftModel

        caller = peft_call_locals(PeftModel.save_pretrained, depth=0)  # its first step (selected_adapters)
        if caller is not None and caller.get("is_main_process", True):
            _unlink_linked_card(caller.get("save_directory"))
        return super().keys()


def _unlink_linked_card(save_directory) -> None:
    """Remove a ``README.md`` that is a symbolic link from the directory ``PeftModel.save_pretrained`` is about to
    write: peft's ``create_or_update_model_card`` runs before any hook of a tuner and would load and write the card
    through the link (changing the file it points to, perhaps outside the adapter, and copying its text into the
    card that ``push_to_hub`` uploads). The link is removed, never the file it points to; a fresh card is written."""
    if save_directory is None:
        return
    card = Path(save_directory) / "README.md"
    if card.is_symlink():
        card.unlink()


def check_adapter_for_model(peft_model, path: Union[str, os.PathLike], adapter_name: str) -> CheckedAdapter:
    """Check the adapter directory ``path`` for loading into the existing adapter ``adapter_name`` of ``peft_model``
    (a ``PeftModel`` with a NOLA/NoRA adapter of that name), before anything is read into the model.

    Runs :func:`peft_nola.checks.check_adapter_dir` (every file), then requires the file's pinned fields and
    fingerprints to equal the adapter's, and every tensor the file declares to be one a save of this adapter would
    write, with its shape and an allowed dtype. Returns the :class:`~peft_nola.checks.CheckedAdapter`; raises
    :class:`~peft_nola.checks.AdapterFileError` naming the file and the field or tensor. Used by ``load_adapter``
    onto an existing name (Trainer's resume) and meant for anything else that replaces an adapter's weights.
    """
    from peft.utils import get_peft_model_state_dict

    config = peft_model.peft_config[adapter_name]
    path = Path(path)
    checked = type(peft_model.base_model)._check_existing_adapter(config, path)
    # What a save of this adapter would write (file keys), with the in-memory config left as it was.
    saved = {name: getattr(config, name) for name in ("weights_checksum", "config_fingerprint")}
    current = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    for name, value in saved.items():
        setattr(config, name, value)
    config.__dict__.pop("_pending_own_digest", None)
    expected = {key: (tuple(t.shape), _dtype_names(t.dtype)) for key, t in current.items()}
    check_declared_tensors(checked.entries, expected, path / WEIGHTS_NAME)
    return checked
