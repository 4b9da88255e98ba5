from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..._peft_compat import BufferDict

from ...basis import generator_fingerprint
from ...adapter_files import FLOAT_DTYPES, AdapterFileError
from ...quantization import HEADER_FORMAT_VERSION, HEADER_SUFFIX, pack_tensor, unpack_tensor
from ..lowrank import LowRankTuner, matrix_shape, resolve_slices
from .config import NolaConfig
from .layer import NolaLayer, SharedBasisCombiner


class NolaModel(LowRankTuner):
    """Injects NOLA adapters into a model; created by ``peft.get_peft_model`` with a :class:`NolaConfig`.

    Holds the shared basis store ``nola_basis``: non-persistent buffers (never in the state dict), generated lazily
    on the device and in the dtype of the coefficients, and moved with the model by ``.to()`` (a model adapted by
    ``inject_adapter_in_model`` has no tuner: its store regenerates a basis on the new device at first use).
    """

    prefix = "nola_"
    tuner_layer_cls = NolaLayer
    method_name = "NOLA"
    # The basis store and combiner live with the adapted model (below), not only on this tuner, so
    # ``inject_adapter_in_model`` (and transformers' ``load_adapter``), which drop the tuner, work too.
    uses_shared_state = False

    def _pre_injection_hook(self, model: nn.Module, config: NolaConfig, adapter_name: str) -> None:
        if "nola_basis" in self._modules:
            return
        # One store and combiner per model, found on the model itself when a tuner was made for it before: every
        # adapter injected into one model shares them, whichever way it was injected.
        state = model.__dict__.get(_MODEL_STATE)
        if state is None:
            store = BufferDict({}, persistent=False)
            combiner = SharedBasisCombiner(store)
            # Mark each forward of the model (also every step of generate) so layers sharing a basis are combined
            # in one product per forward; always_call ends the span even when the forward raises.
            hooks = [
                model.register_forward_pre_hook(combiner.begin),
                model.register_forward_hook(combiner.end, always_call=True),
            ]
            state = model.__dict__[_MODEL_STATE] = (store, combiner, hooks)  # a plain attribute, not a submodule
        self.nola_basis, self.nola_combiner, self._combiner_hooks = state

    # Merging and unmerging build every layer's ΔW: inside one combiner span each shared basis is read once for all
    # layers instead of once per layer (same bits either way).
    def merge_adapter(self, *args, **kwargs) -> None:
        with self.nola_combiner.span():
            super().merge_adapter(*args, **kwargs)

    def unmerge_adapter(self) -> None:
        with self.nola_combiner.span():
            super().unmerge_adapter()

    def _unload_and_optionally_merge(self, *args, **kwargs):
        for handle in self._combiner_hooks:
            handle.remove()  # the returned base model must not keep the basis store alive
        self.model.__dict__.pop(_MODEL_STATE, None)
        with self.nola_combiner.span():
            return super()._unload_and_optionally_merge(*args, **kwargs)

    def _layer_kwargs(self, adapter_name: str, module_key: str) -> dict:
        return {**super()._layer_kwargs(adapter_name, module_key), "combiner": self.nola_combiner}

    @classmethod
    def _file_tensor_specs(cls, config: NolaConfig, num_blocks: int, block_rows, cols) -> dict[str, tuple]:
        sizes = {"nola_coef_A": config.num_basis_A, "nola_coef_B": config.num_basis_B}
        bits = config.coefficient_bits
        if bits is None:
            return {name: ((num_blocks, size), FLOAT_DTYPES) for name, size in sizes.items()}
        specs = {}
        for name, size in sizes.items():  # see quantization.pack_tensor: LSB-first codes, float64 header
            specs[name] = ((math.ceil(num_blocks * size * bits / 8),), ("U8",))
            specs[name + HEADER_SUFFIX] = ((4 + 2,), ("F64",))
        return specs

    @classmethod
    def check_file_values(cls, config: NolaConfig, entries: dict, read, weights_path) -> None:
        # A packed coefficient's header says its bit width and shape: checked here, before the model is touched
        # (decoding, after injection, would find the same).
        bits = config.coefficient_bits
        if bits is None:
            return
        for key in sorted(k for k in entries if k.endswith(HEADER_SUFFIX)):
            module_key, _, param = key.removesuffix(HEADER_SUFFIX).removeprefix("base_model.model.").rpartition(".")
            _, adapt = resolve_slices(config.output_slices, module_key)
            size = config.num_basis_A if param == "nola_coef_A" else config.num_basis_B
            header = read(key).tolist()
            if header[:2] != [HEADER_FORMAT_VERSION, bits] or header[4:] != [len(adapt), size]:
                raise AdapterFileError(
                    f"'{key}' in {weights_path} is [version, bits, scale, offset, *shape] = {header}, but the "
                    f"config implies version {HEADER_FORMAT_VERSION}, {bits} bits and shape {[len(adapt), size]}: the "
                    f"file was edited or does not belong to its adapter_config.json."
                )

    def _check_targets(self, config: NolaConfig, targets: list[tuple[str, nn.Module]]) -> None:
        loading = config.basis_fingerprint is not None  # set when the adapter was made: a trained adapter
        super()._check_targets(config, targets)
        fingerprint = generator_fingerprint(config.basis_seed)
        if config.basis_fingerprint is not None and config.basis_fingerprint != fingerprint:
            raise ValueError(
                f"The NOLA basis cannot be reproduced here: the adapter's basis_fingerprint is "
                f"{config.basis_fingerprint!r} but this installation generates {fingerprint!r} for "
                f"basis_seed={config.basis_seed}. The adapter was saved by a peft-nola version with a different "
                f"basis generator; load it with that version."
            )
        config.basis_fingerprint = fingerprint
        self._check_basis_memory(config, targets, loading)

    def hotswap_signature(self, config: NolaConfig) -> dict:
        signature = super().hotswap_signature(config)
        for name in ("basis_seed", "basis_mode", "num_basis_A", "num_basis_B", "basis_fingerprint", "quantization_aware"):
            signature[name] = getattr(config, name)
        if config.quantization_aware:  # the forward pass quantizes at this width
            signature["coefficient_bits"] = config.coefficient_bits
            signature["quantization_scheme"] = config.quantization_scheme
        return signature

    def _check_basis_memory(self, config: NolaConfig, targets: list[tuple[str, nn.Module]], loading=False) -> None:
        """Refuse, before any module is replaced, a config whose basis, coefficients and per-layer factors would not
        fit in memory (in every basis mode: the on-the-fly basis stores nothing, but its coefficients and the
        factors it forms in each forward still need room)."""
        if not targets:
            return
        needed = basis_bytes(config, targets, config.basis_mode) + working_bytes(config, targets)
        budget, where = basis_memory_budget(targets[0][1].weight.device)
        if budget is None or needed <= budget:
            return
        if loading:
            # A trained adapter's basis is fixed: 'shared' and the per-layer modes are different bases.
            advice = (
                "This adapter was trained with basis_mode='shared'; another mode would be another basis (another "
                "model), so free memory or load it on a larger device"
                if config.basis_mode == "shared" else
                "Use basis_mode='per_layer' (the same basis, regenerated on the fly instead of kept)"
                if config.basis_mode == "per_layer_cached" else "Free memory or load it on a larger device"
            )
        else:
            advice = (
                f"Use basis_mode='shared' (one basis per layer shape: {_gib(basis_bytes(config, targets, 'shared'))} "
                f"here) or 'per_layer' (regenerated on the fly, no basis memory), or lower num_basis_A / num_basis_B"
            )
        raise MemoryError(
            f"NOLA basis_mode={config.basis_mode!r} would need {_gib(needed)} of basis, coefficients and factors for "
            f"{len(targets)} adapted modules (k={config.num_basis_A}, l={config.num_basis_B}, r={config.r}), more than "
            f"the {_gib(budget)} budget ({where}). {advice}; or raise the budget with the environment variable "
            f"{BUDGET_ENV}=<bytes>."
        )

    # ------------------------------------------------------------------------------------ quantized storage
    # With coefficient_bits set, each coefficient tensor is written as packed integers under its own key, plus a small
    # header tensor under "<key>_qheader"; on load the pair becomes the float tensor again.

    @classmethod
    def _encode_for_file(cls, config, adapter_name, tensors):
        bits = getattr(config, "coefficient_bits", None)
        if bits is None:
            return tensors
        packed = {}
        for key, value in tensors.items():
            param_key = key.removesuffix(f".{adapter_name}")
            if param_key != key and param_key.endswith(COEFFICIENT_NAMES):
                try:
                    payload, header = pack_tensor(value, bits, config.quantization_scheme)
                except ValueError as error:
                    raise ValueError(f"Cannot save '{param_key}' at {bits} bits: {error}") from None
                packed[key] = payload
                # Named so that peft's removal of the adapter name yields "<coefficient key>_qheader".
                packed[f"{param_key}{HEADER_SUFFIX}.{adapter_name}"] = header
            else:
                packed[key] = value
        return packed

    @classmethod
    def _decode_from_file(cls, config, tensors):
        return unpack_coefficients(tensors, getattr(config, "coefficient_bits", None))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # Cached bases are regenerated on demand; dropping them all frees the ones no adapter uses any more.
        for key in list(self.nola_basis):
            del self.nola_basis[key]


BUDGET_ENV = "PEFT_NOLA_BASIS_MEMORY_BUDGET"
_MODEL_STATE = "_peft_nola_basis_state"  # attribute of an adapted model: (basis store, combiner, forward hooks)


def basis_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]], mode: str) -> int:
    """Bytes of float32 basis that ``config`` keeps in memory for the ``(key, base layer)`` pairs it adapts in
    ``mode``: one basis per distinct shape when shared, one per adapted block when cached per layer."""
    if mode == "per_layer":
        return 0
    r, k, l = config.r, config.num_basis_A, config.num_basis_B
    shared, total = set(), 0
    for key, base_layer in targets:
        rows, cols = matrix_shape(base_layer)
        splits, adapt = resolve_slices(config.output_slices, key)
        if mode == "shared":
            shared |= {("A", cols), ("B", rows // splits)}
        else:
            total += len(adapt) * (k * r * cols + l * (rows // splits) * r)
    total += sum((k if factor == "A" else l) * r * size for factor, size in shared)
    return 4 * total


def working_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]]) -> int:
    """Bytes of float32 coefficients of all adapted blocks, plus the largest layer's factors ``A (r, cols)`` and
    ``B (rows, r)``, which every mode forms in the forward pass."""
    r, k, l = config.r, config.num_basis_A, config.num_basis_B
    coefficients, factors = 0, 0
    for key, base_layer in targets:
        rows, cols = matrix_shape(base_layer)
        splits, adapt = resolve_slices(config.output_slices, key)
        coefficients += len(adapt) * (k + l)
        factors = max(factors, len(adapt) * (r * cols + (rows // splits) * r))
    return 4 * (coefficients + factors)


def basis_memory_budget(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, where it comes from)``: ``$PEFT_NOLA_BASIS_MEMORY_BUDGET`` if set, else the memory available on
    ``device`` now (``None`` where that cannot be known, e.g. the meta device)."""
    if os.environ.get(BUDGET_ENV):
        try:
            return int(float(os.environ[BUDGET_ENV])), f"{BUDGET_ENV}"
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of bytes, not {os.environ[BUDGET_ENV]!r}") from None
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory on {device}"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available memory on this machine"
        except OSError:
            pass
    return None, ""


def _gib(num_bytes: int) -> str:
    size = f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes:,} bytes ({size})"


COEFFICIENT_NAMES = tuple(f".{name}" for name in NolaLayer.adapter_layer_names)


def unpack_coefficients(state_dict: dict[str, torch.Tensor], bits) -> dict[str, torch.Tensor]:
    """A checkpoint state dict with every packed coefficient (payload + header) replaced by its float32 tensor.

    Raises ``ValueError`` when the file and ``coefficient_bits`` disagree: packed tensors without the setting (or at
    another bit width), a coefficient stored in float although the config says it is packed, or a payload whose
    length disagrees with its header.
    """
    headers = {key.removesuffix(HEADER_SUFFIX): key for key in state_dict if key.endswith(HEADER_SUFFIX)}
    if headers and bits is None:
        raise ValueError(
            f"The adapter file holds packed (quantized) coefficients, e.g. '{next(iter(headers))}', but its "
            f"adapter_config.json has no coefficient_bits: the config does not belong to this file."
        )
    unpacked = {}
    for key, value in state_dict.items():
        if key.endswith(HEADER_SUFFIX):
            continue
        if key in headers:
            unpacked[key] = unpack_tensor(value, state_dict[headers[key]], name=key, bits=bits)
        elif bits is not None and key.endswith(COEFFICIENT_NAMES):
            raise ValueError(
                f"adapter_config.json says coefficient_bits={bits}, but '{key}' is stored as a {value.dtype} tensor "
                f"without its '{key}{HEADER_SUFFIX}' header: the config does not belong to this file."
            )
        else:
            unpacked[key] = value
    missing = sorted(set(headers) - set(unpacked))
    if missing:
        raise ValueError(f"The adapter file has the header '{missing[0]}{HEADER_SUFFIX}' but no '{missing[0]}' payload")
    return unpacked
