"""Tiny models built from configs (no download) and paths shared by the tests."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not torch.cuda.is_available():
    # Before anything imports Triton (transformers does): without a GPU, tests/test_kernels.py runs the kernels in
    # Triton's interpreter, which must be chosen before Triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository, or ``$PEFT_NOLA_DATA_DIR``."""
    return Path(os.environ.get("PEFT_NOLA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def tiny_gpt2(seed: int = 0, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=2, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5,
    )
    return ViTForImageClassification(config).eval()


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


def train_with_trainer(model, output_dir, learning_rate: float, epochs: int = 6) -> tuple[float, float]:
    """Mean loss over a small learnable dataset before and after ``transformers.Trainer`` with gradient checkpointing."""
    from transformers import Trainer, TrainingArguments

    # Sequences that step by 1 or 2 (mod 95): learnable from the previous token, unlike uniform noise.
    starts, steps = torch.arange(16) * 5 % 95, 1 + torch.arange(16) % 2
    sequences = 1 + (starts[:, None] + steps[:, None] * torch.arange(12)) % 95
    data = [{"input_ids": ids, "labels": ids} for ids in sequences]

    def mean_loss():
        with torch.no_grad():
            return torch.stack([model(ids[None], labels=ids[None]).loss for ids in sequences]).mean().item()

    before = mean_loss()
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=epochs,
                             learning_rate=learning_rate, gradient_checkpointing=True, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    return before, mean_loss()


def assert_mixed_batch_matches_single_adapters(model, token_ids, names, atol=1e-6, rtol=0.0):
    """Sample i run with ``adapter_names[i]`` in one batch equals it run alone with that adapter (or none)."""
    with torch.no_grad():
        mixed = model(token_ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(token_ids[i : i + 1]).logits
            else:
                model.set_adapter(name)
                single = model(token_ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], single, atol=atol, rtol=rtol)


def seeded(module_cls, seed: int = 0):
    torch.manual_seed(seed)
    return module_cls().eval()


@pytest.fixture
def token_ids():
    return torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(1))


def write_image_folder(root: Path, per_class: dict[str, int], corrupt: str | None = None) -> Path:
    """``root/{train,test}/<class>/<i>.png`` (datasets' imagefolder layout) with a few random PNGs made by PIL; with
    ``corrupt`` (a path under ``train/``), one file that is not an image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    if corrupt:
        (root / "train" / corrupt).write_bytes(b"not an image")
    return root
