"""Writing a LoRA adapter as a llama.cpp GGUF adapter file (LLaMA-architecture bases), as llama.cpp's
``convert_lora_to_gguf.py`` would write it."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ExportError


def _llama_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders q/k output rows per head (``LlamaModel.permute`` in convert_hf_to_gguf.py)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_config, alpha: float) -> None:
    """A llama.cpp LoRA adapter as ``convert_lora_to_gguf.py`` writes it for a LLaMA base: ``general.type=adapter``,
    ``adapter.type=lora``, ``adapter.lora.alpha``; per adapted weight ``<gguf name>.weight.lora_a`` (numpy shape
    ``(r, in)``, GGUF ``ne = [in, r]``) and ``.lora_b`` (``(out, r)``, ``ne = [r, out]``), float32, q/k rows
    permuted as the converter permutes the base's q/k weights."""
    import gguf

    n_head = base_config.num_attention_heads
    n_kv_head = getattr(base_config, "num_key_value_heads", None) or n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base_config.num_hidden_layers)
    tensors = []
    for key, (lora_A, lora_B) in factors.items():
        name = name_map.get_name(key)
        if name is None:
            raise ExportError(f"llama.cpp has no tensor for '{key}' in a LLaMA model: use --format peft")
        if key.endswith("q_proj"):
            lora_B = _llama_permute(lora_B, n_head)
        elif key.endswith("k_proj"):
            lora_B = _llama_permute(lora_B, n_kv_head)
        tensors += [(f"{name}.weight.lora_a", lora_A), (f"{name}.weight.lora_b", lora_B)]
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, tensor in tensors:
        writer.add_tensor(name, tensor.detach().to(torch.float32).cpu().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
