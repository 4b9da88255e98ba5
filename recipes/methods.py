"""``method: nola | lora | nora | full`` -> a peft config (:func:`build_peft_config`) or an adapted model
(:func:`apply_method`); :func:`check_target_modules` fails early on target names the model does not have."""

from __future__ import annotations

from typing import Sequence

from peft_nola.tuners.lowrank import names_module
from recipes.cli import RecipeError
from recipes.config import AdapterArgs

#: method name in configs -> how tables print it
METHOD_NAMES = {"nola": "NOLA", "lora": "LoRA", "full": "Finetune", "nora": "NoRA"}
METHODS = tuple(METHOD_NAMES)


def _uses_conv1d(model, target_modules: Sequence[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if any(names_module(t, name) for t in target_modules) and isinstance(module, Conv1D):
            return True
    return False


def build_peft_config(args: AdapterArgs, model=None, task_type: str = "CAUSAL_LM"):
    """The peft config for ``args.method`` (``None`` for ``full``).

    ``model`` is only used to detect GPT-2 style Conv1D targets (``fan_in_fan_out``) when ``args.fan_in_fan_out`` is
    None. For LoRA on a fused projection (GPT-2 ``c_attn``) stock peft adapts the whole output with one rank-r pair;
    its parameter count r*(d_in + 3 d) equals the LoRA paper's q,v MergedLinear count 2*r*(d_in + d).
    """
    method = args.method.lower()
    if method not in METHODS:
        raise RecipeError(f"unknown method '{args.method}': choose one of {', '.join(METHODS)}")
    if method == "full":
        return None
    fan_in_fan_out = args.fan_in_fan_out
    if fan_in_fan_out is None:
        fan_in_fan_out = bool(model is not None and _uses_conv1d(model, args.target_modules))
    shared = dict(target_modules=list(args.target_modules), fan_in_fan_out=fan_in_fan_out, task_type=task_type)
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.adapter_dropout, **shared)
    try:
        import peft_nola
    except ImportError as exc:
        raise RecipeError(f"method '{method}' needs the peft_nola library (pip install -e .): {exc}") from None
    if args.output_slices:
        shared["output_slices"] = args.output_slices
    if method == "nola":
        return peft_nola.NolaConfig(
            r=args.r,
            num_basis_A=args.num_basis_A,
            num_basis_B=args.num_basis_B,
            nola_alpha=args.nola_alpha,
            basis_seed=args.basis_seed,
            basis_mode=args.basis_mode,
            nola_dropout=args.adapter_dropout,
            **shared,
        )
    return peft_nola.NoraConfig(
        r=args.r, inner_r=args.nora_inner_r, nora_alpha=args.nora_alpha, nora_dropout=args.adapter_dropout, **shared
    )


def check_target_modules(model, args: AdapterArgs) -> None:
    """Raise RecipeError naming any ``target_modules`` entry that matches no module of ``model`` (``full`` skips)."""
    if args.method.lower() == "full":
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in args.target_modules if not any(names_module(t, n) for n in names)]
    if missing:
        raise RecipeError(
            f"target_modules {missing} not found in {type(model).__name__}; e.g. GPT-2 uses c_attn / c_fc, "
            "LLaMA uses q_proj, v_proj, up_proj, down_proj"
        )


def apply_method(model, args: AdapterArgs, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` for ``args.method``: a peft model for adapters, the model itself (all trainable) for ``full``."""
    peft_config = build_peft_config(args, model, task_type=task_type)
    if peft_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    check_target_modules(model, args)
    return get_peft_model(model, peft_config)


def count_trainable_parameters(model) -> int:
    """Number of parameters with ``requires_grad`` (what the optimizer updates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
