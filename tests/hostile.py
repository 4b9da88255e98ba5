"""Hostile and broken adapter directories: the mutations, and a worker process that loads them.

Each case copies a valid adapter directory, applies one mutation, and loads the result through one load path. The
worker runs many cases in one process (so torch is imported once) under a memory cap (``RLIMIT_AS``); the driver in
``tests/test_hostile_adapters.py`` gives each case a time limit and restarts the worker if a case hangs or kills it.

Protocol: ``python -m tests.hostile ROOT`` reads ``case path`` lines on stdin and prints one JSON line per case:
``{"case", "path", "outcome", "detail"}``. Outcomes:

* ``identical``: loaded, and gives the valid adapter's outputs bit for bit;
* ``refused``: raised peft-nola's documented error before the user's model (or the existing adapter) was changed;
* ``refused-by-peft``: peft raised a ``ValueError`` of its own before calling any peft-nola code (model untouched);
* ``refused-late``: a documented error, but raised after the model was changed;
* ``different``: loaded, and computes something else;
* ``raw:<Type>``: any other exception (a crash rather than a refusal).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
MEMORY_CAP = 8 << 30

# Phrases of peft-nola's refusals (checks.py, the configs' validation, the tuners' checks).
DOCUMENTED = (
    "truncated or corrupted", "is not valid JSON", "does not hold a JSON object", "pickle file", "does not know",
    "must be", "weights_checksum", "made for a different model", "cannot be reproduced", "lacks", "has no place for",
    "has shape", "NaN or Inf", "neither one of this adapter", "is not a tensor", "is stored as", "config_fingerprint",
    "not a regular file", "cannot be read", "is not UTF-8", "nested more than", "holds an integer", "holds the number",
    "which is not JSON", "not a peft-nola method", "has no 'peft_type'", "exponential", "unbounded repetitions",
    "would need", "larger than", "does not exist", "but no adapter_model", "cannot be opened", "belongs to another",
    "not divisible", "exceeds the rank", "not the weights it was trained on",
    "Cannot hotswap", "does not swap modules_to_save", "holds no adapter_config.json", "holds no adapter_model",
)


# ----------------------------------------------------------------------------------------------- the base adapters


def make_valid_adapters(root: Path) -> None:
    """Save the valid adapters the cases start from (in the driver's process, once)."""
    import torch
    from peft import get_peft_model

    from peft_nola import NolaConfig, NoraConfig

    from .conftest import tiny_llama

    tiny_llama().save_pretrained(root / "base")  # for AutoModelForCausalLM.from_pretrained(adapter_dir)
    for kind, config in BASES.items():
        torch.manual_seed(0)
        base = tiny_llama()
        base.name_or_path = str(root / "base")
        model = get_peft_model(base, config(NolaConfig, NoraConfig))
        model.save_pretrained(root / kind)


BASES = {
    "nola": lambda N, R: N(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                           target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "nola_pl": lambda N, R: N(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                              target_modules=["q_proj", "v_proj"], basis_mode="per_layer"),
    "quant": lambda N, R: N(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                            target_modules=["q_proj", "v_proj"], coefficient_bits=4),
    "nora": lambda N, R: R(r=4, inner_r=2, init_weights=False, target_modules=["q_proj"]),
}

# ---------------------------------------------------------------------------------------------------- mutations


def read_config(d: Path) -> dict:
    return json.loads((d / CONFIG).read_text())


def write_config(d: Path, config: dict) -> None:
    (d / CONFIG).write_text(json.dumps(config))


def edit(**changes):
    def mutate(d):
        write_config(d, {**read_config(d), **changes})
    return mutate


def drop(*names):
    def mutate(d):
        config = read_config(d)
        for name in names:
            config.pop(name, None)
        write_config(d, config)
    return mutate


def raw_config(text: bytes):
    def mutate(d):
        (d / CONFIG).write_bytes(text)
    return mutate


def then(*mutations):
    def mutate(d):
        for m in mutations:
            m(d)
    return mutate


UNCHECKED = drop("weights_checksum", "config_fingerprint")  # an adapter as another tool would write it


def header_and_data(d: Path) -> tuple[dict, bytes]:
    data = (d / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_header(d: Path, header, data: bytes) -> None:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data)


def header_edit(fn):
    def mutate(d):
        header, data = header_and_data(d)
        result = fn(header)
        write_header(d, header if result is None else result, data)
    return mutate


def first_key(header: dict, part: str) -> str:
    return sorted(k for k in header if part in k)[0]


def set_dim(value):
    def fn(header):
        header[first_key(header, "nola_coef_A")]["shape"][0] = value
    return fn


def flip_byte(where: str, part: str = "nola_coef_B"):
    def mutate(d):
        data = bytearray((d / WEIGHTS).read_bytes())
        if where == "end":
            position = len(data) - 3
        else:
            header, _ = header_and_data(d)
            (length,) = struct.unpack("<Q", bytes(data[:8]))
            position = 8 + length + header[first_key(header, part)]["data_offsets"][0] + 1
        data[position] ^= 0x10
        (d / WEIGHTS).write_bytes(bytes(data))
    return mutate


def tensors_edit(fn):
    def mutate(d):
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / WEIGHTS)
        fn(tensors)
        save_file(tensors, d / WEIGHTS)
    return mutate


def coef(tensors, part="nola_coef_A"):
    return first_key(tensors, part)


def scale_coefficients(tensors):
    key = coef(tensors)
    tensors[key] = tensors[key] * 10


def cast_coefficients(dtype_name):
    def fn(tensors):
        import torch

        key = coef(tensors)
        tensors[key] = tensors[key].to(getattr(torch, dtype_name))
    return fn


def add_tensor(key, shape):
    def fn(tensors):
        import torch

        tensors[key] = torch.zeros(shape)
    return fn


def replace_file(name: str, kind: str):
    """The file ``name`` replaced by something that is not a regular file (or removed, or emptied)."""
    def mutate(d):
        path = d / name
        path.unlink()
        if kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dangling":
            path.symlink_to(d / "nowhere")
        elif kind == "loop":
            path.symlink_to(path)
        elif kind == "empty":
            path.write_bytes(b"")
        # "missing": removed
    return mutate


def symlinked_weights(d):
    target = d.parent / (d.name + "-blob")
    (d / WEIGHTS).rename(target)
    (d / WEIGHTS).symlink_to(target)


def unreadable_weights(d):
    os.chmod(d / WEIGHTS, 0)


class _Marker:
    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (os.environ.get("HOSTILE_MARKER", "/nonexistent/marker"), "w"))


def pickle_only(d):
    import pickle

    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Marker()}))


def pickle_beside(d):
    import pickle

    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Marker()}))


def junk_tensor(d):
    """A 16 MB tensor under a key the adapter may hold (lm_head.weight, a modules_to_save module), of another shape."""
    from safetensors.torch import load_file, save_file
    import torch

    tensors = load_file(d / WEIGHTS)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(4096, 1024)
    save_file(tensors, d / WEIGHTS)


def declared_huge(header):
    # A tensor declaring 2**40 float32 elements in a file of a few KB.
    key = first_key(header, "nola_coef_A")
    header[key]["shape"] = [1, 2**40]
    header[key]["data_offsets"][1] = header[key]["data_offsets"][0] + 4 * 2**40


def evil_regex_config(field, pattern):
    def mutate(d):
        write_config(d, {**read_config(d), field: pattern})
    return mutate


def deep_json(depth: int) -> bytes:
    return b'{"peft_type": "NOLA", "x": ' + b"[" * depth + b"]" * depth + b"}"


def huge_int_config(digits: int):
    def mutate(d):
        text = (d / CONFIG).read_text().replace('"r": 4', '"r": 1' + "0" * (digits - 1))
        (d / CONFIG).write_text(text)
    return mutate


def nan_alpha(d):
    text = (d / CONFIG).read_text().replace('"nola_alpha": 1.0', '"nola_alpha": NaN')
    (d / CONFIG).write_text(text)


def inf_alpha(d):
    text = (d / CONFIG).read_text().replace('"nola_alpha": 1.0', '"nola_alpha": 1e999')
    (d / CONFIG).write_text(text)


# (name, base adapter, mutation, expected outcome per load path: {"pretrained": ..., "existing": ...}; a plain
# string applies to both). The "existing" path is load_adapter onto the adapter name a model already has (what
# Trainer's resume does), whose only difference to "pretrained" is that peft reads no config itself.
R, I = "refused", "identical"
PEFT_FIRST = {"pretrained": "refused-by-peft", "existing": R}  # peft parses adapter_config.json before any plugin


def peft_raw(kind):  # peft crashes before calling peft-nola code (README: "Loading broken or hostile adapters")
    return {"pretrained": f"raw:{kind}", "existing": R}


CASES = [
    # --- the weights file: bytes, truncation, header
    ("flip-data-end", "nola", flip_byte("end"), R),
    ("flip-data-coefficient", "nola", flip_byte("coef", "nola_coef_A"), R),
    ("flip-modules-to-save-tensor", "nola", flip_byte("coef", "lm_head"), R),
    ("truncate-7-bytes", "nola", lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-7]), R),
    ("truncate-to-4-bytes", "nola", lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:4]), R),
    ("empty-weights", "nola", replace_file(WEIGHTS, "empty"), R),
    ("append-garbage", "nola", lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes() + b"\x00junk"), R),
    ("header-negative-dim", "nola", header_edit(set_dim(-1)), R),
    ("header-string-dim", "nola", header_edit(set_dim("1")), R),
    ("header-float-dim", "nola", header_edit(set_dim(1.0)), R),
    ("header-bool-dim", "nola", header_edit(set_dim(True)), R),
    ("header-huge-int-dim", "nola", header_edit(lambda h: h[first_key(h, "nola_coef_A")]["shape"].__setitem__(
        0, int("9" * 2000))), R),
    ("header-nonstring-metadata", "nola", header_edit(lambda h: h.__setitem__("__metadata__", {"format": 1})), R),
    ("header-array", "nola", header_edit(lambda h: [1, 2, 3]), R),
    ("header-deep-nesting", "nola", header_edit(lambda h: "[" * 50000 + "]" * 50000), R),
    ("header-length-2^63", "nola", lambda d: (d / WEIGHTS).write_bytes(
        struct.pack("<Q", 2**63) + (d / WEIGHTS).read_bytes()[8:]), R),
    ("header-unknown-dtype", "nola", header_edit(lambda h: h[first_key(h, "nola_coef_A")].__setitem__(
        "dtype", "F128")), R),
    ("header-overlapping-offsets", "nola", header_edit(lambda h: h[first_key(h, "nola_coef_B")].__setitem__(
        "data_offsets", [0, h[first_key(h, "nola_coef_B")]["data_offsets"][1] - h[first_key(h, "nola_coef_B")][
            "data_offsets"][0]])), R),
    ("header-extra-field", "nola", header_edit(lambda h: h[first_key(h, "nola_coef_A")].__setitem__("x", 1)), R),
    ("header-declares-2^40-elements", "nola", header_edit(declared_huge), R),
    ("header-not-utf8", "nola", lambda d: write_header(d, b'{"a": "\xff"}', b""), R),
    # --- tensors that are not the adapter's: base weights, foreign keys
    ("add-base-weight-checksum-kept", "nola", tensors_edit(add_tensor(
        "base_model.model.model.layers.0.mlp.up_proj.weight", (64, 32))), R),
    ("add-base-weight-unchecked", "nola", then(tensors_edit(add_tensor(
        "base_model.model.model.layers.0.mlp.up_proj.weight", (64, 32))), UNCHECKED), R),
    ("add-lm-head-not-in-modules-to-save", "nora", then(tensors_edit(add_tensor(
        "base_model.model.lm_head.weight", (96, 32))), UNCHECKED), R),
    ("add-own-prefixed-tensor", "nola", then(tensors_edit(add_tensor(
        "base_model.model.model.layers.0.self_attn.q_proj.nola_coef_C", (1, 20))), UNCHECKED), R),
    ("add-unprefixed-key", "nola", then(tensors_edit(add_tensor("lm_head.weight", (96, 32))), UNCHECKED), R),
    ("junk-16MB-modules-to-save-tensor", "nola", then(junk_tensor, UNCHECKED), R),
    # --- tensor values and dtypes
    ("coefficients-x10", "nola", tensors_edit(scale_coefficients), R),
    ("coefficients-x10-checksum-removed", "nola", then(tensors_edit(scale_coefficients),
                                                       drop("weights_checksum")), R),
    ("coefficients-bf16", "nola", tensors_edit(cast_coefficients("bfloat16")), R),
    ("coefficients-bf16-checksum-removed", "nola", then(tensors_edit(cast_coefficients("bfloat16")),
                                                        drop("weights_checksum")), R),
    ("coefficients-int8-unchecked", "nola", then(tensors_edit(cast_coefficients("int8")), UNCHECKED), R),
    ("coefficients-bool-unchecked", "nola", then(tensors_edit(cast_coefficients("bool")), UNCHECKED), R),
    ("coefficients-nan-unchecked", "nola", then(tensors_edit(lambda t: t[coef(t)].fill_(float("nan"))), UNCHECKED), R),
    ("coefficients-inf", "nola", tensors_edit(lambda t: t[coef(t, "nola_coef_B")].fill_(float("inf"))), R),
    ("coefficient-missing-unchecked", "nola", then(tensors_edit(lambda t: t.pop(coef(t))), UNCHECKED), R),
    ("coefficients-short-unchecked", "nola", then(tensors_edit(
        lambda t: t.__setitem__(coef(t), t[coef(t)][:, :-1].contiguous())), UNCHECKED), R),
    ("modules-to-save-tensor-missing-unchecked", "nola", then(tensors_edit(
        lambda t: t.pop("base_model.model.lm_head.weight")), UNCHECKED), R),
    # --- the weights path is not a regular file
    ("weights-is-directory", "nola", replace_file(WEIGHTS, "dir"), R),
    ("weights-is-fifo", "nola", replace_file(WEIGHTS, "fifo"), R),
    ("weights-dangling-symlink", "nola", replace_file(WEIGHTS, "dangling"), R),
    ("weights-symlink-loop", "nola", replace_file(WEIGHTS, "loop"), R),
    ("weights-missing", "nola", replace_file(WEIGHTS, "missing"), R),
    ("weights-symlink-to-valid-file", "nola", symlinked_weights, I),
    ("weights-unreadable", "nola", unreadable_weights, I if os.geteuid() == 0 else R),  # root reads anything
    ("pickle-only", "nola", pickle_only, R),
    ("pickle-beside-safetensors", "nola", pickle_beside, I),
    # --- adapter_config.json unreadable or malformed
    ("config-not-utf8", "nola", raw_config(b'{"peft_type": "NOLA", "r": "\xff\xfe"}'), PEFT_FIRST),
    ("config-not-json", "nola", raw_config(b'{"peft_type": "NOLA", '), PEFT_FIRST),
    ("config-utf8-bom", "nola", lambda d: (d / CONFIG).write_bytes(b"\xef\xbb\xbf" + (d / CONFIG).read_bytes()),
     PEFT_FIRST),
    ("config-array", "nola", raw_config(b'[{"peft_type": "NOLA"}]'), peft_raw("TypeError")),
    ("config-missing-peft-type", "nola", drop("peft_type"), peft_raw("KeyError")),
    ("config-deep-nesting", "nola", raw_config(deep_json(100000)), peft_raw("RecursionError")),
    ("config-int-of-4000-digits", "nola", huge_int_config(4000), R),
    ("config-int-of-5000-digits", "nola", huge_int_config(5000), PEFT_FIRST),
    ("config-2MB", "nola", lambda d: (d / CONFIG).write_bytes((d / CONFIG).read_bytes() + b" " * (2 << 20)), R),
    ("config-is-directory", "nola", replace_file(CONFIG, "dir"), PEFT_FIRST),
    ("config-is-fifo", "nola", replace_file(CONFIG, "fifo"), PEFT_FIRST),
    ("config-dangling-symlink", "nola", replace_file(CONFIG, "dangling"), PEFT_FIRST),
    ("config-missing", "nola", replace_file(CONFIG, "missing"), PEFT_FIRST),
    ("config-unknown-key", "nola", edit(basis_scale=2.0), R),
    # --- peft_type edited
    ("peft-type-LORA", "nola", edit(peft_type="LORA"), {"pretrained": "different", "existing": R}),
    ("peft-type-NORA", "nola", edit(peft_type="NORA"), R),
    ("peft-type-unknown", "nola", edit(peft_type="BOGUS"), peft_raw("KeyError")),
    ("peft-type-number", "nola", edit(peft_type=7), peft_raw("KeyError")),
    # --- pinned fields edited (each changes what the adapter computes)
    ("basis-mode-shared-to-per-layer", "nola", edit(basis_mode="per_layer"), R),
    ("basis-mode-shared-to-per-layer-cached", "nola", edit(basis_mode="per_layer_cached"), R),
    ("basis-seed", "nola", edit(basis_seed=1), R),
    ("r", "nola", edit(r=8), R),
    ("num-basis-A", "nola", edit(num_basis_A=21), R),
    ("target-modules", "nola", edit(target_modules=["q_proj", "v_proj", "k_proj"]), R),
    ("modules-to-save-removed", "nola", edit(modules_to_save=None), R),
    ("output-slices-added", "nola", edit(output_slices={"q_proj": {"splits": 2, "adapt": [0]}}), R),
    ("task-type", "nola", edit(task_type="SEQ_CLS"), R),
    ("bias-all", "nola", edit(bias="all"), R),
    ("layers-to-transform", "nola", edit(layers_to_transform=[0], layers_pattern="layers"), R),
    ("config-fingerprint-removed", "nola", drop("config_fingerprint"), I),  # the checksum still covers the fields
    ("weights-checksum-removed", "nola", drop("weights_checksum"), R),
    ("weights-checksum-garbage", "nola", edit(weights_checksum="v2-0000"), R),
    ("config-fingerprint-wrong-type", "nola", edit(config_fingerprint=["r"]), R),
    ("layout-fingerprint-edited", "nola", edit(layout_fingerprint="0123456789abcdef"), R),
    ("basis-fingerprint-edited", "nola", edit(basis_fingerprint="0123456789abcdef"), R),
    ("per-layer-to-per-layer-cached", "nola_pl", edit(basis_mode="per_layer_cached"), I),  # the same basis
    # --- scales and other fields
    ("nola-alpha-nan", "nola", nan_alpha, R),
    ("nola-alpha-inf", "nola", inf_alpha, R),
    ("nola-alpha-string", "nola", edit(nola_alpha="1.0"), R),
    ("nola-dropout-edited", "nola", edit(nola_dropout=0.5), I),  # acts in training only
    ("inference-mode-flipped", "nola", edit(inference_mode=False), I),
    ("base-model-name-edited", "nola", edit(base_model_name_or_path="someone/else"), I),
    # --- hangs and memory
    ("target-modules-nested-quantifiers", "nola", evil_regex_config("target_modules", "(a+)+q_proj"), R),
    ("target-modules-quantified-alternation", "nola", evil_regex_config("target_modules", "(q|q)*_proj"), R),
    ("target-modules-backreference", "nola", evil_regex_config("target_modules", r"(\w+)\1"), R),
    ("target-modules-many-wildcards", "nola", evil_regex_config("target_modules", ".*.*.*.*.*q_proj"), R),
    ("exclude-modules-nested-quantifiers", "nola", evil_regex_config("exclude_modules", "(.*)*x"), R),
    ("layers-pattern-regex", "nola", edit(layers_to_transform=[0], layers_pattern="(a+)+"), R),
    ("per-layer-num-basis-1e12-unchecked", "nola_pl", then(edit(num_basis_A=10**12), UNCHECKED), R),
    ("per-layer-r-1e9-unchecked", "nola_pl", then(edit(r=10**9, layout_fingerprint=None), UNCHECKED), R),
    # --- NoRA
    ("nora-svd-method", "nora", edit(svd_method="randomized"), R),
    ("nora-store-outer-factors", "nora", edit(store_outer_factors=True), R),
    ("nora-inner-r", "nora", edit(inner_r=1), R),
    ("nora-flip-data", "nora", flip_byte("end"), R),
    ("nora-alpha-inf", "nora", lambda d: (d / CONFIG).write_text((d / CONFIG).read_text().replace(
        '"nora_alpha": 4.0', '"nora_alpha": -Infinity')), R),
    # Recomputed factors checked against the base on injection; loaded into an existing adapter they are already this
    # base's (the one it was trained on), so the model is the same.
    ("nora-weight-fingerprint-edited", "nora", then(edit(weight_fingerprint=[1.0, 2.0, 3.0]), UNCHECKED),
     {"pretrained": R, "existing": I}),
    # --- quantized coefficients
    ("quant-flip-payload", "quant", flip_byte("coef", "nola_coef_A"), R),
    ("quant-flip-header", "quant", flip_byte("coef", "qheader"), R),
    ("quant-bits", "quant", edit(coefficient_bits=3), R),
    ("quant-scheme", "quant", edit(quantization_scheme="symmetric"), R),
    ("quant-header-bits-unchecked", "quant", then(tensors_edit(
        lambda t: t[first_key(t, "qheader")].__setitem__(1, 3.0)), UNCHECKED), R),
    ("quant-header-shape-unchecked", "quant", then(tensors_edit(
        lambda t: t[first_key(t, "qheader")].__setitem__(5, 19.0)), UNCHECKED), R),
    ("quant-header-removed-unchecked", "quant", then(tensors_edit(
        lambda t: t.pop(first_key(t, "qheader"))), UNCHECKED), R),
]


#: Every way into the library that reads an adapter directory, and the path of CASES' expectations it shares:
#: "existing"-like paths replace the values of an adapter already in the model (peft reads no config first).
DOORS = {
    "pretrained": "pretrained",  # PeftModel.from_pretrained(base, dir)
    "new": "pretrained",  # PeftModel.load_adapter(dir, new name)
    "existing": "existing",  # PeftModel.load_adapter(dir, existing name): Trainer's resume
    "tf-load-adapter": "pretrained",  # transformers: base.load_adapter(dir)
    "tf-auto": "pretrained",  # transformers: AutoModelForCausalLM.from_pretrained(dir)
    "inject": "pretrained",  # PeftConfig.from_pretrained(dir); inject_adapter_in_model; set_peft_model_state_dict
    "inject-state-dict": "pretrained",  # the same, with inject_adapter_in_model(..., state_dict=...)
    "hotswap": "existing",  # peft_nola.hotswap_adapter(model, dir)
    "export": "pretrained",  # peft_nola.export_lora(dir, out, base_model=...), the CLI's function
}


def expected_outcome(case, path: str) -> str:
    """``path``: one of :data:`DOORS` (e.g. "new", load_adapter onto a new name, loads like "pretrained")."""
    expected = case[3]
    return expected if isinstance(expected, str) else expected[DOORS.get(path, path)]


# ------------------------------------------------------------------------------------------------------ the worker


def run_case(root: Path, name: str, path: str, references: dict) -> tuple[str, str]:
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .conftest import tiny_llama

    case = next(c for c in CASES if c[0] == name)
    kind, mutate = case[1], case[2]
    work = Path(tempfile.mkdtemp(dir=root / "work"))
    directory = work / "adapter"
    shutil.copytree(root / kind, directory)
    mutate(directory)
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(0))

    def state(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base = tiny_llama()
    before = state(base)
    model = None
    fresh = path in ("pretrained", "tf-load-adapter", "tf-auto", "inject", "inject-state-dict", "export")
    try:
        model = _load_through(path, base, directory, root / kind, work)
    except BaseException as error:  # noqa: BLE001 - the outcome is what is measured
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        message = f"{type(error).__name__}: {error}"[:400]
        if fresh:
            untouched = not any(isinstance(m, BaseTunerLayer) for m in base.modules()) and same(before, state(base))
        else:  # the model and its adapter as they were; with "new", no trace of the refused adapter
            model = _existing_model[0]
            untouched = same(_existing_model[1], state(model)) and "other" not in model.peft_config
        from peft_nola.checks import AdapterFileError
        from peft_nola.errors import ExportError

        documented = isinstance(error, (AdapterFileError, ExportError)) or (
            isinstance(error, (ValueError, TypeError, MemoryError)) and _raised_by_plugin(error)
            and any(phrase in str(error) for phrase in DOCUMENTED))
        if documented:
            return ("refused" if untouched else "refused-late"), message
        if isinstance(error, ValueError) and untouched and "peft_nola" not in _origin(error):
            return "refused-by-peft", message
        return f"raw:{type(error).__name__}", message
    finally:
        if path != "export":
            shutil.rmtree(work, ignore_errors=True)
    with torch.no_grad():
        logits = model(ids).logits
    if path == "export":  # a LoRA of the same update: equal up to float32 rounding, not bit for bit
        shutil.rmtree(work, ignore_errors=True)
        return ("identical" if torch.allclose(logits, references[kind], rtol=1e-4, atol=1e-5) else "different"), ""
    return ("identical" if torch.equal(logits, references[kind]) else "different"), ""


_existing_model = [None, None]  # (model, its state before the call) of the paths that load into an existing adapter


def _load_through(path: str, base, directory: Path, valid: Path, work: Path):
    """The model that ``path`` (one of :data:`DOORS`) gives for the adapter ``directory``; ``valid``: the unmutated
    adapter of the same kind (the existing adapter of the "existing"-like paths)."""
    from peft import PeftConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    if path == "pretrained":
        return PeftModel.from_pretrained(base, str(directory))
    if path == "tf-load-adapter":
        base.load_adapter(str(directory))
        return base
    if path == "tf-auto":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(directory))
    if path in ("inject", "inject-state-dict"):
        # peft's documented manual flow; the state dict with the model's own names (peft strips the PeftModel root)
        config = PeftConfig.from_pretrained(str(directory))
        tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(directory / WEIGHTS)).items()}
        kwargs = {"state_dict": tensors} if path == "inject-state-dict" else {}
        inject_adapter_in_model(config, base, **kwargs)
        set_peft_model_state_dict(base, tensors)
        return base
    if path == "export":
        from peft_nola import export_lora

        from .conftest import tiny_llama

        export_lora(str(directory), work / "lora", base_model=tiny_llama())
        return PeftModel.from_pretrained(tiny_llama(), str(work / "lora"))
    model = PeftModel.from_pretrained(base, str(valid))
    _existing_model[:] = [model, {k: v.clone() for k, v in model.state_dict().items()}]
    if path == "hotswap":
        from peft_nola import hotswap_adapter

        hotswap_adapter(model, str(directory), "default")
        return model
    model.load_adapter(str(directory), "default" if path == "existing" else "other")
    if path == "new":
        model.set_adapter("other")
    return model


def _raised_by_plugin(error: BaseException) -> bool:
    """Whether peft-nola's code is on the traceback of ``error`` (not peft's alone)."""
    tb = error.__traceback__
    while tb is not None:
        if f"{os.sep}peft_nola{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _origin(error: BaseException) -> str:
    """The file of the innermost frame that raised ``error``."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def worker(root: Path) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    sys.setrecursionlimit(3000)
    os.environ["HOSTILE_MARKER"] = str(root / "unpickled-marker")
    import torch
    from peft import PeftModel

    import peft_nola  # noqa: F401 - registers NOLA and NoRA with peft

    from .conftest import tiny_llama

    torch.set_num_threads(1)
    references = {}
    for kind in BASES:
        with torch.no_grad():
            ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(0))
            references[kind] = PeftModel.from_pretrained(tiny_llama(), str(root / kind))(ids).logits
    (root / "work").mkdir(exist_ok=True)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name, path = line.split()
        outcome, detail = run_case(root, name, path, references)
        if (root / "unpickled-marker").exists():
            outcome, detail = "raw:UNPICKLED", "a pickle file was unpickled"
        print(json.dumps({"case": name, "path": path, "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
