"""Models with many adapters of one method, each with its own trained-looking tensors: what the factor cache and
mixed-batch tests (test_factor_cache.py, test_mixed_batch.py) serve."""

import torch
from peft import get_peft_model

from peft_nola import NolaConfig, NolaLayer, NoraConfig, NoraLayer

from .conftest import tiny_llama

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
