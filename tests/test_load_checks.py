"""Broken or hostile adapter directories: each is a clear error before any weights are loaded."""

import json
import pickle

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_nola import NolaConfig, NolaLayer

from .conftest import tiny_llama

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                                    target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    return tmp_path


def load(path):
    return PeftModel.from_pretrained(tiny_llama(), path)


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)


def test_truncated_safetensors(adapter_dir):
    data = (adapter_dir / WEIGHTS).read_bytes()
    (adapter_dir / WEIGHTS).write_bytes(data[: len(data) - 7])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load(adapter_dir)


def test_garbage_header(adapter_dir):
    (adapter_dir / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="unreadable header"):
        load(adapter_dir)


class _Marker:
    def __reduce__(self):  # unpickling this would create a file
        return (open, ("/tmp/peft_nola_unpickled_marker", "w"))


def test_pickle_adapter_is_refused_without_unpickling(adapter_dir):
    import os

    marker = "/tmp/peft_nola_unpickled_marker"
    if os.path.exists(marker):
        os.remove(marker)
    (adapter_dir / WEIGHTS).unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Marker()}))
    with pytest.raises(ValueError, match="pickle file.*never unpickles"):
        load(adapter_dir)
    assert not os.path.exists(marker)


def test_unknown_config_key(adapter_dir):
    edit_config(adapter_dir, basis_scale=2.0)
    with pytest.raises(ValueError, match=r"keys NolaConfig does not know: \['basis_scale'\]"):
        load(adapter_dir)


@pytest.mark.parametrize("changes, message", [
    (dict(r="4"), "r must be an integer >= 1, got '4'"),
    (dict(num_basis_A=-20), "num_basis_A must be an integer >= 1, got -20"),
])
def test_wrong_types_and_negative_sizes(adapter_dir, changes, message):
    edit_config(adapter_dir, **changes)
    with pytest.raises(ValueError, match=message):
        load(adapter_dir)


def test_coefficients_of_the_wrong_length(adapter_dir):
    def shorten(tensors):
        key = next(k for k in tensors if k.endswith("nola_coef_A"))
        tensors[key] = tensors[key][:, :-1].contiguous()
    edit_tensors(adapter_dir, shorten)
    with pytest.raises(ValueError, match=r"nola_coef_A.default' in the adapter file has shape \(1, 19\).*\(1, 20\)"):
        load(adapter_dir)


def test_nan_coefficients_are_refused_naming_the_tensor(adapter_dir):
    def poison(tensors):
        key = sorted(tensors)[-1]
        tensors[key][0, 3] = float("inf")
    edit_tensors(adapter_dir, poison)
    with pytest.raises(ValueError, match="layers.1.self_attn.v_proj.nola_coef_B.default' .*NaN or Inf"):
        load(adapter_dir)


def test_missing_tensor_is_an_error_not_a_silent_init(adapter_dir):
    edit_tensors(adapter_dir, lambda tensors: tensors.pop(sorted(tensors)[0]))
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        load(adapter_dir)


def test_peft_type_that_does_not_match_the_weights(adapter_dir):
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(adapter_dir / "lora")
    (adapter_dir / WEIGHTS).write_bytes((adapter_dir / "lora" / WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="lacks 8 tensor"):  # 2 layers x (q, v) x (A, B) coefficients
        load(adapter_dir)


def test_a_valid_directory_still_loads_identically(adapter_dir):
    ids = torch.randint(1, 90, (2, 6))
    reference = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                                        target_modules=["q_proj", "v_proj"]))
    loaded = load(adapter_dir)
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj, NolaLayer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
