"""Which serving engines accept an exported LoRA adapter: peft, vLLM, TGI and llama.cpp, by the rules their loaders
apply (read from their sources, see :data:`CONSUMER_RULES`). They change with the engines' releases, so they live
apart from the export's math."""

from __future__ import annotations

from typing import Optional

from .constants import KEY_PREFIX

# vLLM's LoRA ranks: `--max-lora-rank` takes one of these (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Module names whose LoRA vLLM and TGI load for LLaMA-architecture models (vLLM: LlamaForCausalLM's packed modules
# qkv_proj / gate_up_proj and o_proj, down_proj; TGI: the flash LLaMA model's adapter layers).
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_MODEL_TYPES = ("llama", "mistral")

#: Where each consumer's rules were read (the checks in :func:`consumer_verdicts` follow them).
CONSUMER_RULES = {
    "peft": "peft's LoraConfig and LoRA layers (Linear, Conv1D with fan_in_fan_out, Conv2d, bitsandbytes)",
    "vllm": "vllm/lora/peft_helper.py (PEFTHelper: r, lora_alpha, target_modules required; modules_to_save None; "
    "no DoRA, bias 'none'; r <= --max-lora-rank in vllm/config/lora.py MaxLoRARanks), vllm/lora/lora_model.py "
    "(tensor names base_model.model.<module>.lora_A/lora_B.weight, modules outside the model's LoRA modules are "
    "an error), vllm/model_executor/models/gpt2.py (GPT2LMHeadModel does not implement SupportsLoRA)",
    "tgi": "server/text_generation_server/adapters/lora.py (peft LoraConfig; only base_model.model.<layer>.lora_A/"
    "lora_B.weight of the model's adapter layers are used, other tensors are left unused with a warning)",
    "llama.cpp": "convert_lora_to_gguf.py and src/llama-adapter.cpp (only lora_A/lora_B pairs of the base GGUF's "
    "tensors; embeddings or other full tensors in the adapter are an error)",
}



def consumer_verdicts(config: dict, tensor_names: list[str], layer_types: list[str], model_type: Optional[str]) -> dict:
    """Whether peft, vLLM, TGI and llama.cpp (via ``convert_lora_to_gguf.py``) accept a LoRA adapter with this
    ``adapter_config.json`` content, these tensor names, base layer types and base ``model_type``.

    Each verdict is ``{"accepts": True | False | None, "reasons": [...]}`` (``None``: depends on what cannot be
    checked without the engine, said in the reasons). vLLM's also names the ``--max-lora-rank`` it needs.
    """
    r = config.get("r")
    modules_to_save = config.get("modules_to_save")
    lora_keys = [n for n in tensor_names if n.endswith((".lora_A.weight", ".lora_B.weight"))]
    other_keys = sorted(set(tensor_names) - set(lora_keys))
    module_names = sorted({n.removeprefix(KEY_PREFIX).rsplit(".", 2)[0] for n in lora_keys})
    not_linear = sorted(set(layer_types) - {"Linear", "Linear8bitLt", "Linear4bit"})
    is_llama = model_type in LLAMA_MODEL_TYPES
    outside_llama = sorted({m.rsplit(".", 1)[-1] for m in module_names} - set(LLAMA_LORA_MODULES))

    def verdict(problems: list[str], unknown: list[str]) -> dict:
        return {"accepts": False if problems else (None if unknown else True), "reasons": problems + unknown}

    vllm_problems, vllm_unknown = [], []
    missing = [name for name in ("r", "lora_alpha", "target_modules") if config.get(name) is None]
    if missing:
        vllm_problems.append(f"vLLM requires {missing} in adapter_config.json")
    if modules_to_save:
        vllm_problems.append(
            f"vLLM rejects modules_to_save={modules_to_save} (it allows only None, recent versions also "
            f"['classifier', 'score'] for classification models)"
        )
    if config.get("use_dora") or config.get("bias", "none") != "none" or config.get("lora_bias"):
        vllm_problems.append("vLLM rejects DoRA and adapter biases")
    if not isinstance(r, int) or not 1 <= r <= VLLM_MAX_LORA_RANKS[-1]:
        vllm_problems.append(f"vLLM's largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}, the adapter's r is {r}")
    if not_linear:
        vllm_problems.append(f"vLLM has LoRA only for linear layers, the adapter adapts {not_linear}")
    if model_type == "gpt2":
        vllm_problems.append("vLLM's GPT2LMHeadModel does not support LoRA (no SupportsLoRA)")
    elif is_llama and outside_llama:
        vllm_problems.append(f"vLLM's LLaMA has no LoRA for {outside_llama} (its LoRA modules: {LLAMA_LORA_MODULES})")
    elif not is_llama:
        vllm_unknown.append(f"whether vLLM's {model_type!r} model has LoRA for {module_names[:3]}... is not checked")
    vllm = verdict(vllm_problems, vllm_unknown)
    if isinstance(r, int) and r <= VLLM_MAX_LORA_RANKS[-1]:
        vllm["max_lora_rank"] = next(rank for rank in VLLM_MAX_LORA_RANKS if rank >= r)

    tgi_problems, tgi_unknown = [], []
    if other_keys:
        tgi_problems.append(
            f"TGI loads only lora_A/lora_B tensors and would leave {other_keys[:3]} unused (modules_to_save ignored: "
            f"outputs would differ)"
        )
    if not_linear:
        tgi_problems.append(f"TGI has LoRA only for linear layers, the adapter adapts {not_linear}")
    if is_llama and outside_llama:
        tgi_problems.append(f"TGI's LLaMA has no adapter layers {outside_llama}")
    elif not is_llama:
        tgi_unknown.append(f"TGI serves adapters only on its flash models; {model_type!r} is not checked")
    tgi = verdict(tgi_problems, tgi_unknown)

    cpp_problems, cpp_unknown = [], []
    if other_keys:
        cpp_problems.append(
            f"llama.cpp's convert_lora_to_gguf.py rejects tensors that are not lora_A/lora_B pairs: {other_keys[:3]}"
        )
    if not_linear:
        cpp_problems.append(f"llama.cpp adapters hold only linear LoRA pairs, the adapter adapts {not_linear}")
    if not is_llama:
        cpp_unknown.append(
            f"peft_nola writes GGUF only for {LLAMA_MODEL_TYPES}; convert_lora_to_gguf.py may support {model_type!r}"
        )
    return {
        "peft": {"accepts": True, "reasons": []},
        "vllm": vllm,
        "tgi": tgi,
        "llama.cpp": verdict(cpp_problems, cpp_unknown),
    }
