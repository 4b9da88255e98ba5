"""NOLA under mixed precision on CPU: Trainer bf16 autocast against float32, fp16 on CPU, and a model loaded in
bfloat16. The basis is generated in float32 and cast once to the coefficients' dtype (SharedBasisCombiner.basis)."""

import pytest
import torch
from peft import get_peft_model

from tests.conftest import tiny_llama

peft_nola = pytest.importorskip("peft_nola")
from peft_nola import NolaConfig  # noqa: E402

STEPS = 6
# Measured on this tiny LLaMA (6 steps, batch 4): bf16-autocast losses differ from float32 by at most 2.0e-5 relative
# over the three basis modes (every step > 0, so autocast did change the arithmetic). bf16 keeps 8 significant bits, one rounding is up to
# 2^-9 = 2e-3 relative; the loss of a near-uniform softmax averages many such errors away. 2e-3 leaves ~100x margin
# over the measurement, and is still far below what training in the wrong dtype throughout would cost.
BF16_LOSS_RTOL = 2e-3


def nola_config(basis_mode: str = "shared") -> NolaConfig:
    return NolaConfig(r=4, num_basis_A=32, num_basis_B=32, target_modules=["q_proj", "v_proj"], basis_mode=basis_mode,
                      task_type="CAUSAL_LM")


def sequences() -> list[dict]:
    """Sequences that step by 1 or 2 (mod 95): learnable, so the losses move over the steps."""
    starts, steps = torch.arange(16) * 5 % 95, 1 + torch.arange(16) % 2
    ids = 1 + (starts[:, None] + steps[:, None] * torch.arange(12)) % 95
    return [{"input_ids": row, "labels": row} for row in ids]


def train(tmp_path, basis_mode: str = "shared", **precision) -> dict:
    """A few Trainer steps of NOLA on a float32 tiny LLaMA; records the losses and the dtype the adapted layers
    computed in during training."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), nola_config(basis_mode))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    seen_dtypes = set()
    handle = q_proj.register_forward_hook(lambda module, args, output: seen_dtypes.add(output.dtype))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=0.05,
        logging_steps=1, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", seed=0, **precision,
    )
    trainer = Trainer(model=model, args=args, train_dataset=sequences())
    trainer.train()
    handle.remove()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    return {"losses": losses, "model": model, "seen_dtypes": seen_dtypes}


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("fp32"))


def coefficients(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("basis_mode", ["shared", "per_layer_cached", "per_layer"])
def test_bf16_autocast_training_tracks_float32_and_keeps_float32_state(basis_mode, tmp_path):
    fp32_run = train(tmp_path / "fp32", basis_mode)
    bf16 = train(tmp_path / "bf16", basis_mode, bf16=True)
    assert bf16["seen_dtypes"] == {torch.bfloat16}, "Trainer(bf16=True) did not autocast the adapted layers"
    assert fp32_run["seen_dtypes"] == {torch.float32}

    relative = [abs(a - b) / abs(a) for a, b in zip(fp32_run["losses"], bf16["losses"])]
    print(f"bf16 vs fp32 loss, relative difference per step: {[f'{r:.2e}' for r in relative]}")
    assert max(relative) <= BF16_LOSS_RTOL, relative
    assert max(relative) > 0, "bf16 losses are bit-identical to fp32: no reduced precision was used"
    # Training must have progressed for the comparison to mean anything.
    assert fp32_run["losses"][-1] != fp32_run["losses"][0]

    # AMP keeps the master weights: the coefficients (the only trainable tensors) stay float32 ...
    trained = coefficients(bf16["model"])
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all("nola_coef" in name for name in trained)
    # ... and the basis, generated for float32 coefficients, is float32 too (autocast only casts matmul inputs).
    store = bf16["model"].base_model.nola_basis
    if basis_mode == "per_layer":
        assert len(store) == 0  # generated on the fly in each forward and backward, never stored
    else:
        assert len(store) > 0 and all(buffer.dtype == torch.float32 for buffer in store.values())


def test_fp16_on_cpu_trains_in_float32(fp32_run, tmp_path):
    """accelerate 1.15 enables fp16 autocast only on accelerators: on CPU, ``fp16=True`` is silently ignored
    (Accelerator sets native_amp=False, no GradScaler, no autocast). Pin it, so a recipe config with fp16: true is
    known to train in float32 on CPU, and this test tells when accelerate starts honouring it."""
    fp16 = train(tmp_path, fp16=True)
    assert fp16["seen_dtypes"] == {torch.float32}
    assert fp16["losses"] == fp32_run["losses"]


@pytest.mark.parametrize("autocast_adapter_dtype, coefficient_dtype",
                         [(True, torch.float32), (False, torch.bfloat16)])
def test_model_in_bfloat16_with_nola(autocast_adapter_dtype, coefficient_dtype):
    """A base model in bfloat16 (as from_pretrained(torch_dtype=torch.bfloat16) gives). peft's default
    (autocast_adapter_dtype=True) keeps the coefficients in float32; with False they follow the base layer into
    bfloat16. Either way the basis takes the coefficients' dtype, is generated once and reused, the adapter starts as
    the identity, and a training step reaches the coefficients."""
    base = tiny_llama().to(torch.bfloat16)
    token_ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(token_ids).logits

    model = get_peft_model(base, nola_config(), autocast_adapter_dtype=autocast_adapter_dtype)
    trained = coefficients(model)
    dtypes = {p.dtype for p in trained.values()}
    assert dtypes == {coefficient_dtype}
    store = model.base_model.nola_basis
    with torch.no_grad():
        adapted_logits = model(token_ids).logits
    # Identity at init (all beta = 0): the adapted model reproduces the base model exactly.
    assert adapted_logits.dtype == torch.bfloat16
    assert torch.equal(adapted_logits, base_logits)

    # One basis per stream, in the coefficients' dtype, generated on the first forward and then kept.
    assert len(store) > 0 and {b.dtype for b in store.values()} == dtypes
    before = {key: buffer.data_ptr() for key, buffer in store.items()}
    loss = model(token_ids, labels=token_ids).loss
    loss.backward()
    assert {key: buffer.data_ptr() for key, buffer in store.items()} == before, "the basis was regenerated"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in trained.items() if "coef_B" in name)

    # The stored basis is the float32 basis rounded once: compare with a float32 model's store.
    reference = get_peft_model(tiny_llama(), nola_config())
    with torch.no_grad():
        reference(token_ids)
    float32_store = reference.base_model.nola_basis
    assert len(float32_store) == len(store)
    for key, buffer in store.items():
        if buffer.dtype != torch.float32:
            key = key.replace(str(buffer.dtype).removeprefix("torch."), "float32")
        assert torch.equal(buffer, float32_store[key].to(buffer.dtype)), key
    print(f"bf16 base model: coefficient dtypes {dtypes}, basis dtypes {[b.dtype for b in store.values()]}")
