"""Batched mixed-adapter forwards at serving scale: many adapters (and the base model) in one batch, in every layout
of samples, and generate with beams. Reference: each sample run alone with its own adapter (another computation
path, so within float32 rounding). The two-adapter case every method runs is in test_tuner_battery.py."""

import pytest
import torch

from .conftest import assert_mixed_batch_matches_single_adapters
from .many_adapters import ids, layers, many_adapters, nola_config, nora_config, randomize


def assert_matches_per_sample(model, x, names):
    assert_mixed_batch_matches_single_adapters(model, x, names, atol=1e-5, rtol=1e-5)


# Equal segments (each adapter once, or as often as every other), uneven ones (gathered per sample), and __base__.
LAYOUTS = {
    "16-distinct+base": [f"a{i}" for i in range(16)] + ["__base__"],
    "equal-segments": [f"a{i % 4}" for i in range(8)],
    "uneven": ["a3"] * 5 + ["a1", "__base__", "a7", "a3", "a15"],
}


@pytest.mark.parametrize("mode", ["shared", "per_layer", "per_layer_cached"])
def test_mixed_batches_of_16_nola_adapters_equal_per_sample_forwards(mode):
    model = many_adapters("nola", 16, basis_mode=mode)
    model.add_adapter("rank2", nola_config(r=2, basis_mode=mode, basis_seed=3))  # a second group of shapes
    randomize(model, "rank2", 99)
    for layout, names in {**LAYOUTS, "two-ranks": ["a1", "rank2", "a2", "rank2", "__base__"]}.items():
        assert_matches_per_sample(model, ids(len(names)), names)


def test_mixed_batches_of_16_nora_adapters_equal_per_sample_forwards():
    model = many_adapters("nora", 16)
    model.add_adapter("outer4", nora_config(r=4))  # another outer rank: its own U_r, V_r
    randomize(model, "outer4", 99)
    layer = layers(model)[0]
    assert layer.nora_U["a3"] is layer.nora_U["a0"] and layer.nora_U["outer4"] is not layer.nora_U["a0"]
    for layout, names in {**LAYOUTS, "two-ranks": ["a1", "outer4", "a2", "outer4", "__base__"]}.items():
        assert_matches_per_sample(model, ids(len(names)), names)


@pytest.mark.parametrize("method", ["nola", "nora"])
def test_generate_with_many_adapters_and_beams_equals_per_sample_generate(method):
    model = many_adapters(method, 5)
    names = ["a4", "__base__", "a1", "a4", "a0"]
    x = ids(len(names), length=4, seed=7)
    for beams in (1, 2):
        kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0)
        mixed = model.generate(input_ids=x, adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model.generate(input_ids=x[i : i + 1], **kwargs)
            else:
                model.set_adapter(name)
                single = model.generate(input_ids=x[i : i + 1], **kwargs)
            # a sample alone stops at its end-of-sequence token (0), in the batch it is padded (with 0)
            length = single.shape[1]
            assert torch.equal(mixed[i : i + 1, :length], single), (beams, name)
            assert (mixed[i, length:] == 0).all()


def test_mixed_batch_of_another_length_than_the_batch_raises_before_any_work():
    model = many_adapters("nola", 16)
    names = [f"a{i}" for i in range(16)]
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but "
                                         "got 16 and 15 respectively"):
        model(ids(15), adapter_names=names)
