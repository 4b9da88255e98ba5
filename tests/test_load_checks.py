"""Broken or hostile adapter directories: each is a clear error before any weights are loaded."""

import json
import pickle
import re
from collections import Counter

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_nola import NolaConfig, NolaLayer, NoraConfig

from .conftest import tiny_gpt2, tiny_llama

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
    """Rewrite the tensors as another tool would: a valid file without peft-nola's weights_checksum and
    config_fingerprint in the config (with them, any edit is caught first; these tests exercise the checks below)."""
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)
    edit_config(path, weights_checksum=None, config_fingerprint=None)


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
    with pytest.raises(ValueError, match=r"nola_coef_A' in .*adapter_model.safetensors has shape \(1, 19\).*\(1, 20\)"):
        load(adapter_dir)


def test_nan_coefficients_are_refused_naming_the_tensor(adapter_dir):
    def poison(tensors):
        key = sorted(tensors)[-1]
        tensors[key][0, 3] = float("inf")
    edit_tensors(adapter_dir, poison)
    with pytest.raises(ValueError,
                       match="layers.1.self_attn.v_proj.nola_coef_B' in .*adapter_model.safetensors contains NaN or Inf"):
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
    # The foreign tensors are named from the header, before the checksum is even computed.
    with pytest.raises(ValueError, match=r"holds the tensor '.*lora_A.weight', which is neither one of this "
                                         r"adapter's own tensors nor .*modules_to_save"):
        load(adapter_dir)


def test_a_valid_directory_still_loads_identically(adapter_dir):
    ids = torch.randint(1, 90, (2, 6))
    reference = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                                        target_modules=["q_proj", "v_proj"]))
    loaded = load(adapter_dir)
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj, NolaLayer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_a_changed_byte_in_the_tensor_data_is_caught_by_the_checksum(adapter_dir):
    data = bytearray((adapter_dir / WEIGHTS).read_bytes())
    data[-3] ^= 0x01  # the last coefficient changes by a few ulps: still a valid file, but another model
    (adapter_dir / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the weights_checksum"):
        load(adapter_dir)


def test_invalid_json_config(adapter_dir):
    # (PeftModel.from_pretrained itself reads the file first to find the peft type, and raises json's own error.)
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "NOLA", ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        NolaConfig.from_pretrained(adapter_dir)


DOCUMENTED = ("truncated or corrupted", "is not valid JSON", "does not hold a JSON object", "pickle file",
              "does not know", "must be", "weights_checksum", "made for a different model", "cannot be reproduced",
              "lacks", "has no place for", "has shape", "NaN or Inf", "neither one of this adapter", "is not a tensor",
              "is stored as", "config_fingerprint", "layers_pattern is set",
              "not found in the base model", "cannot adapt module", "not divisible by")


def _mutate(directory, rng):
    """One random mutation of a valid adapter directory; returns a description."""
    import random

    weights, config_file = directory / WEIGHTS, directory / "adapter_config.json"
    kind = rng.choice(["flip", "truncate", "append", "config-value", "config-drop", "config-add", "tensor"])
    if kind in ("flip", "truncate", "append"):
        data = bytearray(weights.read_bytes())
        if kind == "flip":
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        weights.write_bytes(bytes(data))
        return kind
    config = json.loads(config_file.read_text())
    fields = sorted(k for k in config if k not in ("peft_type", "auto_mapping", "base_model_name_or_path", "revision",
                                                  "peft_version", "task_type"))
    if kind == "config-value":
        key = rng.choice(fields)
        config[key] = rng.choice([-1, 0, 3, 2.5, "x", None, [], {}, True, 10**9])
    elif kind == "config-drop":
        key = rng.choice(fields)
        del config[key]
    elif kind == "config-add":
        key = "extra_" + "".join(rng.choice("abc") for _ in range(4))
        config[key] = 1
    else:
        tensors = load_file(weights)
        key = rng.choice(sorted(tensors))
        tensors[key] = random.Random(rng.random()).choice(
            [tensors[key] * 2, tensors[key][..., :-1].contiguous(), torch.full_like(tensors[key], float("nan"))])
        save_file(tensors, weights)
        return f"tensor {key}"
    config_file.write_text(json.dumps(config))
    return f"{kind} {key}"


def test_fuzzed_adapter_directories_load_identically_or_fail_clearly(adapter_dir, tmp_path_factory):
    import random
    import shutil

    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load(adapter_dir)(ids).logits
    rng = random.Random(1234)
    outcomes = Counter()  # (mutation kind, "identical" or the documented phrase of the error)
    for case in range(100):
        directory = tmp_path_factory.mktemp(f"fuzz{case}")
        shutil.copytree(adapter_dir, directory, dirs_exist_ok=True)
        what = _mutate(directory, rng)
        try:
            model = load(directory)
        except (ValueError, TypeError) as error:
            phrases = [phrase for phrase in DOCUMENTED if phrase in str(error)]
            assert phrases, f"case {case} ({what}): {error}"
            outcomes[what.split()[0], phrases[0]] += 1
            continue
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference), f"case {case} ({what}) loaded a different model"
        outcomes[what.split()[0], "identical"] += 1
    print("\nfuzz outcomes (mutation, outcome): count")
    for (kind, outcome), count in sorted(outcomes.items()):
        print(f"  {kind:13s} {outcome:28s} {count}")
    identical = sum(count for (_, outcome), count in outcomes.items() if outcome == "identical")
    assert 0 < identical < sum(outcomes.values())


# ------------------------------------------------------------------------------------- the entry point, directly


def test_check_adapter_dir_returns_the_checked_config_and_tensors(adapter_dir):
    from peft_nola import check_adapter_dir

    checked = check_adapter_dir(adapter_dir, read_tensors=True)
    assert isinstance(checked.config, NolaConfig) and checked.config.num_basis_A == 20
    assert checked.tensors.keys() == load_file(adapter_dir / WEIGHTS).keys() == checked.entries.keys()
    assert checked.digest == checked.config.weights_checksum  # every tensor and the pinned fields, as saved
    edit_config(adapter_dir, basis_mode="per_layer")
    with pytest.raises(ValueError, match="the field 'basis_mode' is 'per_layer', not the value the adapter was"):
        check_adapter_dir(adapter_dir)


def test_check_adapter_for_model_compares_with_the_existing_adapter(adapter_dir, tmp_path):
    from peft_nola import check_adapter_for_model

    model = load(adapter_dir)
    assert check_adapter_for_model(model, adapter_dir, "default").config.r == 4
    other = tmp_path / "other"
    get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, basis_seed=3,
                                            target_modules=["q_proj", "v_proj"])).save_pretrained(other)
    with pytest.raises(ValueError, match=r"has basis_seed=3, but the adapter it is being loaded into has basis_seed=0"):
        check_adapter_for_model(model, other, "default")


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
                                     r".*(attn|mlp)\..*_proj", "c_attn"])
def test_usual_target_regexes_are_accepted(pattern):
    NolaConfig(target_modules=pattern)


@pytest.mark.parametrize("pattern, reason", [
    ("(a+)+b", "nested quantifiers"), (r"(\.\d+)*x", "nested quantifiers"), ("(a|ab)*c", "a quantified alternation"),
    (r"(\w+)\1", "a backreference"), (".*a.*b.*c.*d", "4 unbounded repetitions"), ("x" * 600, "600 characters"),
])
def test_target_regexes_that_can_take_exponential_time_are_refused(pattern, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        NolaConfig(target_modules=pattern)
    with pytest.raises(ValueError, match=re.escape(reason)):
        NolaConfig(target_modules=["q_proj"], exclude_modules=pattern)


def test_auto_peft_model_runs_the_same_checks(adapter_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    edit_config(adapter_dir, base_model_name_or_path=str(tmp_path / "base"))  # editable: not a pinned field
    ids = torch.randint(1, 90, (2, 6))
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
        assert torch.equal(auto(ids).logits, load(adapter_dir)(ids).logits)
    data = bytearray((adapter_dir / WEIGHTS).read_bytes())
    data[-3] ^= 0x01
    (adapter_dir / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the weights_checksum"):
        AutoPeftModelForCausalLM.from_pretrained(adapter_dir)


def _seq_cls_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, num_labels=3, pad_token_id=0)).eval()


# Configs are built inside the test (factories here): a config a future peft release refuses then fails one case,
# not the collection of the whole file.
@pytest.mark.parametrize("make_base, make_config", [
    (tiny_llama, lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, target_modules=["q_proj", "v_proj"],
                                    bias="all")),
    (tiny_llama, lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, target_modules=["q_proj"],
                                    bias="nola_only")),
    (_seq_cls_llama, lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, target_modules=["q_proj"],
                                        task_type="SEQ_CLS")),
    (tiny_gpt2, lambda: NoraConfig(r=4, inner_r=2, target_modules=["c_attn"], store_outer_factors=True,
                                   output_slices={"c_attn": {"splits": 3, "adapt": [0, 2]}},
                                   modules_to_save=["lm_head"])),
    (tiny_llama, lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, target_modules=r".*\.1\..*\.(q_proj|v_proj)")),
    (tiny_llama, lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, target_modules=["q_proj", "v_proj"],
                                    layers_to_transform=[1], layers_pattern="layers")),
], ids=["bias-all", "bias-nola-only", "seq-cls-heads", "nora-slices-stored-factors", "regex", "layers"])
def test_legitimate_adapters_pass_every_check_and_load_identically(tmp_path, make_base, make_config):
    """No false refusals: adapters with biases, automatic classification heads in modules_to_save, stored NoRA
    factors on sliced outputs, regex targets, chosen layers, through from_pretrained and load_adapter onto the
    existing name."""
    config = make_config()
    torch.manual_seed(0)
    model = get_peft_model(make_base(), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)  # trained values, heads and biases included
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(ids).logits
        loaded = PeftModel.from_pretrained(make_base(), tmp_path).eval()
        assert torch.equal(loaded(ids).logits, expected)
        resumed = get_peft_model(make_base(), type(config)(**_fresh(config)))
        resumed.load_adapter(tmp_path, "default")
        assert torch.equal(resumed.eval()(ids).logits, expected)


def _fresh(config) -> dict:
    """The fields a user passes to create this config again (no fingerprints, no derived values)."""
    derived = {"peft_type", "layout_fingerprint", "basis_fingerprint", "weight_fingerprint", "weights_checksum",
               "config_fingerprint", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"}
    return {k: v for k, v in config.to_dict().items() if k not in derived}
