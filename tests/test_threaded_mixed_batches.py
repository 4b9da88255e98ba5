"""A threaded server (issue 23): several threads call ``forward`` on one model at once, each with its own
``adapter_names``; each must get the outputs of its own assignment (the reference: the same batches run one at a
time before the threads start). peft's LoRA routes ``adapter_names`` through forward hooks registered per call, which
concurrent calls see in each other's forwards."""

import threading

import pytest
import torch
from peft import get_peft_model

from peft_nola import NolaConfig
from tests.conftest import assert_mixed_batch_matches_single_adapters, tiny_llama

D, O, B = "default", "other", "__base__"
ASSIGNMENTS = [[D, D, D], [O, O, O], [B, B, B], [D, O, B], [O, B, D], [B, D, O]]
ROUNDS = 15


def two_adapters(modules_to_save=None):
    config = lambda: NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,  # noqa: E731
                                target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config())
    torch.manual_seed(1)
    model.add_adapter(O, config())
    with torch.no_grad():  # adapters start from their seeds' values: make "other" differ from "default"
        for name, p in model.named_parameters():
            if name.endswith(".other") or ".modules_to_save.other." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval()


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_concurrent_forwards_each_get_their_own_adapter_assignment(modules_to_save):
    """With ``modules_to_save``, peft's wrapper of ``lm_head`` takes each sample's copy from the same assignment."""
    model = two_adapters(modules_to_save)
    ids = torch.randint(1, 96, (3, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = [model(ids, adapter_names=names).logits for names in ASSIGNMENTS]
    # The references differ from each other (otherwise a mix-up could not show).
    assert all(not torch.equal(expected[0], e) for e in expected[1:3])

    barrier = threading.Barrier(len(ASSIGNMENTS))
    wrong, errors = [0] * len(ASSIGNMENTS), []

    def serve(t):
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                with torch.no_grad():
                    got = model(ids, adapter_names=ASSIGNMENTS[t]).logits
                wrong[t] += not torch.allclose(got, expected[t], rtol=1e-5, atol=1e-5)
        except Exception as error:  # noqa: BLE001  (reported below, with the thread)
            errors.append((t, repr(error)))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(len(ASSIGNMENTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in 120 s"
    assert not errors, errors
    assert sum(wrong) == 0, f"outputs of another assignment in {wrong} of {ROUNDS} rounds per thread"


def test_mixed_batch_with_modules_to_save_matches_per_sample_forwards():
    """peft's behaviour kept: the ``modules_to_save`` copy of each sample's adapter is used (``"__base__"``: the
    original module), as when each sample is run alone with its adapter."""
    model = two_adapters(["lm_head"])
    heads = model.base_model.model.lm_head
    assert not torch.equal(heads.modules_to_save[D].weight, heads.modules_to_save[O].weight)
    ids = torch.randint(1, 96, (5, 6), generator=torch.Generator().manual_seed(4))
    assert_mixed_batch_matches_single_adapters(model, ids, [O, D, B, O, O], atol=1e-5)
