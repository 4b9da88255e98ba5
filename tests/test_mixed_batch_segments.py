"""Mixed-adapter batches with segments of any sizes and order (issue 23): sample ``i`` run with
``adapter_names[i]`` in one batch equals it run alone with that adapter (``"__base__"``: the adapter disabled), on
LLaMA and on an MLP (the layout of peft's ``test_mixed_adapter_batches_lora_wrong_adapter_name_raises``)."""

import pytest
import torch
from peft import get_peft_model

from peft_nola import NolaConfig, NoraConfig
from tests.conftest import TinyMLP, assert_mixed_batch_matches_single_adapters, seeded, tiny_llama

D, O, B = "default", "other", "__base__"
LAYOUTS = {
    "5+4": [D] * 5 + [O] * 4,
    "4+5": [D] * 4 + [O] * 5,
    "1+8": [D] + [O] * 8,
    "interleaved-5+4": [D, O] * 4 + [D],
    "3+2+base4": [D] * 3 + [B] * 4 + [O] * 2,
    "base-first-2+5": [B, B, O, O, O, O, O, D, D],
    "one-adapter-and-base": [D] * 6 + [B] * 3,
    "3+3+3": [O] * 3 + [D] * 3 + [B] * 3,
}


def two_adapters(model, config_fn):
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config_fn(), adapter_name=D)
    torch.manual_seed(1)
    peft_model.add_adapter(O, config_fn())
    with torch.no_grad():  # adapters start from their seeds' values: make "other" differ from "default"
        for name, p in peft_model.named_parameters():
            if name.endswith(".other"):
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return peft_model.eval()


CONFIGS = {
    "nola": lambda targets: lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                               target_modules=targets),
    "nora": lambda targets: lambda: NoraConfig(r=4, inner_r=2, init_weights=False, target_modules=targets),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_llama_mixed_batch_of_any_segments_matches_per_adapter_forwards(kind, layout):
    model = two_adapters(tiny_llama(), CONFIGS[kind](["q_proj", "v_proj"]))
    names = LAYOUTS[layout]
    token_ids = torch.randint(1, 96, (len(names), 5), generator=torch.Generator().manual_seed(2))
    assert_mixed_batch_matches_single_adapters(model, token_ids, names, atol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_mlp_mixed_batch_of_any_segments_matches_per_adapter_forwards(kind, layout):
    model = two_adapters(seeded(TinyMLP), CONFIGS[kind](["lin0", "lin1"]))
    names = LAYOUTS[layout]
    x = torch.randn(len(names), 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == B:
                with model.disable_adapter():
                    single = model(x[i : i + 1])
            else:
                model.set_adapter(name)
                single = model(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=0)
