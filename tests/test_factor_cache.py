"""The inference factor cache: factors built once per adapter and reused, served as the bits a rebuild gives, seen
to change whenever the adapter does, kept within a byte budget.

Reference: a forward of the same model with the cache turned off (the same computation, so bit for bit)."""

import pytest
import torch
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from peft_nola import quantize_coefficients, set_factor_cache_budget
from peft_nola.tuners.nola.layer import SharedBasisCombiner

from .many_adapters import ids, layers, many_adapters


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


def test_the_default_budget_comes_from_the_environment(monkeypatch):
    from peft_nola.tuners.lowrank import DEFAULT_FACTOR_CACHE_BYTES, FACTOR_CACHE_ENV, FactorCache

    monkeypatch.delenv(FACTOR_CACHE_ENV, raising=False)
    assert FactorCache().budget == DEFAULT_FACTOR_CACHE_BYTES == 256 * 2**20
    monkeypatch.setenv(FACTOR_CACHE_ENV, "1e6")
    assert FactorCache().budget == 1_000_000
    monkeypatch.setenv(FACTOR_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match="PEFT_NOLA_FACTOR_CACHE_BYTES must be a number of bytes"):
        FactorCache()
