"""Serving many adapters: the inference factor cache and batched mixed-adapter forwards.

References: a forward of the same model with the cache turned off (the same computation, so bit for bit), and each
sample run alone with its own adapter (another computation path, so within float32 rounding)."""

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from peft_nola import (NolaConfig, NolaLayer, NoraConfig, NoraLayer, quantize_coefficients,
                       set_factor_cache_budget)
from peft_nola.tuners.nola.layer import SharedBasisCombiner

from .conftest import assert_mixed_batch_matches_single_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def nola_config(**kwargs):
    return NolaConfig(**{**dict(r=4, num_basis_A=24, num_basis_B=20, target_modules=TARGETS, init_weights=False),
                         **kwargs})


def nora_config(**kwargs):
    return NoraConfig(**{**dict(r=8, inner_r=2, target_modules=TARGETS, init_weights=False), **kwargs})


def randomize(model, adapter_name, seed):
    """Give an adapter its own trained-looking tensors (adapters made from one config start identical)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f".{adapter_name}") and (".nola_coef_" in name or ".nora_inner_" in name):
                param.copy_(param + 0.3 * param.abs().mean() * torch.randn(param.shape, generator=generator))


def many_adapters(method, count, **config_kwargs):
    make_config = nola_config if method == "nola" else nora_config
    model = get_peft_model(tiny_llama(), make_config(**config_kwargs), adapter_name="a0")
    randomize(model, "a0", 0)
    for i in range(1, count):
        model.add_adapter(f"a{i}", make_config(**config_kwargs))
        randomize(model, f"a{i}", i)
    return model.eval()


def layers(model):
    return [m for m in model.modules() if isinstance(m, (NolaLayer, NoraLayer))]


def ids(batch, length=6, seed=1):
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def uncached(model, *args, **kwargs):
    """The model's output with factors rebuilt (cache off), then the cache restored."""
    cache = model.base_model.factor_cache
    budget = cache.budget
    set_factor_cache_budget(model, 0)
    try:
        with torch.no_grad():
            return model(*args, **kwargs).logits
    finally:
        set_factor_cache_budget(model, budget)


def count_builds(monkeypatch):
    """Record the (layer, adapter) pairs whose NOLA factors are built."""
    built = []
    original = SharedBasisCombiner._combine
    monkeypatch.setattr(SharedBasisCombiner, "_combine",
                        lambda self, pairs: built.extend(name for _, name in pairs) or original(self, pairs))
    return built


# ------------------------------------------------------------------------------------------------ factor cache
@pytest.mark.parametrize("method, mode", [("nola", "shared"), ("nola", "per_layer"), ("nola", "per_layer_cached"),
                                          ("nora", None)])
def test_cached_factors_are_the_bits_of_rebuilt_ones(method, mode):
    model = many_adapters(method, 2, **({"basis_mode": mode} if mode else {}))
    x = ids(2)
    with torch.no_grad():
        first = model(x).logits
        second = model(x).logits  # served from the cache
        assert model.base_model.factor_cache.nbytes > 0
        # A mixed batch builds its adapters' factors together (stacked rows: not always the bits of one adapter
        # built alone, README "Exactness"), so its reference is a rebuild of the same batch.
        model.base_model.factor_cache.clear()
        mixed = model(x, adapter_names=["a1", "a0"]).logits
        mixed_again = model(x, adapter_names=["a1", "a0"]).logits
    assert torch.equal(first, second)
    assert torch.equal(second, uncached(model, x))
    assert torch.equal(mixed, mixed_again)
    assert torch.equal(mixed_again, uncached(model, x, adapter_names=["a1", "a0"]))


def test_a_cached_adapter_is_not_rebuilt_and_set_adapter_builds_only_the_new_one(monkeypatch):
    model = many_adapters("nola", 3)
    built = count_builds(monkeypatch)
    x = ids(1)
    with torch.no_grad():
        model(x)
        assert set(built) == {"a0"}
        model(x)
        model(x)
        assert set(built) == {"a0"} and len(built) == len(layers(model))  # one build, reused twice
        model.set_adapter("a2")
        model(x)
        assert built.count("a2") == len(layers(model)) and "a1" not in built
        model.set_adapter("a0")
        model(x)
        assert built.count("a0") == len(layers(model))  # still cached


def _copy_into_one_layer(model):
    with torch.no_grad():
        layers(model)[1].nola_coef_B["a0"].copy_(torch.randn(layers(model)[1].nola_coef_B["a0"].shape))


def _optimizer_step(model):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids(2, seed=5)
    model(x, labels=x).loss.backward()
    optimizer.step()
    model.eval()


def _load_state_dict_of_another_adapter(model):
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name="a1"), adapter_name="a0")


def _quantize(model):
    quantize_coefficients(model, bits=2, adapter_name="a0")


def _delete_and_load_again(model):
    state = get_peft_model_state_dict(model, adapter_name="a1")
    config = model.peft_config["a1"]
    model.set_adapter("a1")
    model.delete_adapter("a0")
    model.add_adapter("a0", config)
    set_peft_model_state_dict(model, state, adapter_name="a0")
    model.set_adapter("a0")


def _to_float64(model):
    model.double()


@pytest.mark.parametrize("change", [_copy_into_one_layer, _optimizer_step, _load_state_dict_of_another_adapter,
                                    _quantize, _delete_and_load_again, _to_float64])
def test_every_change_of_coefficients_is_seen_by_the_next_forward(change):
    model = many_adapters("nola", 2)
    x = ids(2)
    with torch.no_grad():
        before = model(x).logits
    change(model)
    with torch.no_grad():
        after = model(x.clone()).logits
    assert not torch.equal(after.to(before.dtype), before)
    assert torch.equal(after, uncached(model, x))


def test_nora_changes_are_seen_and_train_drops_the_cache():
    model = many_adapters("nora", 2)
    x = ids(2)
    with torch.no_grad():
        before = model(x).logits
        layers(model)[0].nora_inner_A["a0"].mul_(1.5)
        after = model(x).logits
    assert not torch.equal(after, before)
    assert torch.equal(after, uncached(model, x))
    with torch.no_grad():
        model(x)
    assert model.base_model.factor_cache.nbytes > 0
    model.train()
    assert model.base_model.factor_cache.nbytes == 0


def test_the_cache_stays_within_its_budget_and_evicts_least_recently_used(monkeypatch):
    model = many_adapters("nola", 4)
    per_adapter = sum(  # factors: (r x cols) + (rows x r) floats per adapted block
        4 * (layer.nola_coef_A["a0"].shape[0]) * 4 * (layer.cols + layer.rows) for layer in layers(model)
    )
    set_factor_cache_budget(model, 2 * per_adapter)
    built = count_builds(monkeypatch)
    x = ids(1)
    with torch.no_grad():
        for name in ["a0", "a1", "a2", "a1"]:
            model.set_adapter(name)
            model(x)
        cache = model.base_model.factor_cache
        assert cache.nbytes == 2 * per_adapter and list(cache.entries) == ["a2", "a1"]
        assert built.count("a1") == len(layers(model))  # a1 was still cached the second time
        model.set_adapter("a0")
        assert torch.equal(model(x).logits, uncached(model, x))  # a0 was evicted and is rebuilt
    with pytest.raises(ValueError, match="budget_bytes must be an integer >= 0"):
        set_factor_cache_budget(model, -1)


# ------------------------------------------------------------------------------------------------ mixed batches
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


def test_the_default_budget_comes_from_the_environment(monkeypatch):
    from peft_nola.tuners.lowrank import DEFAULT_FACTOR_CACHE_BYTES, FACTOR_CACHE_ENV, FactorCache

    monkeypatch.delenv(FACTOR_CACHE_ENV, raising=False)
    assert FactorCache().budget == DEFAULT_FACTOR_CACHE_BYTES == 256 * 2**20
    monkeypatch.setenv(FACTOR_CACHE_ENV, "1e6")
    assert FactorCache().budget == 1_000_000
    monkeypatch.setenv(FACTOR_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match="PEFT_NOLA_FACTOR_CACHE_BYTES must be a number of bytes"):
        FactorCache()
