from __future__ import annotations

import math
from contextlib import contextmanager

from torch import nn

from ...adapter_files import FLOAT_DTYPES, AdapterFileError
from ...basis import generator_fingerprint
from ...constants import KEY_PREFIX
from ...quantization import HEADER_FORMAT_VERSION, HEADER_SUFFIX
from ..lowrank import LowRankTuner, resolve_slices
from .combiner import SharedBasisCombiner
from .config import NolaConfig
from .layer import NolaLayer
from .memory import check_basis_memory
from .packing import pack_coefficients, unpack_coefficients

_MODEL_STATE = "_peft_nola_basis_state"  # attribute of an adapted model: (basis store, combiner, forward hooks)


class NolaModel(LowRankTuner):
    """Injects NOLA adapters into a model; created by ``peft.get_peft_model`` with a :class:`NolaConfig`.

    Holds the shared basis store ``nola_basis``: a plain dict of tensors, generated lazily on the device and in the
    dtype of the coefficients, keyed by seed, stream, size and dtype. Not buffers: ``.half()``, ``.to()`` and the
    like leave it alone (a cast would round a float32 basis in place and leave it under its float32 key), and it is
    never in the state dict; a basis is generated again on a new device at first use there, and one per dtype.
    """

    prefix = "nola_"
    tuner_layer_cls = NolaLayer
    method_name = "NOLA"
    # The basis store and combiner live with the adapted model (below), not only on this tuner, so
    # ``inject_adapter_in_model`` (and transformers' ``load_adapter``), which drop the tuner, work too.
    uses_shared_state = False

    def _pre_injection_hook(self, model: nn.Module, config: NolaConfig, adapter_name: str) -> None:
        if "nola_basis" in self.__dict__:
            return
        # One store and combiner per model, found on the model itself when a tuner was made for it before: every
        # adapter injected into one model shares them, whichever way it was injected.
        state = model.__dict__.get(_MODEL_STATE)
        if state is None:
            store: dict = {}
            combiner = SharedBasisCombiner(store)
            # Mark each forward of the model (also every step of generate) so layers sharing a basis are combined
            # in one product per forward; always_call ends the forward's state when it raises an Exception (a
            # KeyboardInterrupt skips forward hooks: see SharedBasisCombiner).
            hooks = [
                model.register_forward_pre_hook(combiner.begin),
                model.register_forward_hook(combiner.end, always_call=True),
            ]
            state = model.__dict__[_MODEL_STATE] = (store, combiner, hooks)  # a plain attribute, not a submodule
        self.nola_basis, self.nola_combiner, self._combiner_hooks = state

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel enters this around every forward and generate: the combiner's per-forward state cannot outlive
        # them, even when a KeyboardInterrupt skips the model's forward hooks.
        with self.nola_combiner.guard(), super()._enable_peft_forward_hooks(*args, **kwargs):
            yield

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
            module_key, _, param = key.removesuffix(HEADER_SUFFIX).removeprefix(KEY_PREFIX).rpartition(".")
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
        check_basis_memory(config, targets, loading)

    def hotswap_signature(self, config: NolaConfig) -> dict:
        signature = super().hotswap_signature(config)
        for name in ("basis_seed", "basis_mode", "num_basis_A", "num_basis_B", "basis_fingerprint", "quantization_aware"):
            signature[name] = getattr(config, name)
        if config.quantization_aware:  # the forward pass quantizes at this width
            signature["coefficient_bits"] = config.coefficient_bits
            signature["quantization_scheme"] = config.quantization_scheme
        return signature

    # ------------------------------------------------------------------------------------ quantized storage
    # With coefficient_bits set, each coefficient tensor is written as packed integers under its own key, plus a small
    # header tensor under "<key>_qheader"; on load the pair becomes the float tensor again.
    @classmethod
    def _encode_for_file(cls, config, adapter_name, tensors):
        return pack_coefficients(config, adapter_name, tensors)

    @classmethod
    def _decode_from_file(cls, config, tensors):
        return unpack_coefficients(tensors, getattr(config, "coefficient_bits", None))

    def _packed_key_pattern(self, peft_config):
        if getattr(peft_config, "coefficient_bits", None) is None:
            return None
        return r"nola_coef_[AB](?:_qheader)?"

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # Cached bases are regenerated on demand; dropping them all frees the ones no adapter uses any more.
        self.nola_basis.clear()
